//! HTTP/1.1 client over the agent's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::model::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cilia agent at {socket}: {error}; is cilia-agent running? (set --socket or CILIA_SOCKET)")]
    Connect {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the agent ({status}): {body}")]
    Decode { status: u16, body: String },
}

/// A client of one agent socket. Each request opens a new connection: the
/// CLI and CNI plugin make one or two calls per process.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// Opens a connection and sends one request; the response body is
    /// left to the caller (read whole, or streamed).
    async fn send_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Connect {
                    socket: self.socket.clone(),
                    error,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cilia")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode {
                status: 0,
                body: e.to_string(),
            })?;
        Ok(sender.send_request(req).await?)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send_request(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &Bytes) -> Result<T, ClientError> {
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ApiError>(bytes) {
                Ok(e) => ClientError::Api {
                    status: status.as_u16(),
                    code: e.code,
                    message: e.message,
                },
                Err(_) => ClientError::Decode {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(bytes).map_err(|_| ClientError::Decode {
            status: status.as_u16(),
            body: String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    /// GETs a newline-delimited stream, calling `on_line` for every line as
    /// it arrives, until the agent ends it or `on_line` returns false.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let resp = self.send_request(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Self::decode::<serde_json::Value>(status, &bytes).map(|_| ());
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                if !on_line(&text) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, bytes) = self.request(Method::GET, path, None).await?;
        Self::decode(status, &bytes)
    }

    /// Sends `body` as JSON with `method` and decodes the JSON answer.
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        let (status, bytes) = self.request(method, path, Some(body)).await?;
        Self::decode(status, &bytes)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(Method::POST, path, body).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(Method::PUT, path, body).await
    }

    /// DELETE with a JSON answer.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, bytes) = self.request(Method::DELETE, path, None).await?;
        Self::decode(status, &bytes)
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let (status, bytes) = self.request(Method::DELETE, path, None).await?;
        if status.is_success() {
            return Ok(());
        }
        Self::decode::<serde_json::Value>(status, &bytes).map(|_| ())
    }
}
