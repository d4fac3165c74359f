//! The node's own devices and routes for a cluster: the underlay device
//! (the one holding `--node-ip`), the VXLAN device in external mode, and
//! the routes that let the node's stack reach other nodes' pods.
//!
//! Why the stack needs routes at all, when endpoints' packets are
//! redirected by BPF: packets the node itself sends to a remote pod (the L7
//! proxy answering a client on another node, a node process) are routed by
//! the kernel. In overlay mode they go into the VXLAN device, which is
//! NOARP (no neighbour resolution on a device whose far end is chosen per
//! packet) and whose egress program sets the tunnel key; in native mode they
//! go via the other node's underlay address.
//!
//! Routes the agent installs carry [`ROUTE_PROTOCOL`], so a restarted agent
//! finds (and prunes) its own routes without touching anybody else's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::endpoint::rtnl::Rtnl;

/// The VXLAN device of overlay mode.
pub const VXLAN_DEVICE: &str = "cilia_vxlan";
/// The throwaway name of the Geneve probe device.
const GENEVE_PROBE_DEVICE: &str = "cilia_genprobe";
/// `rtm_protocol` of the routes the agent owns.
pub const ROUTE_PROTOCOL: u8 = 0xc1;
/// VXLAN's overhead over an IPv4 underlay: outer IPv4 (20) + UDP (8) +
/// VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// ... and over an IPv6 underlay (outer IPv6 is 40 bytes).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

#[derive(Debug, thiserror::Error)]
pub enum NodeNetError {
    #[error(
        "--node-ip {0}: no interface of this network namespace holds this address; \
         pass the node's underlay address (`ip -br addr` lists them)"
    )]
    NoUnderlay(IpAddr),
    #[error("{what}: {reason}")]
    Netlink { what: String, reason: String },
    #[error(
        "{VXLAN_DEVICE} exists but is a {kind} device, not vxlan: remove it (`ip link del {VXLAN_DEVICE}`)"
    )]
    WrongKind { kind: String },
}

fn nl(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeNetError {
    let what = what.into();
    move |e| NodeNetError::Netlink {
        what,
        reason: e.to_string(),
    }
}

fn open() -> Result<Rtnl, NodeNetError> {
    Rtnl::new(None).map_err(nl("opening netlink"))
}

/// The device that holds the node's underlay address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ip: IpAddr,
    pub ifname: String,
    pub ifindex: u32,
    pub mtu: u32,
}

impl Underlay {
    /// The MTU left to endpoints over a VXLAN tunnel on this underlay.
    pub fn vxlan_mtu(&self) -> u32 {
        let overhead = if self.ip.is_ipv4() {
            VXLAN_OVERHEAD_V4
        } else {
            VXLAN_OVERHEAD_V6
        };
        self.mtu.saturating_sub(overhead)
    }
}

/// Finds the interface holding `ip`.
pub fn find_underlay(ip: IpAddr) -> Result<Underlay, NodeNetError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NodeNetError::Netlink {
        what: "listing the node's addresses".into(),
        reason: e.to_string(),
    })?;
    let ifname = addrs
        .filter_map(|a| {
            let sa = a.address?;
            let found = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            (found == ip).then_some(a.interface_name)
        })
        .next()
        .ok_or(NodeNetError::NoUnderlay(ip))?;
    let link = open()?
        .link(&ifname)
        .map_err(nl(format!("reading {ifname}")))?
        .ok_or(NodeNetError::NoUnderlay(ip))?;
    Ok(Underlay {
        ip,
        ifname,
        ifindex: link.index,
        mtu: link.mtu.unwrap_or(1500),
    })
}

/// The address of the default route's device, for `--node-ip` unset.
pub fn default_node_ip() -> Option<IpAddr> {
    // A connected UDP socket sends nothing; the kernel only picks the
    // source address it would use toward a documentation address.
    for target in ["192.0.2.1:9", "[2001:db8::1]:9"] {
        let bind = if target.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        if let Ok(s) = std::net::UdpSocket::bind(bind) {
            if s.connect(target).is_ok() {
                if let Ok(local) = s.local_addr() {
                    if !local.ip().is_unspecified() {
                        return Some(local.ip());
                    }
                }
            }
        }
    }
    None
}

/// Creates (or adopts) the external-mode VXLAN device with `mtu`, NOARP
/// and up; returns its ifindex.
pub fn ensure_vxlan(port: u16, mtu: u32) -> Result<u32, NodeNetError> {
    let mut rtnl = open()?;
    let what = format!("setting up {VXLAN_DEVICE}");
    let link = match rtnl.link(VXLAN_DEVICE).map_err(nl(what.clone()))? {
        Some(link) => {
            let kind = link.kind.clone().unwrap_or_else(|| "plain".into());
            if kind != "vxlan" {
                return Err(NodeNetError::WrongKind { kind });
            }
            link
        }
        None => {
            rtnl.add_vxlan_external(VXLAN_DEVICE, port, mtu)
                .map_err(nl(format!(
                    "creating {VXLAN_DEVICE} (vxlan external, port {port})"
                )))?;
            info!(device = VXLAN_DEVICE, port, mtu, "VXLAN device created");
            rtnl.link(VXLAN_DEVICE)
                .map_err(nl(what.clone()))?
                .ok_or_else(|| NodeNetError::Netlink {
                    what: what.clone(),
                    reason: "the device vanished after its creation".into(),
                })?
        }
    };
    if link.mtu != Some(mtu) {
        rtnl.set_mtu(link.index, mtu).map_err(nl(what.clone()))?;
    }
    if !link.noarp {
        rtnl.set_noarp(link.index, true).map_err(nl(what.clone()))?;
    }
    rtnl.set_up(link.index).map_err(nl(what))?;
    Ok(link.index)
}

/// Removes the VXLAN device (absent is fine).
pub fn remove_vxlan() -> Result<(), NodeNetError> {
    let mut rtnl = open()?;
    if let Some(index) = rtnl
        .link_index(VXLAN_DEVICE)
        .map_err(nl(format!("finding {VXLAN_DEVICE}")))?
    {
        rtnl.delete_link(index)
            .map_err(nl(format!("deleting {VXLAN_DEVICE}")))?;
    }
    Ok(())
}

/// Whether this kernel can make an external-mode Geneve device (it has no
/// module on some machines): tried once, never faked.
pub fn geneve_available() -> Result<bool, String> {
    let mut rtnl = Rtnl::new(None).map_err(|e| e.to_string())?;
    rtnl.probe_geneve(GENEVE_PROBE_DEVICE)
        .map_err(|e| e.to_string())
}

/// How the node's stack reaches a remote pod range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteVia {
    /// Into the (NOARP) VXLAN device: its egress program adds the tunnel.
    Device(u32),
    /// Via a gateway (the other node's underlay address) out of a device.
    Gateway { ifindex: u32, gateway: IpAddr },
}

/// Makes the agent's routes exactly `desired`: replaces each, deletes the
/// agent's routes (by [`ROUTE_PROTOCOL`]) that are not wanted any more.
/// Returns how many were deleted. A route of a family the gateway cannot
/// serve (an IPv6 range via an IPv4 node address) is skipped with a warning.
pub fn sync_routes(desired: &BTreeMap<IpNet, RouteVia>) -> Result<usize, NodeNetError> {
    let mut rtnl = open()?;
    let mut kept = 0;
    for (net, via) in desired {
        let (index, gw) = match via {
            RouteVia::Device(i) => (*i, None),
            RouteVia::Gateway { ifindex, gateway } => {
                if gateway.is_ipv4() != net.addr().is_ipv4() {
                    warn!(range = %net, via = %gateway, "no route of this family via that node address");
                    continue;
                }
                (*ifindex, Some(*gateway))
            }
        };
        rtnl.replace_route(index, net.network(), net.prefix_len(), gw, ROUTE_PROTOCOL)
            .map_err(nl(format!("routing {net}")))?;
        kept += 1;
    }
    let installed = rtnl
        .routes_of_protocol(ROUTE_PROTOCOL)
        .map_err(nl("listing the agent's routes"))?;
    let mut deleted = 0;
    for (dst, len) in installed {
        let Ok(net) = IpNet::new(dst, len) else {
            continue;
        };
        if !desired.contains_key(&net) {
            rtnl.delete_route(dst, len)
                .map_err(nl(format!("removing the route to {net}")))?;
            deleted += 1;
        }
    }
    tracing::debug!(kept, deleted, "node routes synced");
    Ok(deleted)
}
