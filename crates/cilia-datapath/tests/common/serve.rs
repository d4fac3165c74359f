//! Servers on threads of their own inside a test's namespaces (`setns`
//! moves only the calling thread, so a server's thread joins the namespace
//! for its whole life). Every server stops when dropped, also when the
//! test panics, and ends by itself after a minute in any case.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cilia_testnet::Netns;

use super::WAIT;

/// No server loop runs longer than this, stopped or not.
const LIFETIME: Duration = Duration::from_secs(60);

/// Runs `f` on a thread of its own inside `ns`, returning its handle.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// A polling loop on a thread inside a namespace, stopped on drop.
pub struct Serving {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Serving {
    /// Runs `listen` inside `ns` (returning once it has: the server is
    /// bound), then `poll` with what it returned every 10 ms until
    /// stopped.
    pub fn start<L>(
        ns: &Netns,
        listen: impl FnOnce() -> L + Send + 'static,
        mut poll: impl FnMut(&L) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, listening) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = spawn_in(ns, move || {
            let listeners = listen();
            ready.send(()).unwrap();
            let deadline = Instant::now() + LIFETIME;
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                poll(&listeners);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        listening.recv_timeout(WAIT).unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the loop and waits for it, which closes the listeners; a panic
    /// of the loop fails the caller.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An echo server on `[::]` (so both families, IPv4 as mapped addresses)
/// on each of its ports: reads until the client closes its side (or
/// [`WAIT`] passes), sends it all back and closes. Records every peer.
pub struct Echo {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _serving: Serving,
}

impl Echo {
    pub fn start(ns: &Netns, ports: &[u16]) -> Self {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let peers2 = peers.clone();
        let ports = ports.to_vec();
        let listen = move || -> Vec<TcpListener> {
            ports
                .iter()
                .map(|&port| {
                    let l = TcpListener::bind(SocketAddr::from(([0u16; 8], port))).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .collect()
        };
        let serving = Serving::start(ns, listen, move |listeners| {
            for l in listeners {
                let Ok((mut conn, peer)) = l.accept() else {
                    continue;
                };
                peers2
                    .lock()
                    .unwrap()
                    .push(SocketAddr::new(peer.ip().to_canonical(), peer.port()));
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(WAIT)).unwrap();
                let mut data = Vec::new();
                let _ = conn.read_to_end(&mut data);
                let _ = conn.write_all(&data);
            }
        });
        Self {
            peers,
            _serving: serving,
        }
    }

    /// The peers of every connection so far, in order (IPv4 unmapped).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// From inside `ns`: connects to `server` (giving up after `connect`),
/// sends `payload`, closes its side and reads the answer to the end.
/// Returns (its own address, the answer), or the first error.
pub fn exchange(
    ns: &Netns,
    server: SocketAddr,
    payload: &[u8],
    connect: Duration,
) -> std::io::Result<(SocketAddr, Vec<u8>)> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&server, connect)?;
        s.set_read_timeout(Some(WAIT))?;
        let local = s.local_addr()?;
        s.write_all(payload)?;
        s.shutdown(Shutdown::Write)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        Ok((local, answer))
    })
}
