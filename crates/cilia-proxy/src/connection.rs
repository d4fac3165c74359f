//! One redirected client connection: HTTP/1.1 requests decided one by one
//! against the policy in force when each request's head arrives, denied ones
//! answered `403`, allowed ones forwarded over this connection's single
//! upstream connection.
//!
//! Invariants: bodies stream in both directions (never buffered whole; only
//! a denied request's small body is drained so the connection stays usable);
//! every request produces exactly one flow record; a slow control client
//! never delays a request (flow records go to a lossy broadcast queue).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cilia_policy::l7::RequestView;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch, Mutex};
use tracing::{debug, warn};

use crate::control::{L7Flow, L7Verdict};
use crate::policy::CompiledPolicy;
use crate::sockets;

/// Longest request target kept in a flow record, in bytes.
pub const MAX_FLOW_PATH: usize = 256;
/// A denied request's body is read and discarded up to this size so the
/// connection stays usable; a longer one closes the connection.
const DENIED_BODY_DRAIN: usize = 64 * 1024;
const DENIED_BODY_DRAIN_TIME: Duration = Duration::from_secs(1);
/// A client has this long to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What every connection shares.
pub(crate) struct Shared {
    pub policy: watch::Receiver<Option<Arc<CompiledPolicy>>>,
    pub flows: broadcast::Sender<L7Flow>,
    pub connect_timeout: Duration,
}

struct Conn {
    src: SocketAddr,
    dst: SocketAddr,
    shared: Arc<Shared>,
    /// The upstream connection: opened on the first allowed request, reused
    /// after. hyper serves one request of a connection at a time, so the lock
    /// is never contended; it only gives the service `&mut` access.
    upstream: Mutex<Option<SendRequest<Incoming>>>,
}

/// A request head as the matcher sees it.
struct Head<'a>(&'a Request<Incoming>);

impl RequestView for Head<'_> {
    fn method(&self) -> &str {
        self.0.method().as_str()
    }
    fn path(&self) -> &str {
        let uri = self.0.uri();
        uri.path_and_query().map_or(uri.path(), |pq| pq.as_str())
    }
    fn host(&self) -> Option<&str> {
        match self.0.headers().get(header::HOST) {
            Some(h) => h.to_str().ok(),
            None => self.0.uri().authority().map(|a| a.as_str()),
        }
    }
    fn has_header(&self, name: &str, value: Option<&str>) -> bool {
        self.0
            .headers()
            .get_all(name)
            .iter()
            .any(|v| value.is_none_or(|want| v.as_bytes() == want.as_bytes()))
    }
}

/// Serves one accepted connection until it ends, or until `stop` turns true
/// (then the request in flight finishes and the connection closes).
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let (src, dst) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(s), Ok(d)) => (canonical(s), canonical(d)),
        _ => return,
    };
    if let Err(e) = sockets::set_mark(&stream, sockets::MARK) {
        warn!(%src, %dst, "accepted connection: SO_MARK: {e}");
        return;
    }
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(Conn {
        src,
        dst,
        shared,
        upstream: Mutex::new(None),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    let result = tokio::select! {
        r = http.as_mut() => r,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            http.as_mut().graceful_shutdown();
            http.await
        }
    };
    if let Err(e) = result {
        debug!(%src, %dst, "connection ended: {e}");
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn text_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection`
/// names, and the ones that are hop-by-hop by definition.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The first `max` bytes of `s`, cut on a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Reads and discards a denied request's body when it is small; false when
/// it is too long or too slow (the connection must then close).
async fn drain(body: Incoming) -> bool {
    if body.is_end_stream() {
        return true;
    }
    if body.size_hint().lower() > DENIED_BODY_DRAIN as u64 {
        return false;
    }
    matches!(
        tokio::time::timeout(
            DENIED_BODY_DRAIN_TIME,
            Limited::new(body, DENIED_BODY_DRAIN).collect()
        )
        .await,
        Ok(Ok(_))
    )
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let time_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let policy = self.shared.policy.borrow().clone();
        let head = Head(&req);
        let method = req.method().to_string();
        let path = truncate(head.path(), MAX_FLOW_PATH);
        let host = head.host().map(|h| truncate(h, MAX_FLOW_PATH));
        // Listeners open only once a policy is in force, so `None` cannot
        // happen; deny anyway rather than trust that.
        let decision = policy.map(|p| p.decide(self.src, self.dst, &head));
        let (resp, verdict) = match &decision {
            Some(d) if d.allowed => self.forward(req, d.dst_is_local).await,
            _ => {
                let drained = drain(req.into_body()).await;
                let mut resp = text_response(StatusCode::FORBIDDEN, "Access denied\r\n");
                if !drained {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                (resp, L7Verdict::Denied)
            }
        };
        let flow = L7Flow {
            time_unix_ns,
            endpoint_id: decision.as_ref().map_or(0, |d| d.endpoint_id),
            direction: decision
                .as_ref()
                .map_or(crate::control::L7Direction::Ingress, |d| d.direction),
            src: self.src,
            dst: self.dst,
            src_identity: decision.as_ref().map_or(0, |d| d.src_identity),
            dst_identity: decision.as_ref().map_or(0, |d| d.dst_identity),
            method,
            path,
            host,
            status: resp.status().as_u16(),
            latency_us: start.elapsed().as_micros() as u64,
            verdict,
            rules: decision.map(|d| d.rules).unwrap_or_default(),
        };
        debug!(?flow, "request");
        // No receiver (no agent connected) is not an error.
        let _ = self.shared.flows.send(flow);
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        dst_is_local: bool,
    ) -> (Response<ProxyBody>, L7Verdict) {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);

        let mut upstream = self.upstream.lock().await;
        if upstream.as_ref().is_none_or(|s| s.is_closed()) {
            *upstream = None;
            let from = dst_is_local.then_some(self.src);
            match sockets::connect_upstream(self.dst, from, self.shared.connect_timeout).await {
                Ok(stream) => {
                    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                        Ok((sender, connection)) => {
                            let (src, dst) = (self.src, self.dst);
                            tokio::spawn(async move {
                                if let Err(e) = connection.await {
                                    debug!(%src, %dst, "upstream connection ended: {e}");
                                }
                            });
                            *upstream = Some(sender);
                        }
                        Err(e) => {
                            warn!(src = %self.src, dst = %self.dst, "upstream handshake: {e}")
                        }
                    }
                }
                Err(e) => warn!(src = %self.src, dst = %self.dst, "upstream: {e}"),
            }
        }
        let Some(sender) = upstream.as_mut() else {
            return (
                text_response(StatusCode::SERVICE_UNAVAILABLE, "Upstream unavailable\r\n"),
                L7Verdict::Error,
            );
        };
        let sent = match sender.ready().await {
            Ok(()) => sender.send_request(req).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                (
                    Response::from_parts(parts, body.boxed()),
                    L7Verdict::Forwarded,
                )
            }
            Err(e) => {
                warn!(src = %self.src, dst = %self.dst, "upstream request: {e}");
                *upstream = None;
                let mut resp = text_response(StatusCode::BAD_GATEWAY, "Upstream error\r\n");
                // The request body may be half sent: the client cannot reuse
                // the connection safely.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                (resp, L7Verdict::Error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("/abc", 256), "/abc");
        let long = "é".repeat(200); // 400 bytes
        let t = truncate(&long, MAX_FLOW_PATH);
        assert_eq!(t.len(), 256);
        let t = truncate(&format!("/{long}"), MAX_FLOW_PATH);
        assert_eq!(t.len(), 255, "the cut never splits a character");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::HOST, HeaderValue::from_static("deathstar"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, vec!["content-length", "host"]);
    }
}
