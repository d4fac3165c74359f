//! `ApiClient` against a one-shot fake agent on a unix socket: which
//! request line each call sends, and how answers become values or errors.

use std::path::PathBuf;

use cilia_api::{ApiClient, ClientError, EndpointQuery, Namespace, PolicyDelete, StreamItem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// A socket path unique to this process and `name`, removed on drop.
struct Socket(PathBuf);

impl Socket {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("cilia-api-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Socket(path)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves one request with `status` and `body`; yields the request's first
/// line (method, path, version).
fn serve_once(
    socket: &Socket,
    status: &'static str,
    body: &'static str,
) -> tokio::task::JoinHandle<String> {
    let listener = UnixListener::bind(&socket.0).expect("bind the fake agent");
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.expect("read the request");
            assert!(n > 0, "the client closed before the end of the head");
            request.extend_from_slice(&buf[..n]);
        }
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).await.expect("answer");
        let head = String::from_utf8_lossy(&request).into_owned();
        head.lines().next().unwrap_or_default().to_string()
    })
}

#[tokio::test]
async fn an_agent_refusal_surfaces_its_own_message() {
    let socket = Socket::new("refusal");
    let agent = serve_once(
        &socket,
        "404 Not Found",
        r#"{"code":"not-found","message":"endpoint 7: no such endpoint"}"#,
    );
    let err = ApiClient::new(&socket.0).endpoint(7).await.unwrap_err();
    assert_eq!(agent.await.unwrap(), "GET /v1/endpoints/7 HTTP/1.1");
    assert_eq!(err.to_string(), "endpoint 7: no such endpoint");
    assert!(
        matches!(&err, ClientError::Api { status: 404, code, .. } if code == "not-found"),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_answer_that_is_not_the_api_shape_is_quoted() {
    let socket = Socket::new("garbage");
    let agent = serve_once(&socket, "502 Bad Gateway", "upstream gone");
    let err = ApiClient::new(&socket.0).status().await.unwrap_err();
    agent.await.unwrap();
    assert_eq!(
        err.to_string(),
        "unexpected answer from the agent (502): upstream gone"
    );
}

#[tokio::test]
async fn a_namespace_name_is_one_encoded_path_segment() {
    let socket = Socket::new("namespace");
    let agent = serve_once(&socket, "200 OK", r#"{"name":"a b/c","labels":{}}"#);
    let ns = ApiClient::new(&socket.0)
        .set_namespace(&Namespace {
            name: "a b/c".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(
        agent.await.unwrap(),
        "PUT /v1/namespaces/a%20b%2Fc HTTP/1.1"
    );
    assert_eq!(ns.name, "a b/c");
}

#[tokio::test]
async fn deleting_a_named_policy_sends_name_and_namespace_as_query() {
    let socket = Socket::new("policy");
    let agent = serve_once(
        &socket,
        "200 OK",
        r#"{"revision":4,"policies":["prod/rule1"]}"#,
    );
    let change = ApiClient::new(&socket.0)
        .delete_policy(&PolicyDelete::Named {
            name: "rule1".into(),
            namespace: Some("prod".into()),
        })
        .await
        .unwrap();
    assert_eq!(
        agent.await.unwrap(),
        "DELETE /v1/policy?name=rule1&namespace=prod HTTP/1.1"
    );
    assert_eq!(change.revision, 4);
}

#[tokio::test]
async fn deleting_a_container_answers_the_count() {
    let socket = Socket::new("container");
    let agent = serve_once(&socket, "200 OK", "2");
    let n = ApiClient::new(&socket.0)
        .delete_endpoints(&EndpointQuery::attachment("c1", "eth0", "cilia"))
        .await
        .unwrap();
    assert_eq!(
        agent.await.unwrap(),
        "DELETE /v1/endpoints?container_id=c1&ifname=eth0&network=cilia HTTP/1.1"
    );
    assert_eq!(n, 2);
}

#[tokio::test]
async fn a_stream_ends_when_the_reader_has_enough() {
    let socket = Socket::new("stream");
    let agent = serve_once(&socket, "200 OK", "{\"lost\":3}\nnot json\n{\"lost\":5}\n");
    let mut seen = Vec::new();
    ApiClient::new(&socket.0)
        .monitor(&Default::default(), |line| {
            seen.push((line.text().to_string(), line.item().ok()));
            seen.len() < 2
        })
        .await
        .unwrap();
    assert_eq!(agent.await.unwrap(), "GET /v1/monitor HTTP/1.1");
    assert_eq!(seen.len(), 2);
    assert!(matches!(seen[0].1, Some(StreamItem::Lost { lost: 3 })));
    assert_eq!(seen[1].0, "not json");
    assert!(seen[1].1.is_none());
}
