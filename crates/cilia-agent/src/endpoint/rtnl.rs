//! A small synchronous rtnetlink client: typed messages
//! (`netlink-packet-route`) over a `NETLINK_ROUTE` socket, one request at a
//! time, each acknowledged. A socket belongs to the network namespace it
//! was created in, so [`Rtnl::new`] with a namespace fd creates the socket
//! on a short-lived thread that entered that namespace: no thread of the
//! agent ever changes namespace, and no path is involved after the fd.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoGeneve, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

/// One end of a veth pair to create.
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: Option<[u8; 6]>,
    /// The MTU (default: the kernel's, 1500).
    pub mtu: Option<u32>,
    /// The namespace it is created in (default: the socket's).
    pub netns: Option<&'a File>,
}

pub(crate) fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// A main-table unicast route to `dst/len` out of interface `index`, via
/// `gateway` when given, else on-link (scope link for IPv4, as iproute2
/// does); `len` 0 is the default route.
fn route_message(
    index: u32,
    dst: IpAddr,
    len: u8,
    gateway: Option<IpAddr>,
    protocol: RouteProtocol,
) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst);
    msg.header.destination_prefix_length = len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = protocol;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if dst.is_ipv4() && gateway.is_none() {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(route_address(dst)));
    }
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(route_address(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

fn link_attributes(end: &VethEnd<'_>) -> Vec<LinkAttribute> {
    let mut attrs = vec![LinkAttribute::IfName(end.name.to_string())];
    if let Some(mac) = end.mac {
        attrs.push(LinkAttribute::Address(mac.to_vec()));
    }
    if let Some(mtu) = end.mtu {
        attrs.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(ns) = end.netns {
        attrs.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
    }
    attrs
}

/// A link as the kernel reports it (the few attributes the agent reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mtu: Option<u32>,
    /// `IFLA_INFO_KIND` (e.g. "vxlan", "veth"); `None` for plain devices.
    pub kind: Option<String>,
    pub noarp: bool,
}

impl Rtnl {
    /// A socket in `netns` (held by fd), or in the agent's own namespace.
    pub fn new(netns: Option<&File>) -> io::Result<Self> {
        let open = || -> io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            Ok(socket)
        };
        let socket = match netns {
            None => open()?,
            Some(ns) => std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(io::Error::from)?;
                        open()
                    })
                    .join()
                    .map_err(|_| io::Error::other("netlink socket thread panicked"))?
            })?,
        };
        Ok(Self { socket, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement; returns the
    /// messages the kernel answered with before it.
    pub(crate) fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut answers = Vec::new();
        let mut rx = vec![0u8; 65536];
        // Bounded: a request gets its ack; anything else is another
        // request's leftovers (never, with one request at a time).
        for _ in 0..64 {
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    // The end of a dump (which gets no acknowledgement).
                    NetlinkPayload::Done(_) => return Ok(answers),
                    _ => {}
                }
            }
        }
        Err(io::Error::other("no netlink acknowledgement"))
    }

    /// The index of interface `name` in this socket's namespace.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link named `name` with its MTU and kind, if it exists.
    pub fn link(&mut self, name: &str) -> io::Result<Option<LinkState>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let answers = match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(a) => a,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => {
                let mut state = LinkState {
                    index: l.header.index,
                    mtu: None,
                    kind: None,
                    noarp: l.header.flags.contains(LinkFlags::Noarp),
                };
                for a in &l.attributes {
                    match a {
                        LinkAttribute::Mtu(m) => state.mtu = Some(*m),
                        LinkAttribute::LinkInfo(infos) => {
                            for i in infos {
                                if let LinkInfo::Kind(k) = i {
                                    state.kind = Some(k.to_string());
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Some(state)
            }
            _ => None,
        }))
    }

    /// Creates a VXLAN device in external (collect-metadata) mode on UDP
    /// `port`: the BPF programs set each packet's tunnel key; the kernel
    /// learns nothing (no FDB learning).
    pub fn add_vxlan_external(&mut self, name: &str, port: u16, mtu: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Port(port),
                InfoVxlan::Learning(false),
            ])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(|_| ())
    }

    /// Tries to create (and at once deletes) an external-mode Geneve
    /// device: `Ok(false)` when the kernel has no Geneve support.
    pub fn probe_geneve(&mut self, name: &str) -> io::Result<bool> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Geneve),
            LinkInfo::Data(InfoData::Geneve(vec![InfoGeneve::CollectMetadata])),
        ]));
        match self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => {
                if let Some(index) = self.link_index(name)? {
                    self.delete_link(index)?;
                }
                Ok(true)
            }
            // "Unknown device type": no driver, and none could be loaded.
            Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets the MTU of interface `index`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(|_| ())
    }

    /// Sets or clears `IFF_NOARP` on interface `index`.
    pub fn set_noarp(&mut self, index: u32, noarp: bool) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if noarp {
            msg.header.flags = LinkFlags::Noarp;
        }
        msg.header.change_mask = LinkFlags::Noarp;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(|_| ())
    }

    /// Creates a veth pair; the peer may be created in another namespace.
    pub fn add_veth(&mut self, local: &VethEnd<'_>, peer: &VethEnd<'_>) -> io::Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = link_attributes(peer);
        let mut msg = LinkMessage::default();
        msg.attributes = link_attributes(local);
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(|_| ())
    }

    /// Renames interface `index`.
    pub fn rename(&mut self, index: u32, name: &str) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(|_| ())
    }

    /// Sets interface `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map(|_| ())
    }

    /// Deletes interface `index` (and so a veth pair).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), 0)
            .map(|_| ())
    }

    /// Adds (or with `replace`, replaces) a host address `ip/len` on
    /// interface `index`, without duplicate address detection.
    pub fn add_address(
        &mut self,
        index: u32,
        ip: IpAddr,
        len: u8,
        replace: bool,
    ) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(ip);
        msg.header.prefix_len = len;
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        if ip.is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        } else {
            msg.attributes.push(AddressAttribute::Local(ip));
        }
        msg.attributes.push(AddressAttribute::Address(ip));
        let flags = if replace {
            NLM_F_CREATE | NLM_F_REPLACE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        self.request(RouteNetlinkMessage::NewAddress(msg), flags)
            .map(|_| ())
    }

    /// Creates or replaces the main-table route to `dst/len` out of
    /// interface `index` (via `gateway` when given, else on-link), tagged
    /// with `protocol` so the agent can find its own routes again.
    pub fn replace_route(
        &mut self,
        index: u32,
        dst: IpAddr,
        len: u8,
        gateway: Option<IpAddr>,
        protocol: u8,
    ) -> io::Result<()> {
        let msg = route_message(index, dst, len, gateway, RouteProtocol::from(protocol));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// The main-table routes tagged with `protocol`: (destination, length).
    pub fn routes_of_protocol(&mut self, protocol: u8) -> io::Result<Vec<(IpAddr, u8)>> {
        let mut out = Vec::new();
        for af in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = af;
            let answers = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
            for m in answers {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                if r.header.protocol != RouteProtocol::from(protocol)
                    || r.header.table != RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                if let Some(dst) = dst {
                    out.push((dst, r.header.destination_prefix_length));
                }
            }
        }
        Ok(out)
    }

    /// Deletes the main-table route to `dst/len`. Absent is not an error.
    pub fn delete_route(&mut self, dst: IpAddr, len: u8) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst);
        msg.header.destination_prefix_length = len;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.scope = RouteScope::NoWhere;
        msg.attributes
            .push(RouteAttribute::Destination(route_address(dst)));
        match self.request(RouteNetlinkMessage::DelRoute(msg), 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds a route to `dst/len` out of interface `index`, via `gateway`
    /// when given (else on-link: scope link for IPv4, as iproute2 does).
    pub fn add_route(
        &mut self,
        index: u32,
        dst: IpAddr,
        len: u8,
        gateway: Option<IpAddr>,
    ) -> io::Result<()> {
        let msg = route_message(index, dst, len, gateway, RouteProtocol::Boot);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }
}
