//! Network devices of endpoints: the veth pair, addresses and routes on
//! both sides, and the node's router addresses. Programmed in-process over
//! rtnetlink ([`crate::endpoint::rtnl`]): no `ip` process, no text to parse.
//!
//! Invariant: an endpoint's namespace is opened once ([`open_netns`]) and
//! referred to by that fd from then on (the veth peer is created in it by
//! `IFLA_NET_NS_FD`; its netlink socket is made on a thread that entered
//! it by fd); no caller's path is used after the open.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::endpoint::rtnl::{Rtnl, VethEnd};

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
    #[error("{what}: {reason}")]
    Netlink { what: String, reason: String },
}

/// An endpoint's network namespace, opened once and held by fd from then
/// on: every later step refers to this fd, never to the caller's path
/// again, so a path that is swapped afterwards cannot redirect what is done.
#[derive(Debug, Clone)]
pub struct Netns {
    /// The path as given (validated), for records and messages only.
    pub path: PathBuf,
    pub file: Arc<File>,
}

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
    /// The MTU of both ends (`None`: the kernel's default): below the
    /// underlay's by the tunnel's overhead in overlay mode.
    pub mtu: Option<u32>,
}

/// The operations on devices the endpoint manager needs; a trait so its
/// bookkeeping is testable without root. Shared (`&self`, `Sync`): creating
/// one endpoint's devices runs outside the endpoints' lock, beside
/// other endpoints' (each touches only its own devices).
pub trait Netdev: Send + Sync {
    /// Creates and configures the pair; returns the host side's ifindex.
    fn create(&self, spec: &VethSpec) -> Result<u32, NetdevError>;
    /// Deletes the host side (and so the pair). Absent is not an error.
    fn delete(&self, host_ifname: &str) -> Result<(), NetdevError>;
    /// ifindex of a host-side device, if it exists.
    fn ifindex(&self, host_ifname: &str) -> Option<u32>;
    /// Every address of the node's network namespace (the one the agent
    /// runs in), all interfaces, both families.
    fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError>;
    /// Ensures the node's router addresses exist.
    fn ensure_router(
        &self,
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

/// What failed, as a [`NetdevError`].
fn nl_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetdevError {
    let what = what.into();
    move |e| NetdevError::Netlink {
        what,
        reason: e.to_string(),
    }
}

/// The real implementation: rtnetlink in-process (see [`crate::endpoint::rtnl`]).
#[derive(Debug, Default)]
pub struct Rtnetlink;

impl Rtnetlink {
    /// Everything inside the endpoint's namespace: name, addresses, routes.
    fn configure_endpoint_side(spec: &VethSpec, tmp: &str) -> Result<(), NetdevError> {
        let mut ns = Rtnl::new(Some(&spec.netns.file))
            .map_err(nl_err("opening netlink in the endpoint's netns"))?;
        let index = ns
            .link_index(tmp)
            .map_err(nl_err(format!("finding {tmp} in the endpoint's netns")))?
            .ok_or_else(|| NetdevError::Netlink {
                what: format!("finding {tmp} in the endpoint's netns"),
                reason: "not there".into(),
            })?;
        ns.rename(index, &spec.ifname).map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EEXIST) {
                NetdevError::IfnameTaken {
                    ifname: spec.ifname.clone(),
                    netns: spec.netns.path.display().to_string(),
                }
            } else {
                nl_err("naming the endpoint interface")(e)
            }
        })?;
        let what = "configuring the endpoint side";
        ns.add_address(index, IpAddr::V6(spec.ipv6), 128, false)
            .map_err(nl_err(what))?;
        if let Some(lo) = ns.link_index("lo").map_err(nl_err(what))? {
            ns.set_up(lo).map_err(nl_err(what))?;
        }
        ns.set_up(index).map_err(nl_err(what))?;
        let r6 = IpAddr::V6(spec.router6);
        ns.add_route(index, r6, 128, None).map_err(nl_err(what))?;
        ns.add_route(index, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0, Some(r6))
            .map_err(nl_err(what))?;
        if let (Some(v4), Some(r4)) = (spec.ipv4, spec.router4) {
            let r4 = IpAddr::V4(r4);
            ns.add_address(index, IpAddr::V4(v4), 32, false)
                .map_err(nl_err(what))?;
            ns.add_route(index, r4, 32, None).map_err(nl_err(what))?;
            ns.add_route(index, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, Some(r4))
                .map_err(nl_err(what))?;
        }
        Ok(())
    }
}

impl Netdev for Rtnetlink {
    fn create(&self, spec: &VethSpec) -> Result<u32, NetdevError> {
        let tmp = format!("tmp{}", spec.host_ifname);
        let tmp = &tmp[..tmp.len().min(15)];
        let mut host = Rtnl::new(None).map_err(nl_err("opening netlink"))?;
        host.add_veth(
            &VethEnd {
                name: &spec.host_ifname,
                mac: Some(spec.host_mac),
                mtu: spec.mtu,
                netns: None,
            },
            &VethEnd {
                name: tmp,
                mac: Some(spec.mac),
                mtu: spec.mtu,
                netns: Some(&spec.netns.file),
            },
        )
        .map_err(nl_err(format!("creating veth {}", spec.host_ifname)))?;
        let result = (|| {
            Self::configure_endpoint_side(spec, tmp)?;
            let what = "configuring the host side";
            let index = self
                .ifindex(&spec.host_ifname)
                .ok_or_else(|| NetdevError::Netlink {
                    what: format!("reading ifindex of {}", spec.host_ifname),
                    reason: "device vanished".into(),
                })?;
            host.set_up(index).map_err(nl_err(what))?;
            host.add_route(index, IpAddr::V6(spec.ipv6), 128, None)
                .map_err(nl_err(what))?;
            if let Some(v4) = spec.ipv4 {
                host.add_route(index, IpAddr::V4(v4), 32, None)
                    .map_err(nl_err(what))?;
            }
            Ok(index)
        })();
        if result.is_err() {
            let _ = self.delete(&spec.host_ifname);
        }
        result
    }

    fn delete(&self, host_ifname: &str) -> Result<(), NetdevError> {
        let Some(index) = self.ifindex(host_ifname) else {
            return Ok(());
        };
        let what = format!("deleting {host_ifname}");
        match Rtnl::new(None).and_then(|mut nl| nl.delete_link(index)) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err(what)(e)),
        }
    }

    fn ifindex(&self, host_ifname: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(host_ifname).ok()
    }

    fn node_addresses(&self) -> Result<Vec<IpAddr>, NetdevError> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetdevError::Netlink {
            what: "listing the node's addresses".into(),
            reason: e.to_string(),
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
        &self,
        router6: Ipv6Addr,
        router4: Option<Ipv4Addr>,
    ) -> Result<(), NetdevError> {
        let mut nl = Rtnl::new(None).map_err(nl_err("opening netlink"))?;
        let what = "creating the router device";
        if self.ifindex(ROUTER_DEVICE).is_none() {
            nl.add_veth(
                &VethEnd {
                    name: ROUTER_DEVICE,
                    mac: None,
                    mtu: None,
                    netns: None,
                },
                &VethEnd {
                    name: ROUTER_PEER,
                    mac: None,
                    mtu: None,
                    netns: None,
                },
            )
            .map_err(nl_err(what))?;
        }
        for name in [ROUTER_DEVICE, ROUTER_PEER] {
            if let Some(index) = self.ifindex(name) {
                nl.set_up(index).map_err(nl_err(what))?;
            }
        }
        let index = self
            .ifindex(ROUTER_DEVICE)
            .ok_or_else(|| NetdevError::Netlink {
                what: what.into(),
                reason: format!("{ROUTER_DEVICE} vanished"),
            })?;
        let what = "addressing the router device";
        nl.add_address(index, IpAddr::V6(router6), 128, true)
            .map_err(nl_err(what))?;
        if let Some(r4) = router4 {
            nl.add_address(index, IpAddr::V4(r4), 32, true)
                .map_err(nl_err(what))?;
        }
        Ok(())
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
        let addrs = Rtnetlink.node_addresses().unwrap();
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
