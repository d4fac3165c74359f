//! The kube-rs edge against a fake API server on loopback that replays the
//! fixtures: paged list, watch with bookmark, deletion, an ERROR 410 that
//! forces a relist, and the relist's diff, through the real client's
//! requests and decoding. No Kubernetes involved; traffic stays on 127.0.0.1.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cilia_k8s::client::{run, wait_synced};
use cilia_k8s::watch::{Change, Phase, SyncStatus};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::fixtures::{text, value};

/// How the fake server answered, for the test to check the requests made.
#[derive(Default)]
struct Seen {
    lists: AtomicUsize,
    pages: AtomicUsize,
    watches: AtomicUsize,
}

fn json_response(body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn answer(req: Request<hyper::body::Incoming>, seen: Arc<Seen>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("").to_string();
    assert_eq!(req.uri().path(), "/api/v1/pods", "{query}");
    assert!(
        query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "{query}"
    );
    if query.contains("watch=true") {
        seen.watches.fetch_add(1, Ordering::SeqCst);
        assert!(query.contains("allowWatchBookmarks=true"), "{query}");
        if query.contains("resourceVersion=1200") {
            // The recorded stream, then the expiry.
            let body = text("watch-pods.jsonl") + &text("watch-pods-expired.jsonl");
            return json_response(body);
        }
        assert!(query.contains("resourceVersion=1600"), "{query}");
        // Up to date: nothing happens (until the test ends).
        tokio::time::sleep(Duration::from_secs(600)).await;
        return json_response(String::new());
    }
    // Lists: the first one in two pages, the second (the relist) whole.
    let mut list = value("pods-list.json");
    if query.contains("continue=page2") {
        seen.pages.fetch_add(1, Ordering::SeqCst);
        let items = list["items"].as_array_mut().unwrap();
        items.remove(0);
        return json_response(list.to_string());
    }
    assert!(query.contains("limit=500"), "{query}");
    if seen.lists.fetch_add(1, Ordering::SeqCst) == 0 {
        seen.pages.fetch_add(1, Ordering::SeqCst);
        let items = list["items"].as_array_mut().unwrap();
        items.truncate(1);
        list["metadata"] = json!({"resourceVersion": "1200", "continue": "page2"});
        return json_response(list.to_string());
    }
    json_response(text("pods-relist.json"))
}

/// Serves `answer` on a loopback port until the test's runtime ends.
async fn fake_api_server(seen: Arc<Seen>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(answer(req, seen).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

fn client(port: u16) -> kube::Client {
    let url = format!("http://127.0.0.1:{port}").parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).unwrap()
}

fn summary(batch: &[Change<Pod>]) -> Vec<String> {
    batch
        .iter()
        .map(|c| match c {
            Change::Upserted(o) => format!("+{}@{}", o.name_any(), o.resource_version().unwrap()),
            Change::Deleted(o) => format!("-{}@{}", o.name_any(), o.resource_version().unwrap()),
        })
        .collect()
}

#[tokio::test]
async fn the_client_lists_in_pages_watches_and_relists_after_410() {
    let seen = Arc::new(Seen::default());
    let port = fake_api_server(seen.clone()).await;
    let api: Api<Pod> = Api::all(client(port));
    let (tx, mut rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(SyncStatus {
        kind: String::new(),
        synced: false,
        phase: Phase::Listing,
        objects: 0,
        resource_version: None,
        lists: 0,
        last_error: None,
    });
    let task = tokio::spawn(run(
        api,
        "pods",
        Some("spec.nodeName=node-1".into()),
        tx,
        status_tx,
    ));
    let mut batches = Vec::new();
    while batches.len() < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a change within 10 s")
            .expect("the watch task runs");
        batches.push(summary(&batch));
    }
    assert_eq!(
        batches,
        [
            vec![
                "+deathstar-6fb5694d48-5hmds@1187",
                "+tiefighter@1190",
                "+xwing@1195"
            ],
            vec!["+tiefighter@1210"],
            vec!["+xwing-2@1260"],
            vec!["-xwing@1270"],
            vec!["+tiefighter@1280"],
            vec!["-xwing-2@1260", "+tiefighter@1555", "+xwing-2@1590"],
        ]
    );
    // The relist's batch is sent before its status; wait for the watch from 1600.
    let mut status_rx = status_rx;
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        status_rx.wait_for(|s| s.resource_version.as_deref() == Some("1600")),
    )
    .await
    .expect("status within 10 s")
    .unwrap()
    .clone();
    assert!(status.synced);
    assert_eq!(
        (status.phase, status.lists, status.objects),
        (Phase::Watching, 2, 3)
    );
    assert_eq!(status.last_error, None);
    assert_eq!(seen.lists.load(Ordering::SeqCst), 2);
    assert_eq!(seen.pages.load(Ordering::SeqCst), 2);
    task.abort();
}

#[tokio::test]
async fn start_up_gives_up_after_the_timeout_naming_the_kind_and_error() {
    // A loopback port nobody listens on: every request is refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let api: Api<Pod> = Api::all(client(port));
    let (tx, _rx) = mpsc::channel(1);
    let (status_tx, status_rx) = watch::channel(SyncStatus {
        kind: "pods".into(),
        synced: false,
        phase: Phase::Listing,
        objects: 0,
        resource_version: None,
        lists: 0,
        last_error: None,
    });
    let task = tokio::spawn(run(api, "pods", None, tx, status_tx));
    let e = wait_synced(std::slice::from_ref(&status_rx), Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("Kubernetes: not synced after 2s: pods (last error: pods: "),
        "{e}"
    );
    let st = status_rx.borrow().clone();
    assert_eq!(st.phase, Phase::Listing);
    assert!(st.last_error.is_some());
    task.abort();
}
