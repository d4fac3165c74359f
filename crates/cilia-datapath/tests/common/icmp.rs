//! ICMP errors for the load balancer fixtures: built from the packet they
//! quote, and read back with every checksum recomputed, so a fixture can
//! say what the client's stack will see.

use std::net::{IpAddr, SocketAddr};

use cilia_datapath::packet::*;

/// Which error: its ICMP type and code for each family.
#[derive(Debug, Clone, Copy)]
pub enum IcmpError {
    /// Port unreachable (ICMP 3/3, ICMPv6 1/4).
    PortUnreachable,
    /// Fragmentation needed / packet too big, with the next-hop MTU.
    TooBig(u16),
    /// TTL / hop limit exceeded in transit (ICMP 11/0, ICMPv6 3/0).
    TimeExceeded,
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet,
/// Ethernet header excluded), as much of it as a router quotes (the IPv4
/// minimum of 576 bytes in all, the IPv6 one of 1280).
pub fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    kind: IcmpError,
    quoted: &[u8],
    from: (Mac, Mac),
) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (ty, code, word): (u8, u8, u32) = match (kind, v6) {
        (IcmpError::PortUnreachable, false) => (3, 3, 0),
        (IcmpError::PortUnreachable, true) => (1, 4, 0),
        (IcmpError::TooBig(mtu), false) => (3, 4, u32::from(mtu)),
        (IcmpError::TooBig(mtu), true) => (2, 0, u32::from(mtu)),
        (IcmpError::TimeExceeded, false) => (11, 0, 0),
        (IcmpError::TimeExceeded, true) => (3, 0, 0),
    };
    let room = if v6 { 1280 - 48 } else { 576 - 28 };
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&word.to_be_bytes());
    icmp.extend_from_slice(&quoted[..quoted.len().min(room)]);
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let sum = icmpv6_checksum(s, d, &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            eth(
                from.1,
                from.0,
                ETH_P_IPV6,
                &ipv6(s, d, IPPROTO_ICMPV6, 64, &icmp),
            )
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            eth(from.1, from.0, ETH_P_IP, &ipv4(s, d, 1, 64, &icmp))
        }
        _ => unreachable!("one family"),
    }
}

/// An ICMP error as read back: the outer addresses, the quoted packet's
/// addresses and ports, and whether each checksum is right.
#[derive(Debug)]
pub struct IcmpSeen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub quoted_src: SocketAddr,
    pub quoted_dst: SocketAddr,
    /// The outer IPv4 header's (true for IPv6).
    pub ip_ok: bool,
    /// The ICMP checksum (ICMPv6: with the pseudo-header).
    pub icmp_ok: bool,
    /// The quoted IPv4 header's (true for IPv6).
    pub quoted_ip_ok: bool,
    /// The quoted TCP/UDP checksum over the quoted pseudo-header (the quote
    /// must be the whole packet; a UDP/IPv4 checksum 0 counts as right).
    pub quoted_l4_ok: bool,
}

/// Reads an ICMP error of [`icmp_error`]'s shape (no options, no
/// extension headers) out of an Ethernet frame.
pub fn read_icmp_error(pkt: &[u8]) -> IcmpSeen {
    let v6 = u16::from_be_bytes([pkt[12], pkt[13]]) == ETH_P_IPV6;
    let (src, dst, icmp, ip_ok) = if v6 {
        let s: [u8; 16] = pkt[22..38].try_into().unwrap();
        let d: [u8; 16] = pkt[38..54].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), &pkt[54..], true)
    } else {
        let s: [u8; 4] = pkt[26..30].try_into().unwrap();
        let d: [u8; 4] = pkt[30..34].try_into().unwrap();
        (
            IpAddr::from(s),
            IpAddr::from(d),
            &pkt[34..],
            checksum(&pkt[14..34]) == 0,
        )
    };
    let icmp_ok = match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => icmpv6_checksum(s, d, icmp) == 0,
        _ => checksum(icmp) == 0,
    };
    let q = &icmp[8..];
    let (qsrc, qdst, proto, l4, quoted_ip_ok) = if v6 {
        let s: [u8; 16] = q[8..24].try_into().unwrap();
        let d: [u8; 16] = q[24..40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), q[6], &q[40..], true)
    } else {
        let s: [u8; 4] = q[12..16].try_into().unwrap();
        let d: [u8; 4] = q[16..20].try_into().unwrap();
        (
            IpAddr::from(s),
            IpAddr::from(d),
            q[9],
            &q[20..],
            checksum(&q[..20]) == 0,
        )
    };
    let quoted_l4_ok = (proto == IPPROTO_UDP && !v6 && l4[6..8] == [0, 0])
        || super::l4::l4_checksum(qsrc, qdst, proto, l4) == 0;
    IcmpSeen {
        src,
        dst,
        quoted_src: SocketAddr::new(qsrc, u16::from_be_bytes([l4[0], l4[1]])),
        quoted_dst: SocketAddr::new(qdst, u16::from_be_bytes([l4[2], l4[3]])),
        ip_ok,
        icmp_ok,
        quoted_ip_ok,
        quoted_l4_ok,
    }
}

impl IcmpSeen {
    /// Every checksum right.
    pub fn checksums_ok(&self) -> bool {
        self.ip_ok && self.icmp_ok && self.quoted_ip_ok && self.quoted_l4_ok
    }
}
