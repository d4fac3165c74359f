//! The list/watch state machine, fed the recorded list and event streams.

use std::time::Duration;

use cilia_k8s::policy::translate;
use cilia_k8s::watch::{check_synced, Change, Input, Phase, Request, WatchState};
use cilia_policy::PolicyKind;
use k8s_openapi::api::core::v1::Pod;
use kube::core::{DynamicObject, WatchEvent};
use kube::ResourceExt;

use crate::fixtures::{events, list};

/// `+name@rv` for an upsert, `-name@rv` for a deletion.
fn summary<K: kube::Resource>(changes: &[Change<K>]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Upserted(o) => format!("+{}@{}", o.name_any(), o.resource_version().unwrap()),
            Change::Deleted(o) => format!("-{}@{}", o.name_any(), o.resource_version().unwrap()),
        })
        .collect()
}

fn listed(name: &str) -> Input<Pod> {
    let l = list::<Pod>(name);
    Input::Listed {
        items: l.items,
        resource_version: l.metadata.resource_version.unwrap(),
    }
}

/// The state after the initial list and the recorded watch stream.
fn watched() -> WatchState<Pod> {
    let mut s = WatchState::new("pods");
    s.apply(listed("pods-list.json"));
    for e in events::<Pod>("watch-pods.jsonl") {
        s.apply(Input::Event(e));
    }
    s
}

#[test]
fn a_new_state_lists_first_and_is_not_synced() {
    let s: WatchState<Pod> = WatchState::new("pods");
    assert_eq!(s.next_request(), Request::List);
    let st = s.status();
    assert!(!st.synced);
    assert_eq!(st.phase, Phase::Listing);
    assert_eq!(st.kind, "pods");
}

#[test]
fn the_initial_list_upserts_everything_and_watches_from_its_version() {
    let mut s = WatchState::new("pods");
    let changes = s.apply(listed("pods-list.json"));
    assert_eq!(
        summary(&changes),
        [
            "+deathstar-6fb5694d48-5hmds@1187",
            "+tiefighter@1190",
            "+xwing@1195"
        ]
    );
    assert_eq!(
        s.next_request(),
        Request::Watch {
            resource_version: "1200".into()
        }
    );
    let st = s.status();
    assert!(st.synced);
    assert_eq!((st.phase, st.objects, st.lists), (Phase::Watching, 3, 1));
}

#[test]
fn events_modify_add_and_delete_and_a_bookmark_only_moves_the_version() {
    let mut s = WatchState::new("pods");
    s.apply(listed("pods-list.json"));
    let mut seen = Vec::new();
    for e in events::<Pod>("watch-pods.jsonl") {
        let is_bookmark = matches!(e, WatchEvent::Bookmark(_));
        let changes = s.apply(Input::Event(e));
        if is_bookmark {
            assert!(changes.is_empty());
            assert_eq!(s.status().resource_version.as_deref(), Some("1250"));
        }
        seen.extend(summary(&changes));
    }
    assert_eq!(seen, ["+tiefighter@1210", "+xwing-2@1260", "-xwing@1270"]);
    let names: Vec<String> = s.cache().values().map(|p| p.name_any()).collect();
    assert_eq!(names.len(), 3);
    assert!(names.contains(&"xwing-2".to_string()) && !names.contains(&"xwing".to_string()));
    assert_eq!(
        s.next_request(),
        Request::Watch {
            resource_version: "1270".into()
        }
    );
}

#[test]
fn a_label_change_reaches_the_consumer_with_the_new_labels() {
    let mut s = WatchState::new("pods");
    s.apply(listed("pods-list.json"));
    let first = events::<Pod>("watch-pods.jsonl").remove(0);
    let changes = s.apply(Input::Event(first));
    let Change::Upserted(pod) = &changes[0] else {
        panic!("{changes:?}")
    };
    let endpoint = cilia_k8s::pod::PodEndpoint::from_pod(pod).unwrap();
    assert_eq!(endpoint.labels["org"], "alliance");
}

#[test]
fn a_resumed_watch_repeating_events_changes_nothing() {
    let mut s = watched();
    for e in events::<Pod>("watch-pods.jsonl") {
        let changes = s.apply(Input::Event(e));
        assert!(changes.is_empty(), "{:?}", summary(&changes));
    }
    assert_eq!(s.cache().len(), 3);
}

#[test]
fn an_expired_version_keeps_the_cache_and_asks_for_a_relist() {
    let mut s = watched();
    let mut stream = events::<Pod>("watch-pods-expired.jsonl").into_iter();
    let changes = s.apply(Input::Event(stream.next().unwrap()));
    assert_eq!(summary(&changes), ["+tiefighter@1280"]);
    let changes = s.apply(Input::Event(stream.next().unwrap()));
    assert!(changes.is_empty());
    assert_eq!(s.next_request(), Request::List);
    assert_eq!(s.delay(), Duration::ZERO);
    let st = s.status();
    assert_eq!(st.phase, Phase::Relisting);
    assert!(st.synced, "the cache still serves while relisting");
    assert_eq!(st.objects, 3);
    assert_eq!(st.resource_version, None);
    let err = st.last_error.unwrap();
    assert!(
        err.contains("HTTP 410") && err.contains("too old resource version"),
        "{err}"
    );
}

#[test]
fn a_relist_diffs_against_the_cache_deletions_first() {
    let mut s = watched();
    for e in events::<Pod>("watch-pods-expired.jsonl") {
        s.apply(Input::Event(e));
    }
    // While the watch was down: tiefighter changed; xwing-2 was deleted and
    // re-created under the same name (new uid); deathstar did not change.
    let changes = s.apply(listed("pods-relist.json"));
    assert_eq!(
        summary(&changes),
        ["-xwing-2@1260", "+tiefighter@1555", "+xwing-2@1590"]
    );
    let Change::Deleted(old) = &changes[0] else {
        panic!()
    };
    assert_eq!(old.uid().unwrap(), "3fa0a8d9-7d84-4c4b-8d6b-3a9e5ebf4d31");
    let st = s.status();
    assert_eq!((st.phase, st.lists, st.objects), (Phase::Watching, 2, 3));
    assert_eq!(st.last_error, None);
    assert_eq!(
        s.next_request(),
        Request::Watch {
            resource_version: "1600".into()
        }
    );
}

#[test]
fn a_gone_answer_to_the_watch_request_also_relists() {
    let mut s = watched();
    s.apply(Input::Failed {
        code: Some(410),
        message: "too old resource version: 1270 (1502)".into(),
    });
    assert_eq!(s.next_request(), Request::List);
}

#[test]
fn a_lost_connection_resumes_from_the_last_version_with_backoff() {
    let mut s = watched();
    let mut delays = Vec::new();
    for _ in 0..10 {
        s.apply(Input::Failed {
            code: None,
            message: "connection refused".into(),
        });
        delays.push(s.delay().as_millis());
        assert_eq!(
            s.next_request(),
            Request::Watch {
                resource_version: "1270".into()
            }
        );
    }
    assert_eq!(
        delays,
        [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
    );
    let st = s.status();
    assert_eq!(st.phase, Phase::Backoff);
    assert_eq!(st.objects, 3, "the cache (so the datapath) stays as it is");
    assert!(st.last_error.unwrap().contains("connection refused"));
    // The first event after reconnecting clears the backoff and the error.
    let bookmark = events::<Pod>("watch-pods.jsonl").remove(1);
    s.apply(Input::Event(bookmark));
    assert_eq!(s.delay(), Duration::ZERO);
    assert_eq!(s.status().last_error, None);
}

#[test]
fn an_accepted_watch_is_a_connection_back_even_before_any_event() {
    let mut s = watched();
    for _ in 0..3 {
        s.apply(Input::Failed {
            code: None,
            message: "connection refused".into(),
        });
    }
    assert_eq!(s.status().phase, Phase::Backoff);
    // An idle kind may see no event for minutes after reconnecting.
    assert!(s.apply(Input::WatchOpened).is_empty());
    let st = s.status();
    assert_eq!(st.phase, Phase::Watching);
    assert_eq!(st.last_error, None);
    assert_eq!(st.objects, 3);
    // The backoff stays until an event: a server that accepts watches and
    // fails them at once is not asked in a tight loop.
    assert_eq!(s.delay().as_millis(), 800);
    s.apply(Input::Failed {
        code: None,
        message: "reset".into(),
    });
    assert_eq!(s.delay().as_millis(), 1600);
}

#[test]
fn a_stream_ending_normally_resumes_at_once() {
    let mut s = watched();
    assert!(s.apply(Input::StreamEnded).is_empty());
    assert_eq!(s.delay(), Duration::ZERO);
    assert_eq!(
        s.next_request(),
        Request::Watch {
            resource_version: "1270".into()
        }
    );
}

#[test]
fn a_server_error_event_backs_off_and_resumes() {
    let mut s = watched();
    let status: kube::core::Status = serde_json::from_value(serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500
    }))
    .unwrap();
    s.apply(Input::Event(WatchEvent::Error(Box::new(status))));
    assert_eq!(s.delay(), Duration::from_millis(200));
    assert_eq!(
        s.next_request(),
        Request::Watch {
            resource_version: "1270".into()
        }
    );
}

#[test]
fn start_up_sync_names_the_kinds_missing_and_their_errors() {
    let mut pods = WatchState::<Pod>::new("pods");
    pods.apply(listed("pods-list.json"));
    let mut cnps = WatchState::<DynamicObject>::new("ciliumnetworkpolicies");
    cnps.apply(Input::Failed {
        code: Some(404),
        message: "the server could not find the requested resource".into(),
    });
    assert_eq!(cnps.next_request(), Request::List);
    let nps = WatchState::<DynamicObject>::new("networkpolicies");
    let e = check_synced(
        &[pods.status(), cnps.status(), nps.status()],
        Duration::from_secs(60),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "Kubernetes: not synced after 60s: ciliumnetworkpolicies (last error: \
         ciliumnetworkpolicies: HTTP 404: the server could not find the requested resource), \
         networkpolicies (no answer yet)"
    );
    assert!(check_synced(&[pods.status()], Duration::from_secs(1)).is_ok());
}

#[test]
fn policy_events_translate_accept_refuse_and_delete() {
    let mut s = WatchState::<DynamicObject>::new("ciliumnetworkpolicies");
    s.apply(Input::Listed {
        items: Vec::new(),
        resource_version: "1400".into(),
    });
    let mut log = Vec::new();
    let mut docs = Vec::new();
    for e in events::<DynamicObject>("watch-cnp.jsonl") {
        for change in s.apply(Input::Event(e)) {
            match change {
                Change::Upserted(obj) => match translate(PolicyKind::CiliumNetworkPolicy, &obj) {
                    Ok(p) => {
                        log.push(format!("apply {}", p.policy.qualified_name()));
                        docs.push(p.yaml);
                    }
                    Err(r) => log.push(format!("refuse {}: {}", r.object.name, r.field)),
                },
                Change::Deleted(obj) => log.push(format!("delete {}", obj.name_any())),
            }
        }
    }
    assert_eq!(
        log,
        [
            "apply default/rule1",
            "apply default/rule1",
            "refuse to-fqdn: spec.egress[0].toFQDNs",
            "delete rule1"
        ]
    );
    // The second was a status update: the same document, nothing to re-resolve.
    assert_eq!(docs[0], docs[1]);
    assert_eq!(s.status().resource_version.as_deref(), Some("1700"));
}
