//! Network devices of endpoints: the veth pair, addresses and routes on
//! both sides, and the node's router addresses. Programmed through
//! iproute2's `ip -batch`, one process per namespace, inside the target
//! namespace (setns in the child).
//!
//! Invariant: an endpoint's namespace is opened once ([`open_netns`]) and
//! referred to by that fd from then on; batch text holds only names and
//! addresses the agent generated or validated, never a caller's path.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// The node's device holding the router addresses: one end of a veth pair
/// (`cilia_host` / `cilia_net`), which, unlike a dummy device, exists in
/// every kernel that runs cilia at all.
pub const ROUTER_DEVICE: &str = "cilia_host";
const ROUTER_PEER: &str = "cilia_net";

const NSFS_MAGIC: i64 = 0x6e736673;

/// The network namespace the agent itself runs in.
pub const AGENT_NETNS: &str = "/proc/self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("netns {name:?}: {reason}")]
    Netns { name: String, reason: String },
    #[error("interface {ifname} already exists in netns {netns}")]
    IfnameTaken { ifname: String, netns: String },
    #[error("{what}: ip: {stderr}")]
    Ip { what: String, stderr: String },
}

/// An endpoint's network namespace, opened once and held by fd from then
/// on: every later step refers to this fd (setns, or `/proc/self/fd/N` in
/// the `ip` child), never to the caller's path again, so a path that is
/// swapped or that carries shell/batch syntax cannot redirect what is done.
#[derive(Debug, Clone)]
pub struct Netns {
    /// The path as given (validated), for records and messages only.
    pub path: PathBuf,
    pub file: Arc<File>,
}

/// The fd number the namespace file has in an `ip` child process.
const CHILD_NETNS_FD: RawFd = 3;

fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// Resolves a namespace given as a name (under /run/netns) or a path, opens
/// it once and checks the opened file: a network namespace, and not the
/// one the agent itself runs in (`agent_netns`, normally
/// `/proc/self/ns/net`): wiring an endpoint into the node's own namespace
/// would give a caller the node's devices.
pub fn open_netns(name: &str, agent_netns: &Path) -> Result<Netns, NetdevError> {
    let excerpt: String = name.chars().take(64).collect();
    let err = |reason: String| NetdevError::Netns {
        name: excerpt.clone(),
        reason,
    };
    if name.is_empty() {
        return Err(err("empty name".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(err("contains a control character".into()));
    }
    if name.len() > 4096 {
        return Err(err("longer than 4096 bytes".into()));
    }
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err(format!("not found ({})", path.display())))
        }
        Err(e) => return Err(err(format!("{}: {e}", path.display()))),
    };
    let fs =
        nix::sys::statfs::fstatfs(&file).map_err(|e| err(format!("{}: {e}", path.display())))?;
    if fs.filesystem_type().0 != NSFS_MAGIC {
        return Err(err(format!("{} is not a namespace file", path.display())));
    }
    let meta = file
        .metadata()
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    let own = std::fs::metadata(agent_netns).map_err(|e| {
        err(format!(
            "reading the agent's own netns {}: {e}",
            agent_netns.display()
        ))
    })?;
    if file_id(&meta) == file_id(&own) {
        return Err(err(
            "is the agent's own network namespace; an endpoint needs a namespace of its own".into(),
        ));
    }
    Ok(Netns {
        path,
        file: Arc::new(file),
    })
}

/// Everything needed to wire one endpoint.
#[derive(Debug, Clone)]
pub struct VethSpec {
    pub netns: Netns,
    pub host_ifname: String,
    pub host_mac: [u8; 6],
    pub ifname: String,
    pub mac: [u8; 6],
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub router6: Ipv6Addr,
    pub router4: Option<Ipv4Addr>,
}

/// The operations on devices the endpoint manager needs; a trait so its
/// bookkeeping is testable without root.
pub trait Netdev: Send {
    /// Creates and configures the pair; returns the host side's ifindex.
    fn create(&mut self, spec: &VethSpec) -> Result<u32, NetdevError>;
    /// Deletes the host side (and so the pair). Absent is not an error.
    fn delete(&mut self, host_ifname: &str) -> Result<(), NetdevError>;
    /// ifindex of a host-side device, if it exists.
    fn ifindex(&self, host_ifname: &str) -> Option<u32>;
    /// Every address of the node's network namespace (the one the agent
    /// runs in), all interfaces, both families.
    fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError>;
    /// Ensures the node's router addresses exist.
    fn ensure_router(
        &mut self,
        router6: Ipv6Addr,
        router4: Option<Ipv4Addr>,
    ) -> Result<(), NetdevError>;
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `ip -batch -` with `script`, inside namespace `setns_to` when
/// given; `pass` is handed to the child as fd 3 (`/proc/self/fd/3` in the
/// script). The script never holds a caller's path.
fn ip_batch(
    setns_to: Option<&File>,
    pass: Option<&File>,
    script: &str,
    what: &str,
) -> Result<(), NetdevError> {
    let mut cmd = Command::new("ip");
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(file) = setns_to {
        let file = file.try_clone().map_err(|e| NetdevError::Ip {
            what: what.to_string(),
            stderr: format!("duplicating the netns fd: {e}"),
        })?;
        // SAFETY: between fork and exec only setns(2) runs, an
        // async-signal-safe system call on an fd opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    if let Some(file) = pass {
        let fd = file.as_raw_fd();
        // SAFETY: only dup2(2)/fcntl(2) run between fork and exec (both
        // async-signal safe) on an fd the caller keeps open for the call.
        // The copy at CHILD_NETNS_FD has no close-on-exec flag, so `ip`
        // inherits it.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if fd == CHILD_NETNS_FD {
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(fd, CHILD_NETNS_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let ip_err = |stderr: String| NetdevError::Ip {
        what: what.to_string(),
        stderr,
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| ip_err(format!("cannot run ip (iproute2): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| ip_err(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ip_err(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with("Command failed"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ip_err(stderr));
    }
    Ok(())
}

/// The real implementation, through iproute2.
#[derive(Debug, Default)]
pub struct IpRoute;

impl Netdev for IpRoute {
    fn create(&mut self, spec: &VethSpec) -> Result<u32, NetdevError> {
        let tmp = format!("tmp{}", spec.host_ifname);
        let tmp = &tmp[..tmp.len().min(15)];
        let ns = &spec.netns.file;
        ip_batch(
            None,
            Some(ns),
            &format!(
                "link add {host} address {hmac} type veth peer name {tmp} address {cmac} netns /proc/self/fd/{CHILD_NETNS_FD}\n",
                host = spec.host_ifname,
                hmac = format_mac(&spec.host_mac),
                cmac = format_mac(&spec.mac),
            ),
            &format!("creating veth {}", spec.host_ifname),
        )?;
        let result = (|| {
            ip_batch(
                Some(ns),
                None,
                &format!("link set {tmp} name {}\n", spec.ifname),
                "naming the endpoint interface",
            )
            .map_err(|e| match e {
                NetdevError::Ip { ref stderr, .. } if stderr.contains("File exists") => {
                    NetdevError::IfnameTaken {
                        ifname: spec.ifname.clone(),
                        netns: spec.netns.path.display().to_string(),
                    }
                }
                other => other,
            })?;
            let mut inner = format!(
                "addr add {v6}/128 dev {ifname} nodad\n\
                 link set lo up\n\
                 link set {ifname} up\n\
                 route add {r6}/128 dev {ifname}\n\
                 route add default via {r6} dev {ifname}\n",
                ifname = spec.ifname,
                v6 = spec.ipv6,
                r6 = spec.router6,
            );
            if let (Some(v4), Some(r4)) = (spec.ipv4, spec.router4) {
                inner.push_str(&format!(
                    "addr add {v4}/32 dev {ifname}\n\
                     route add {r4}/32 dev {ifname} scope link\n\
                     route add default via {r4} dev {ifname}\n",
                    ifname = spec.ifname
                ));
            }
            ip_batch(Some(ns), None, &inner, "configuring the endpoint side")?;
            let mut host = format!(
                "link set {host} up\nroute add {v6}/128 dev {host}\n",
                host = spec.host_ifname,
                v6 = spec.ipv6
            );
            if let Some(v4) = spec.ipv4 {
                host.push_str(&format!("route add {v4}/32 dev {}\n", spec.host_ifname));
            }
            ip_batch(None, None, &host, "configuring the host side")?;
            self.ifindex(&spec.host_ifname)
                .ok_or_else(|| NetdevError::Ip {
                    what: format!("reading ifindex of {}", spec.host_ifname),
                    stderr: "device vanished".into(),
                })
        })();
        if result.is_err() {
            let _ = self.delete(&spec.host_ifname);
        }
        result
    }

    fn delete(&mut self, host_ifname: &str) -> Result<(), NetdevError> {
        if self.ifindex(host_ifname).is_none() {
            return Ok(());
        }
        ip_batch(
            None,
            None,
            &format!("link del {host_ifname}\n"),
            &format!("deleting {host_ifname}"),
        )
    }

    fn ifindex(&self, host_ifname: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(host_ifname).ok()
    }

    fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetdevError::Ip {
            what: "listing the node's addresses".into(),
            stderr: e.to_string(),
        })?;
        let mut out: Vec<IpAddr> = addrs
            .filter_map(|a| {
                let sa = a.address?;
                if let Some(v4) = sa.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn ensure_router(
        &mut self,
        router6: Ipv6Addr,
        router4: Option<Ipv4Addr>,
    ) -> Result<(), NetdevError> {
        if self.ifindex(ROUTER_DEVICE).is_none() {
            ip_batch(
                None,
                None,
                &format!(
                    "link add {ROUTER_DEVICE} type veth peer name {ROUTER_PEER}\n\
                     link set {ROUTER_DEVICE} up\nlink set {ROUTER_PEER} up\n"
                ),
                "creating the router device",
            )?;
        }
        let mut script = format!("addr replace {router6}/128 dev {ROUTER_DEVICE} nodad\n");
        if let Some(r4) = router4 {
            script.push_str(&format!("addr replace {r4}/32 dev {ROUTER_DEVICE}\n"));
        }
        ip_batch(None, None, &script, "addressing the router device")
    }
}

/// Locally administered, unicast MAC derived from an endpoint id; `host`
/// distinguishes the two ends of the pair.
pub fn endpoint_mac(id: u16, host: bool) -> [u8; 6] {
    let [hi, lo] = id.to_be_bytes();
    [0x0a, 0xc1, if host { 0x01 } else { 0x00 }, 0x00, hi, lo]
}

/// Host-side device name of an endpoint.
pub fn host_ifname(id: u16) -> String {
    format!("lxc{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any nsfs file other than the agent's own network namespace stands in
    /// for "another namespace" without root.
    const OTHER_NS: &str = "/proc/self/ns/uts";

    #[test]
    fn the_agents_own_network_namespace_is_refused() {
        let err = open_netns("/proc/self/ns/net", Path::new(AGENT_NETNS)).unwrap_err();
        assert!(
            err.to_string().contains("agent's own network namespace"),
            "{err}"
        );
    }

    #[test]
    fn another_namespace_file_is_opened_and_held() {
        let ns = open_netns("/proc/self/ns/net", Path::new(OTHER_NS)).unwrap();
        assert_eq!(ns.path, Path::new("/proc/self/ns/net"));
        assert!(ns.file.metadata().is_ok());
    }

    #[test]
    fn a_netns_path_with_a_control_character_is_refused_before_it_is_opened() {
        for bad in ["/run/netns/x\nlink del cilia_host", "a\tb", "x\u{7f}"] {
            let err = open_netns(bad, Path::new(OTHER_NS)).unwrap_err();
            assert!(err.to_string().contains("control character"), "{err}");
        }
    }

    #[test]
    fn node_addresses_include_loopback() {
        let addrs = IpRoute.node_addresses().unwrap();
        // Loopback has 127.0.0.1 wherever it is up; a test namespace may
        // have it down, so accept an empty list there.
        if !addrs.is_empty() {
            assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let err = open_netns("/proc/self/status", Path::new(OTHER_NS)).unwrap_err();
        assert!(err.to_string().contains("not a namespace file"), "{err}");
    }
}
