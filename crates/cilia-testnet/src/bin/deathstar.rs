//! The deathstar of the Star Wars demo, and the HTTP server of the L7
//! benchmark: the API of Cilium's getting-started guide, served fast enough
//! (hyper, keep-alive, HTTP/1.1) that a benchmark measures the path to it,
//! not the server.
//!
//! ```text
//! POST /v1/request-landing  200 "Ship landed"
//! PUT  /v1/exhaust-port     503 "Panic: deathstar exploded"
//! GET  /v1/                 200 the API, one line per call
//! GET  /healthz             200 "ok"
//! GET  /whoami              200 the client's address as the server saw it
//! ```
//!
//! Usage: `deathstar [PORT]` (default 80); listens on `[::]:PORT`, IPv6 and
//! IPv4. Request bodies are read and discarded as they stream in.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const API: &str = "POST /v1/request-landing\nPUT /v1/exhaust-port\nGET /v1/\n";

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    // Drain the body frame by frame: never held whole.
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    let (status, text): (StatusCode, String) = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/request-landing") => (StatusCode::OK, "Ship landed\n".into()),
        (&Method::PUT, "/v1/exhaust-port") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Panic: deathstar exploded\n".into(),
        ),
        (&Method::GET, "/v1/") => (StatusCode::OK, API.into()),
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/whoami") => (StatusCode::OK, format!("{}\n", peer.ip().to_canonical())),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        None => 80,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            eprintln!("deathstar: PORT: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("deathstar: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(port)) {
        eprintln!("deathstar: {e}");
        std::process::exit(1);
    }
}

async fn serve(port: u16) -> std::io::Result<()> {
    // [::]:PORT takes IPv4 too (IPV6_V6ONLY is off by default on Linux).
    let listener = tokio::net::TcpListener::bind(("::", port)).await?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("deathstar: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, peer));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
