//! A real etcd (Debian's `etcd`) for multi-node tests, running inside the
//! fabric namespace and listening on the bridge address, because node
//! namespaces each have a loopback of their own and so cannot share one on
//! 127.0.0.1. Its data dir outlives a `kill -9`, so a test can crash etcd and
//! start it again on the same data; the process and the dir go on drop.
//!
//! Tests of a kvstore client alone need no namespace: they run etcd on the
//! loopback of their own namespace ([`Etcd::start_on_loopback`]), on free
//! ports, since tests run in parallel and share that loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{unique_name, Netns};

/// Client port (the namespace is the test's own, so a fixed port is safe).
pub const CLIENT_PORT: u16 = 2379;
/// Peer port, on the fabric namespace's loopback.
pub const PEER_PORT: u16 = 2380;
/// The longest etcd may take to report healthy after a start.
const START: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no `etcd` binary in PATH (run scripts/setup.sh)")]
    NotInstalled,
    #[error("starting etcd: {0}")]
    Spawn(std::io::Error),
    #[error("etcd not healthy within {within:?}: {detail}\n{log}")]
    Unhealthy {
        within: Duration,
        detail: String,
        log: String,
    },
}

/// etcd inside a namespace (the fabric's), on `listen:CLIENT_PORT`, or on
/// this namespace's loopback on free ports.
pub struct Etcd {
    /// `None`: the test's own namespace.
    netns: Option<PathBuf>,
    listen: IpAddr,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Whether Debian's `etcd` is installed.
pub fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    })
}

impl Etcd {
    /// Starts etcd in `netns` listening on `listen` (an address of that
    /// namespace), with a fresh data dir, and waits until it is healthy.
    pub fn start(netns: &Netns, listen: IpAddr) -> Result<Self, EtcdError> {
        Self::start_with(Some(netns.path()), listen, CLIENT_PORT, PEER_PORT)
    }

    /// Starts etcd in the caller's namespace on 127.0.0.1, client and peer
    /// ports free ones, with a fresh data dir, and waits until it is
    /// healthy. [`Etcd::start_again`] keeps the ports.
    pub fn start_on_loopback() -> Result<Self, EtcdError> {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (client, peer) = (free_port()?, free_port()?);
        Self::start_with(None, localhost, client, peer)
    }

    fn start_with(
        netns: Option<PathBuf>,
        listen: IpAddr,
        client_port: u16,
        peer_port: u16,
    ) -> Result<Self, EtcdError> {
        let dir = std::env::temp_dir().join(unique_name("cilia-etcd-"));
        std::fs::create_dir_all(&dir).map_err(EtcdError::Spawn)?;
        let mut etcd = Self {
            netns,
            listen,
            client_port,
            peer_port,
            dir,
            child: None,
        };
        etcd.start_again()?;
        Ok(etcd)
    }

    /// `http://<listen>:<client port>`, what agents get as
    /// `--kvstore-endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client_addr())
    }

    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen, self.client_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Starts etcd (again) on the same data dir; waits until healthy.
    pub fn start_again(&mut self) -> Result<(), EtcdError> {
        self.stop_kill9();
        let bin = etcd_binary().ok_or(EtcdError::NotInstalled)?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(EtcdError::Spawn)?;
        let log2 = log.try_clone().map_err(EtcdError::Spawn)?;
        // nsenter execs etcd: the child's pid is etcd's.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut nsenter = std::process::Command::new("nsenter");
                nsenter
                    .arg(format!("--net={}", netns.display()))
                    .arg("--")
                    .arg(bin);
                nsenter
            }
            None => std::process::Command::new(bin),
        };
        let child = command
            .args(["--name", "cilia-test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("cilia-test={peer}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(EtcdError::Spawn)?;
        self.child = Some(child);
        self.wait_healthy(START)
    }

    /// SIGKILL, as a crash would; the data dir stays.
    pub fn stop_kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Polls `GET /health` (from inside the namespace) until it says
    /// `"health":"true"`.
    pub fn wait_healthy(&mut self, within: Duration) -> Result<(), EtcdError> {
        let deadline = Instant::now() + within;
        let mut detail = String::from("never polled");
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                detail = format!("etcd exited with {status}");
                break;
            }
            match self.get("/health") {
                Ok((200, body)) if body.contains("\"true\"") => return Ok(()),
                Ok((code, body)) => detail = format!("/health: {code} {body}"),
                Err(e) => detail = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(EtcdError::Unhealthy {
            within,
            detail,
            log: tail(&self.log_text(), 20),
        })
    }

    /// `GET path` from inside the namespace: status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.http("GET", path, "")
    }

    /// One HTTP/1.1 request to etcd's client port from inside the namespace
    /// (JSON body for the v3 gateway, e.g. `/v3/kv/put`).
    pub fn http(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let addr = self.client_addr();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let Some(netns) = &self.netns else {
            return http_exchange(addr, &request);
        };
        let file = std::fs::File::open(netns).map_err(|e| e.to_string())?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())?;
                http_exchange(addr, &request)
            })
            .join()
            .map_err(|_| "http thread panicked".to_string())?
        })
    }

    /// Puts `key` = `value` through the v3 JSON gateway.
    pub fn put(&self, key: &str, value: &str) -> Result<(), String> {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            base64(key.as_bytes()),
            base64(value.as_bytes())
        );
        match self.http("POST", "/v3/kv/put", &body)? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("put {key}: {code} {body}")),
        }
    }

    /// Whether `key` exists and its value contains `value` (the gateway
    /// answers base64; compared encoded, which needs no decoder).
    pub fn holds(&self, key: &str, value: &str) -> Result<bool, String> {
        let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
        match self.http("POST", "/v3/kv/range", &body)? {
            (200, answer) => Ok(answer.contains(&format!("\"{}\"", base64(value.as_bytes())))),
            (code, answer) => Err(format!("range {key}: {code} {answer}")),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop_kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `request` (already complete, `Connection: close`) and reads the
/// answer: status code and body.
pub fn http_exchange(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status from {addr}: {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Standard base64 with padding (the v3 gateway's encoding of bytes).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A port nothing listens on now on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16, EtcdError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(EtcdError::Spawn)
}

fn tail(text: &str, lines: usize) -> String {
    let mut last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.reverse();
    last.join("\n")
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_pads_like_the_rfc() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
