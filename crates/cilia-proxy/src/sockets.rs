//! The proxy's sockets: transparent listeners and upstream connections. Every
//! socket carries `SO_MARK = CILIA_MARK_FROM_PROXY`, which is what lets the
//! datapath recognise the proxy's packets (a veth scrubs the mark, so a
//! container cannot forge it).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The mark of every socket the proxy owns.
pub const MARK: u32 = cilia_abi::CILIA_MARK_FROM_PROXY;

/// How often a transparent bind is retried when the kernel hands out the
/// client's own source port (the upstream 4-tuple would then mirror the
/// client's).
const BIND_ATTEMPTS: usize = 8;

fn setsockopt_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the fd is a valid open socket (borrowed for the call), and the
    // option value is a c_int whose size is passed alongside its address.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SO_MARK` (needs CAP_NET_ADMIN).
pub fn set_mark(sock: &impl AsRawFd, mark: u32) -> io::Result<()> {
    setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// Sets `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (needs CAP_NET_ADMIN): the
/// socket may accept connections to, and bind to, addresses that are not the
/// node's own.
fn set_transparent(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(sock, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        setsockopt_int(sock, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn tcp_socket(addr: &SocketAddr) -> io::Result<Socket> {
    // The OS error is kept as is: EAFNOSUPPORT tells a node without IPv6.
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    set_mark(&sock, MARK).map_err(|e| context("SO_MARK", e))?;
    Ok(sock)
}

/// A transparent listener on `addr` (`[::]` is IPv6-only).
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = tcp_socket(&addr)?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    set_transparent(&sock, addr.is_ipv6()).map_err(|e| context("IP_TRANSPARENT", e))?;
    sock.bind(&addr.into()).map_err(|e| context("bind", e))?;
    sock.listen(1024).map_err(|e| context("listen", e))?;
    TcpListener::from_std(sock.into())
}

/// Connects to `dst`, from the client's own address when `client` is given
/// (a transparent bind to its IP with a fresh port that differs from the
/// client's), else from the node's address. Bounded by `timeout`.
pub async fn connect_upstream(
    dst: SocketAddr,
    client: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    for _ in 0..BIND_ATTEMPTS {
        let sock = tcp_socket(&dst)?;
        if let Some(client) = client {
            set_transparent(&sock, dst.is_ipv6()).map_err(|e| context("IP_TRANSPARENT", e))?;
            let from = SocketAddr::new(client.ip(), 0);
            sock.bind(&from.into())
                .map_err(|e| context(&format!("bind {from}"), e))?;
            let bound = sock.local_addr()?.as_socket();
            if bound.map(|a| a.port()) == Some(client.port()) {
                continue;
            }
        }
        sock.set_tcp_nodelay(true)?;
        let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        return match tokio::time::timeout(timeout, sock.connect(dst)).await {
            Ok(result) => result.map_err(|e| context(&format!("connect {dst}"), e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect {dst}: no answer within {timeout:?}"),
            )),
        };
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("bind: the kernel gave the client's own port {BIND_ATTEMPTS} times"),
    ))
}

/// Raises the open-file limit to its hard limit and returns the new soft
/// limit: every proxied connection holds two sockets, and the usual soft
/// limit of 1024 would let one client's few hundred connections starve
/// every other endpoint's L7 traffic.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
