//! A transparent TCP relay in a node namespace playing the L7 proxy's part
//! in the packet path, without the L7: IP_TRANSPARENT listeners on the
//! proxy port (the datapath steers redirected flows there, so an accepted
//! socket's local address is the original destination), an upstream leg
//! bound to the client's own address, SO_MARK FROM_PROXY on both.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

use cilia_abi::CILIA_MARK_FROM_PROXY;
use cilia_testnet::Netns;
use socket2::{Domain, Protocol, Socket, Type};

use super::serve::Serving;
use super::WAIT;

/// The port the relay listens on, for the policy entries that name it.
pub const PROXY_PORT: u16 = 15080;

pub struct Relay {
    /// (client, local address) of every accepted connection.
    accepted: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    serving: Serving,
}

impl Relay {
    /// Listens on PROXY_PORT in `node` in both families.
    pub fn start(node: &Netns) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let accepted2 = accepted.clone();
        let serving = Serving::start(node, listen, move |listeners| {
            for l in listeners {
                let Ok((conn, client)) = l.accept() else {
                    continue;
                };
                let client = client.as_socket().unwrap();
                let local = conn.local_addr().unwrap().as_socket().unwrap();
                accepted2.lock().unwrap().push((client, local));
                let conn: TcpStream = conn.into();
                conn.set_nonblocking(false).unwrap();
                let up = upstream(client, local);
                pipe(conn.try_clone().unwrap(), up.try_clone().unwrap());
                pipe(up, conn);
            }
        });
        Self { accepted, serving }
    }

    pub fn accepted(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepted.lock().unwrap().clone()
    }

    /// Stops accepting and closes the listeners: the proxy is gone.
    pub fn stop(&mut self) {
        self.serving.stop();
    }
}

fn listen() -> Vec<Socket> {
    [
        (Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], PROXY_PORT))),
        (Domain::IPV6, SocketAddr::from(([0u16; 8], PROXY_PORT))),
    ]
    .into_iter()
    .map(|(domain, addr)| {
        let l = transparent_socket(domain);
        if domain == Domain::IPV6 {
            l.set_only_v6(true).unwrap();
        }
        l.set_reuse_address(true).unwrap();
        l.bind(&addr.into()).unwrap();
        l.listen(16).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .collect()
}

fn transparent_socket(domain: Domain) -> Socket {
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
    if domain == Domain::IPV6 {
        s.set_ip_transparent_v6(true).unwrap();
    } else {
        s.set_ip_transparent_v4(true).unwrap();
    }
    s.set_mark(CILIA_MARK_FROM_PROXY).unwrap();
    s
}

/// The upstream connection for `client`, from the client's own address
/// (another port than the client's: the two legs must not share a tuple).
fn upstream(client: SocketAddr, server: SocketAddr) -> TcpStream {
    for _ in 0..8 {
        let s = transparent_socket(Domain::for_address(server));
        s.bind(&SocketAddr::new(client.ip(), 0).into()).unwrap();
        if s.local_addr().unwrap().as_socket().unwrap().port() == client.port() {
            continue;
        }
        s.connect_timeout(&server.into(), WAIT).unwrap();
        return s.into();
    }
    panic!("no upstream port other than the client's {client}");
}

/// Copies `from` to `to` until EOF (or the bounded read timeout), then
/// closes `to` for writing.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(WAIT)).unwrap();
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}
