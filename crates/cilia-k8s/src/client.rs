//! The network edge: kube-rs list and watch calls feeding
//! [`WatchState`](crate::watch::WatchState), and the status writes of
//! [`crate::status`]. Everything decided here is decided by the state
//! machine; this module only carries requests out and answers in.
//!
//! kube-runtime's `watcher` does the same list/watch/relist cycle, but it
//! hides the resourceVersion and the failures the agent shows in `cilia
//! status`, and its transitions cannot be fed recorded events; so this uses
//! kube-client's `list`/`watch` calls, which `watcher` is built on.
//!
//! Tested against a fake API server on loopback replaying the JSON fixtures
//! (`tests/k8s/client.rs`), never yet against a real one (none can run on
//! the machines this slice was built on): see `docs/KUBERNETES.md`.

use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::core::DynamicObject;
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::policy::PolicyRefusal;
use crate::watch::{check_synced, Change, Input, NotSynced, Request, SyncStatus, WatchState};
use crate::K8sError;

/// Objects per page of a list.
const PAGE: u32 = 500;
/// The server closes a watch after this long (it is then resumed).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// An input for the state machine from a kube-rs error.
fn failure<K>(e: &kube::Error) -> Input<K> {
    match e {
        kube::Error::Api(status) => Input::Failed {
            code: Some(status.code),
            message: if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            },
        },
        other => Input::Failed {
            code: None,
            message: other.to_string(),
        },
    }
}

/// Lists every object (page by page) and the list's resourceVersion.
async fn list_all<K>(api: &Api<K>, fields: Option<&str>) -> Result<(Vec<K>, String), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await?;
        items.extend(page.items);
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            let rv = page.metadata.resource_version.unwrap_or_default();
            return Ok((items, rv));
        }
    }
}

/// Keeps one kind in sync for as long as `changes` has a receiver: lists,
/// watches, resumes, relists, backs off — as [`WatchState`] says — sending
/// every non-empty batch of changes and publishing the sync status after
/// every input. `fields` is a field selector (`spec.nodeName=node-1`).
pub async fn run<K>(
    api: Api<K>,
    kind: &str,
    fields: Option<String>,
    changes: mpsc::Sender<Vec<Change<K>>>,
    status: watch::Sender<SyncStatus>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut state: WatchState<K> = WatchState::new(kind);
    status.send_replace(state.status());
    loop {
        let delay = state.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match state.next_request() {
            Request::List => {
                let input = match list_all(&api, fields.as_deref()).await {
                    Ok((items, resource_version)) => Input::Listed {
                        items,
                        resource_version,
                    },
                    Err(e) => failure(&e),
                };
                if !deliver(&mut state, input, &changes, &status).await {
                    return;
                }
            }
            Request::Watch { resource_version } => {
                let mut wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
                if let Some(f) = &fields {
                    wp = wp.fields(f);
                }
                let stream = match api.watch(&wp, &resource_version).await {
                    Ok(s) => {
                        if !deliver(&mut state, Input::WatchOpened, &changes, &status).await {
                            return;
                        }
                        s
                    }
                    Err(e) => {
                        if !deliver(&mut state, failure(&e), &changes, &status).await {
                            return;
                        }
                        continue;
                    }
                };
                let mut stream = std::pin::pin!(stream);
                let mut ended_cleanly = true;
                while let Some(item) = stream.next().await {
                    let input = match item {
                        Ok(event) => Input::Event(event),
                        Err(e) => failure(&e),
                    };
                    let stop = matches!(
                        &input,
                        Input::Failed { .. } | Input::Event(kube::core::WatchEvent::Error(_))
                    );
                    if !deliver(&mut state, input, &changes, &status).await {
                        return;
                    }
                    if stop {
                        ended_cleanly = false;
                        break;
                    }
                }
                if ended_cleanly
                    && !deliver(&mut state, Input::StreamEnded, &changes, &status).await
                {
                    return;
                }
            }
        }
    }
}

/// Applies one input; false when nobody listens any more.
async fn deliver<K: Resource + Clone>(
    state: &mut WatchState<K>,
    input: Input<K>,
    changes: &mpsc::Sender<Vec<Change<K>>>,
    status: &watch::Sender<SyncStatus>,
) -> bool {
    if let Input::Failed { message, .. } = &input {
        tracing::warn!(kind = %state.status().kind, "Kubernetes watch: {message}");
    }
    let batch = state.apply(input);
    status.send_replace(state.status());
    batch.is_empty() || changes.send(batch).await.is_ok()
}

/// Waits until every kind has completed its first list, or `timeout`; the
/// error names each kind still missing and its last error.
pub async fn wait_synced(
    statuses: &[watch::Receiver<SyncStatus>],
    timeout: Duration,
) -> Result<(), NotSynced> {
    let all = async {
        for rx in statuses {
            let mut rx = rx.clone();
            // A closed channel ends the wait; the check below reports it.
            let _ = rx.wait_for(|s| s.synced).await;
        }
    };
    let _ = tokio::time::timeout(timeout, all).await;
    let now: Vec<SyncStatus> = statuses.iter().map(|rx| rx.borrow().clone()).collect();
    check_synced(&now, timeout)
}

/// RFC 3339 time, seconds (`2026-12-02T10:00:00Z`).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Writes a CRD policy's `Valid` condition when it differs from what the
/// object says (see [`crate::status::crd_status_patch`]).
pub async fn report_crd_status(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    outcome: Result<(), &PolicyRefusal>,
) -> Result<(), K8sError> {
    let Some(patch) = crate::status::crd_status_patch(obj, outcome, &rfc3339_now()) else {
        return Ok(());
    };
    let name = obj.metadata.name.clone().unwrap_or_default();
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| K8sError::Api {
            kind: format!("status of {name}"),
            reason: e.to_string(),
        })
}

/// Creates the Event reporting a refused `NetworkPolicy`.
pub async fn report_event(
    client: &kube::Client,
    refusal: &PolicyRefusal,
    node: &str,
) -> Result<(), K8sError> {
    use k8s_openapi::api::core::v1::Event;
    let now = SystemTime::now();
    let body = crate::status::refusal_event(
        refusal,
        node,
        &humantime::format_rfc3339_seconds(now).to_string(),
        &humantime::format_rfc3339_micros(now).to_string(),
    );
    let err = |reason: String| K8sError::Api {
        kind: "events".into(),
        reason,
    };
    let event: Event = serde_json::from_value(body).map_err(|e| err(e.to_string()))?;
    let namespace = refusal.object.namespace.as_deref().unwrap_or("default");
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), &event)
        .await
        .map(|_| ())
        .map_err(|e| err(e.to_string()))
}
