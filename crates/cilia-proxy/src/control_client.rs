//! The agent's end of the control socket: connect, read the proxy's hello,
//! then send policies on one half and read answers and flow records on the
//! other (so a task can stream flow records while another pushes policies).
//!
//! Reading is cancel-safe: a partly received line is kept in the reader, so
//! [`ControlReader::recv`] can sit in a `tokio::select!`.

use std::io;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use serde::Serialize;

use crate::control::{FromProxy, ProxyPolicy, PROTOCOL_VERSION};
use crate::control_socket::MAX_CONTROL_MESSAGE;

/// Why talking to the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// Connecting, reading or writing failed.
    #[error("proxy control socket: {0}")]
    Io(#[from] io::Error),
    /// The proxy closed the connection.
    #[error("proxy control socket: closed by the proxy")]
    Closed,
    /// A line was longer than [`MAX_CONTROL_MESSAGE`].
    #[error("proxy control socket: a message is longer than {MAX_CONTROL_MESSAGE} bytes")]
    TooLong,
    /// A line was not a valid message.
    #[error("proxy control socket: invalid message: {0}")]
    Invalid(serde_json::Error),
    /// The first message was not a hello of this protocol version.
    #[error(
        "proxy control socket: expected a hello of protocol version {PROTOCOL_VERSION}, got {0}"
    )]
    BadHello(String),
}

/// What the proxy said when the connection opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Its protocol version ([`PROTOCOL_VERSION`]).
    pub version: u32,
    /// Its process id.
    pub pid: u32,
    /// Revision of the policy in force (`None`: none yet).
    pub revision: Option<u64>,
}

/// [`crate::control::ToProxy`] by reference: a policy is sent without a copy.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum ToProxyRef<'a> {
    Policy(&'a ProxyPolicy),
}

/// Receives answers and flow records.
#[derive(Debug)]
pub struct ControlReader {
    read: BufReader<OwnedReadHalf>,
    line: Vec<u8>,
}

/// Sends policies.
#[derive(Debug)]
pub struct ControlWriter {
    write: OwnedWriteHalf,
}

/// Connects to the proxy's control socket and reads its hello.
pub async fn connect(
    path: &Path,
) -> Result<(Hello, ControlReader, ControlWriter), ControlClientError> {
    let (read, write) = UnixStream::connect(path).await?.into_split();
    let mut reader = ControlReader {
        read: BufReader::new(read),
        line: Vec::new(),
    };
    match reader.recv().await? {
        FromProxy::Hello {
            version,
            pid,
            revision,
        } if version == PROTOCOL_VERSION => Ok((
            Hello {
                version,
                pid,
                revision,
            },
            reader,
            ControlWriter { write },
        )),
        other => {
            let text = format!("{other:?}");
            Err(ControlClientError::BadHello(
                text.chars().take(80).collect(),
            ))
        }
    }
}

impl ControlReader {
    /// The next message (an answer to a policy, or a flow record).
    pub async fn recv(&mut self) -> Result<FromProxy, ControlClientError> {
        loop {
            let room = (MAX_CONTROL_MESSAGE + 1).saturating_sub(self.line.len()) as u64;
            let n = (&mut self.read)
                .take(room)
                .read_until(b'\n', &mut self.line)
                .await?;
            if self.line.last() == Some(&b'\n') {
                let msg = serde_json::from_slice(&self.line).map_err(ControlClientError::Invalid);
                self.line.clear();
                return msg;
            }
            if self.line.len() > MAX_CONTROL_MESSAGE {
                return Err(ControlClientError::TooLong);
            }
            if n == 0 {
                return Err(ControlClientError::Closed);
            }
        }
    }
}

impl ControlWriter {
    /// Sends the whole L7 policy; the answer ([`FromProxy::Applied`] or
    /// [`FromProxy::Rejected`]) arrives on the reader.
    pub async fn send_policy(&mut self, policy: &ProxyPolicy) -> Result<(), ControlClientError> {
        let mut line =
            serde_json::to_vec(&ToProxyRef::Policy(policy)).map_err(ControlClientError::Invalid)?;
        line.push(b'\n');
        self.write.write_all(&line).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ToProxy;

    #[test]
    fn a_policy_sent_by_reference_reads_back_as_to_proxy() {
        let policy = ProxyPolicy {
            version: PROTOCOL_VERSION,
            revision: 9,
            ..Default::default()
        };
        let line = serde_json::to_string(&ToProxyRef::Policy(&policy)).expect("json");
        assert_eq!(
            serde_json::from_str::<ToProxy>(&line).expect("parse"),
            ToProxy::Policy(policy)
        );
    }
}
