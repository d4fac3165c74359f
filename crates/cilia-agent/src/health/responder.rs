//! The health endpoint's TCP responder: accepts a connection on the health
//! port (both families, one dual-stack socket), writes one line and closes.
//! A prober needs only the handshake; the line tells a person with `nc`
//! what answered.

use std::io::{self, Write};
use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use super::NsThread;

/// How long one accept waits before the thread looks at its stop flag.
const ACCEPT_WAIT: Duration = Duration::from_millis(200);
/// How long writing the line to one peer may take.
const WRITE_WAIT: Duration = Duration::from_millis(500);

/// A running responder; stopped when dropped.
pub struct Responder {
    _thread: NsThread,
    port: u16,
}

impl Responder {
    /// Listens on `[::]:port` (IPv4 too) inside the namespace at `netns`
    /// and answers until dropped. Port 0 picks a free one ([`Self::port`]).
    pub fn start(netns: &Path, port: u16) -> io::Result<Self> {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let thread = NsThread::spawn(
            "cilia-health-responder",
            netns,
            move || {
                let sock = listen(port)?;
                let bound = sock
                    .local_addr()?
                    .as_socket()
                    .map_or(port, |a: SocketAddr| a.port());
                let _ = port_tx.send(bound);
                Ok(sock)
            },
            serve,
        )?;
        let port = port_rx.recv().unwrap_or(port);
        Ok(Self {
            _thread: thread,
            port,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn listen(port: u16) -> io::Result<Socket> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding health port [::]:{port}: {e}")))?;
    sock.listen(64)?;
    // accept() gives up after this (EAGAIN), so the loop sees `stop`.
    sock.set_read_timeout(Some(ACCEPT_WAIT))?;
    Ok(sock)
}

fn serve(sock: Socket, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match sock.accept() {
            Ok((peer, _)) => {
                let _ = peer.set_write_timeout(Some(WRITE_WAIT));
                let _ = (&peer).write_all(b"cilia-health ok\n");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                warn!(error = %e, "health responder: accept failed");
                std::thread::sleep(ACCEPT_WAIT);
            }
        }
    }
}
