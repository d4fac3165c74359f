//! Builders for crafted packets (Ethernet frames) and the Internet checksum:
//! the datapath fixtures' inputs, and the synthesized packet of
//! `cilia policy trace --datapath`.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub type Mac = [u8; 6];

/// One's-complement sum folded and inverted, over `data` (odd length padded).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + payload.len());
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(nexthdr);
    p.push(hop_limit);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, ttl, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let csum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram (checksum left zero: the datapath does not verify it).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// ICMPv6 checksum over the IPv6 pseudo-header and `icmp`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut buf = Vec::new();
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    buf.extend_from_slice(icmp);
    checksum(&buf)
}

/// Solicited-node multicast address of `target`.
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    )
}

/// A neighbour solicitation for `target` from `src` with a source
/// link-layer address option, as Linux sends for address resolution.
pub fn neighbour_solicitation(src_mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(target);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&src_mac);
    let csum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mcast_mac = [
        0x33,
        0x33,
        0xff,
        target.octets()[13],
        target.octets()[14],
        target.octets()[15],
    ];
    eth(
        mcast_mac,
        src_mac,
        ETH_P_IPV6,
        &ipv6(src, dst, IPPROTO_ICMPV6, 255, &icmp),
    )
}

/// The first packet of a flow from `src` to `dst`: a TCP SYN, a UDP
/// datagram, an SCTP header, or an ICMP echo request (identifier `sport`).
pub fn flow_packet(
    dst_mac: Mac,
    src_mac: Mac,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    use std::net::IpAddr;
    let v6 = src.is_ipv6();
    let l4 = match proto {
        IPPROTO_TCP => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 0x50;
            t[13] = 0x02; // SYN
            t
        }
        1 | IPPROTO_ICMPV6 => {
            let mut icmp = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
            icmp.extend_from_slice(&sport.to_be_bytes());
            icmp.extend_from_slice(&[0, 1]);
            icmp
        }
        _ => udp(sport, dport, b"cilia trace"),
    };
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth(dst_mac, src_mac, ETH_P_IPV6, &ipv6(s, d, proto, 64, &l4))
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eth(dst_mac, src_mac, ETH_P_IP, &ipv4(s, d, proto, 64, &l4))
        }
        _ => Vec::new(),
    }
}

/// An ARP request: who has `tip`? tell `sip` (`sha`).
pub fn arp_request(sha: Mac, sip: Ipv4Addr, tip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sha);
    a.extend_from_slice(&sip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tip.octets());
    eth([0xff; 6], sha, ETH_P_ARP, &a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_buffer_including_its_checksum_is_zero() {
        let p = ipv4(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            IPPROTO_UDP,
            64,
            &[],
        );
        assert_eq!(checksum(&p[..20]), 0);
    }

    #[test]
    fn solicited_node_address_keeps_the_low_24_bits() {
        let t: Ipv6Addr = "2001:db8::12:3456".parse().unwrap();
        assert_eq!(
            solicited_node(t),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }
}
