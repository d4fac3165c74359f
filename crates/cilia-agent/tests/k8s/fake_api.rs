//! A fake Kubernetes API server for the agent's tests: objects in memory,
//! list and watch (from a resourceVersion, streamed as the objects change),
//! merge patches of a status subresource and Event creation recorded for the
//! test to read. It speaks plain HTTP on a loopback port of the namespace it
//! is bound in (the agent's node namespace), and can be stopped (every
//! connection cut) and started again on the same port, as an API server
//! that goes away and comes back.
//!
//! Only what the agent asks is served; anything else is a 404 the test sees
//! in the agent's status.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use cilia_testnet::Netns;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The collections the agent watches: (path of the list, kind).
const RESOURCES: &[(&str, &str)] = &[
    ("/api/v1/pods", "Pod"),
    ("/api/v1/namespaces", "Namespace"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
    ),
    (
        "/apis/cilium.io/v2/ciliumnetworkpolicies",
        "CiliumNetworkPolicy",
    ),
    (
        "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies",
        "CiliumClusterwideNetworkPolicy",
    ),
];

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One watch stream: its selector and where its events go.
struct Watcher {
    resource: &'static str,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Objects {
    /// The last resourceVersion given out.
    rv: u64,
    /// resource → "namespace/name" → object.
    items: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// resource → every event, for watches that resume from a version.
    log: BTreeMap<&'static str, Vec<(u64, Value)>>,
    watchers: Vec<Watcher>,
    /// Status patches: (path, body).
    patches: Vec<(String, Value)>,
    /// Events created.
    events: Vec<Value>,
    /// Requests served (path?query), for failures to show.
    requests: Vec<String>,
}

fn node_of(obj: &Value) -> Option<&str> {
    obj["spec"]["nodeName"].as_str()
}

fn key_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl Objects {
    fn resource(kind: &str) -> &'static str {
        RESOURCES
            .iter()
            .find(|(_, k)| *k == kind)
            .map(|(r, _)| *r)
            .unwrap_or_else(|| panic!("the fake serves no {kind}"))
    }

    /// Records an event and sends it to the watchers it concerns.
    fn emit(&mut self, resource: &'static str, kind: &str, obj: &Value) {
        let event = json!({"type": kind, "object": obj});
        let rv = self.rv;
        self.log
            .entry(resource)
            .or_default()
            .push((rv, event.clone()));
        let line = Bytes::from(format!("{event}\n"));
        self.watchers.retain(|w| {
            if w.resource != resource {
                return true;
            }
            if let Some(node) = &w.node {
                if node_of(obj) != Some(node.as_str()) {
                    return true;
                }
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    fn put(&mut self, mut obj: Value) -> Value {
        let kind = obj["kind"].as_str().expect("object has a kind").to_string();
        let resource = Self::resource(&kind);
        let key = key_of(&obj);
        self.rv += 1;
        let existing = self.items.entry(resource).or_default().get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().expect("metadata");
        let uid = existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("uid-{}-{}", kind.to_lowercase(), self.rv));
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let generation = existing
            .as_ref()
            .and_then(|e| e["metadata"]["generation"].as_i64())
            .map_or(1, |g| g + 1);
        meta.insert("generation".into(), json!(generation));
        self.items
            .entry(resource)
            .or_default()
            .insert(key, obj.clone());
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(resource, event, &obj);
        obj
    }

    fn delete(&mut self, kind: &str, key: &str) {
        let resource = Self::resource(kind);
        let Some(mut obj) = self.items.entry(resource).or_default().remove(key) else {
            return;
        };
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(resource, "DELETED", &obj);
    }
}

/// The fake API server. Dropping it stops it.
pub struct FakeApi {
    objects: Arc<Mutex<Objects>>,
    runtime: tokio::runtime::Runtime,
    port: u16,
    /// The accept loop and every connection, aborted by [`Self::stop`].
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("a valid response")
}

fn status_error(code: StatusCode, message: &str) -> Response<Body> {
    respond(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": "NotFound", "code": code.as_u16()}),
    )
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%3D", "=").replace("%2F", "/"))
    })
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    objects: Arc<Mutex<Objects>>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    objects
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{query}"));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path == "/version" {
        return respond(
            StatusCode::OK,
            json!({"major": "1", "minor": "28", "gitVersion": "v1.28.0-fake",
                   "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-12-02T00:00:00Z",
                   "goVersion": "go1.21", "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    if method == Method::PATCH && path.ends_with("/status") {
        let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut o = objects.lock().unwrap();
        o.patches.push((path.clone(), patch.clone()));
        // /apis/cilium.io/v2/[namespaces/NS/]PLURAL/NAME/status
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (namespace, plural, name) = match parts.as_slice() {
            ["apis", "cilium.io", "v2", "namespaces", ns, plural, name, "status"] => {
                (*ns, *plural, *name)
            }
            ["apis", "cilium.io", "v2", plural, name, "status"] => ("", *plural, *name),
            _ => return status_error(StatusCode::NOT_FOUND, "no such status"),
        };
        let resource = RESOURCES
            .iter()
            .find(|(r, _)| r.ends_with(&format!("/{plural}")))
            .map(|(r, _)| *r);
        let key = format!("{namespace}/{name}");
        let Some(mut obj) = resource.and_then(|r| o.items.get(r)?.get(&key).cloned()) else {
            return status_error(StatusCode::NOT_FOUND, "no such object");
        };
        obj["status"] = patch["status"].clone();
        // A status write is a new version of the object, generation unchanged.
        o.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(o.rv.to_string());
        let resource = resource.expect("found above");
        o.items.get_mut(resource).unwrap().insert(key, obj.clone());
        o.emit(resource, "MODIFIED", &obj);
        return respond(StatusCode::OK, obj);
    }
    if method == Method::POST && path.ends_with("/events") {
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        objects.lock().unwrap().events.push(event.clone());
        return respond(StatusCode::CREATED, event);
    }
    let Some((resource, kind)) = RESOURCES.iter().find(|(r, _)| *r == path) else {
        return status_error(StatusCode::NOT_FOUND, &format!("the fake serves no {path}"));
    };
    let node = query_param(&query, "fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName=").map(str::to_string));
    let selected = |obj: &Value| node.as_deref().is_none_or(|n| node_of(obj) == Some(n));
    if query_param(&query, "watch").as_deref() == Some("true") {
        let from: u64 = query_param(&query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut o = objects.lock().unwrap();
            for (rv, event) in o.log.get(resource).into_iter().flatten() {
                if *rv > from && selected(&event["object"]) {
                    let _ = tx.send(Bytes::from(format!("{event}\n")));
                }
            }
            o.watchers.push(Watcher {
                resource,
                node: node.clone(),
                tx,
            });
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
            .expect("a valid response");
    }
    let o = objects.lock().unwrap();
    let items: Vec<Value> = o
        .items
        .get(resource)
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|obj| selected(obj))
        .cloned()
        .collect();
    respond(
        StatusCode::OK,
        json!({"kind": format!("{kind}List"), "apiVersion": "v1",
               "metadata": {"resourceVersion": o.rv.to_string()}, "items": items}),
    )
}

impl FakeApi {
    /// Serves on a new loopback port of namespace `ns`.
    pub fn start(ns: &Netns) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the fake API server");
        let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let port = listener.local_addr().unwrap().port();
        let fake = Self {
            objects: Arc::new(Mutex::new(Objects::default())),
            runtime,
            port,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        fake.serve(listener);
        fake
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let objects = self.objects.clone();
        let tasks = self.tasks.clone();
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let accept = self.runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let objects = objects.clone();
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let objects = objects.clone();
                        async move { Ok::<_, Infallible>(answer(req, objects).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Cuts every connection and stops listening (the port stays free for
    /// [`Self::restart`]).
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.objects.lock().unwrap().watchers.clear();
    }

    /// Listens again on the same port of `ns`, with the same objects.
    pub fn restart(&self, ns: &Netns) {
        let port = self.port;
        let listener = ns.run(move || {
            // The aborted accept loop releases the port asynchronously.
            for _ in 0..100 {
                if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                    return l;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            panic!("port {port} of the fake API server is not free again");
        });
        self.serve(listener);
    }

    /// A kubeconfig file naming this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://127.0.0.1:{}\n  name: fake\n\
                 contexts:\n- context:\n    cluster: fake\n    user: agent\n  name: fake\ncurrent-context: fake\n\
                 users:\n- name: agent\n  user: {{}}\n",
                self.port
            ),
        )
        .unwrap();
        path
    }

    /// Creates or replaces an object (by kind, namespace and name).
    pub fn put(&self, obj: Value) -> Value {
        self.objects.lock().unwrap().put(obj)
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        self.objects
            .lock()
            .unwrap()
            .delete(kind, &format!("{namespace}/{name}"));
    }

    /// The object as stored now.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let o = self.objects.lock().unwrap();
        o.items
            .get(Objects::resource(kind))?
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Status patches received: (path, body).
    pub fn patches(&self) -> Vec<(String, Value)> {
        self.objects.lock().unwrap().patches.clone()
    }

    /// Events created.
    pub fn events(&self) -> Vec<Value> {
        self.objects.lock().unwrap().events.clone()
    }

    /// Requests served, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.objects.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}
