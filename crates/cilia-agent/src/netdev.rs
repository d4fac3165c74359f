//! Network devices of endpoints: the veth pair, addresses and routes on
//! both sides, and the node's router addresses. Programmed through
//! iproute2's `ip -batch`, one process per namespace, inside the target
//! namespace (setns in the child), so any namespace path works.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The node's device holding the router addresses: one end of a veth pair
/// (`cilia_host` / `cilia_net`), which, unlike a dummy device, exists in
/// every kernel that runs cilia at all.
pub const ROUTER_DEVICE: &str = "cilia_host";
const ROUTER_PEER: &str = "cilia_net";

const NSFS_MAGIC: i64 = 0x6e736673;

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("netns {name:?}: {reason}")]
    Netns { name: String, reason: String },
    #[error("interface {ifname} already exists in netns {netns}")]
    IfnameTaken { ifname: String, netns: String },
    #[error("{what}: ip: {stderr}")]
    Ip { what: String, stderr: String },
}

/// Resolves a namespace given as a name (under /run/netns) or a path, and
/// checks that it is a network namespace file.
pub fn resolve_netns(name: &str) -> Result<PathBuf, NetdevError> {
    let err = |reason: String| NetdevError::Netns {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(err("empty name".into()));
    }
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    };
    if !path.exists() {
        return Err(err(format!("not found ({})", path.display())));
    }
    let fs =
        nix::sys::statfs::statfs(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    if fs.filesystem_type().0 != NSFS_MAGIC {
        return Err(err(format!("{} is not a namespace file", path.display())));
    }
    Ok(path)
}

/// Everything needed to wire one endpoint.
#[derive(Debug, Clone)]
pub struct VethSpec {
    pub netns: PathBuf,
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

/// Runs `ip -batch -` with `script`, inside `netns` when given.
fn ip_batch(netns: Option<&Path>, script: &str, what: &str) -> Result<(), NetdevError> {
    let mut cmd = Command::new("ip");
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(path) = netns {
        let file = std::fs::File::open(path).map_err(|e| NetdevError::Netns {
            name: path.display().to_string(),
            reason: e.to_string(),
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
        ip_batch(
            None,
            &format!(
                "link add {host} address {hmac} type veth peer name {tmp} address {cmac} netns {ns}\n",
                host = spec.host_ifname,
                hmac = format_mac(&spec.host_mac),
                cmac = format_mac(&spec.mac),
                ns = spec.netns.display(),
            ),
            &format!("creating veth {}", spec.host_ifname),
        )?;
        let result = (|| {
            ip_batch(
                Some(&spec.netns),
                &format!("link set {tmp} name {}\n", spec.ifname),
                "naming the endpoint interface",
            )
            .map_err(|e| match e {
                NetdevError::Ip { ref stderr, .. } if stderr.contains("File exists") => {
                    NetdevError::IfnameTaken {
                        ifname: spec.ifname.clone(),
                        netns: spec.netns.display().to_string(),
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
            ip_batch(Some(&spec.netns), &inner, "configuring the endpoint side")?;
            let mut host = format!(
                "link set {host} up\nroute add {v6}/128 dev {host}\n",
                host = spec.host_ifname,
                v6 = spec.ipv6
            );
            if let Some(v4) = spec.ipv4 {
                host.push_str(&format!("route add {v4}/32 dev {}\n", spec.host_ifname));
            }
            ip_batch(None, &host, "configuring the host side")?;
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
            &format!("link del {host_ifname}\n"),
            &format!("deleting {host_ifname}"),
        )
    }

    fn ifindex(&self, host_ifname: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(host_ifname).ok()
    }

    fn ensure_router(
        &mut self,
        router6: Ipv6Addr,
        router4: Option<Ipv4Addr>,
    ) -> Result<(), NetdevError> {
        if self.ifindex(ROUTER_DEVICE).is_none() {
            ip_batch(
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
        ip_batch(None, &script, "addressing the router device")
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
