//! TCP and UDP packets for the load balancer fixtures: built with valid
//! checksums, and read back with every checksum recomputed, so a fixture
//! can say what a translation did to addresses, ports and checksums.

use std::net::{IpAddr, SocketAddr};

use cilia_datapath::packet::*;

/// A TCP segment (`flags`: 0x02 SYN, 0x12 SYN-ACK, 0x10 ACK) or a UDP
/// datagram from `src` to `dst`, every checksum valid.
pub fn l4_packet(
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    flags: u8,
    from: (Mac, Mac),
) -> Vec<u8> {
    let mut l4 = if proto == IPPROTO_TCP {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t.extend_from_slice(b"hello, service");
        t
    } else {
        udp(src.port(), dst.port(), b"hello, service")
    };
    let off = if proto == IPPROTO_TCP { 16 } else { 6 };
    let sum = l4_checksum(src.ip(), dst.ip(), proto, &l4);
    l4[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    let (dst_mac, src_mac) = (from.1, from.0);
    match (src.ip(), dst.ip()) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth(dst_mac, src_mac, ETH_P_IPV6, &ipv6(s, d, proto, 64, &l4))
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eth(dst_mac, src_mac, ETH_P_IP, &ipv4(s, d, proto, 64, &l4))
        }
        _ => unreachable!("one family"),
    }
}

/// A TCP segment with a valid checksum.
pub fn tcp_packet(src: SocketAddr, dst: SocketAddr, flags: u8, from: (Mac, Mac)) -> Vec<u8> {
    l4_packet(src, dst, IPPROTO_TCP, flags, from)
}

/// A UDP datagram with a valid checksum.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, from: (Mac, Mac)) -> Vec<u8> {
    l4_packet(src, dst, IPPROTO_UDP, 0, from)
}

/// The TCP/UDP checksum over the pseudo-header and `l4` (its checksum
/// field included: 0 when the segment is valid).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut buf = Vec::new();
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
            buf.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            buf.extend_from_slice(&[0, 0, 0, proto]);
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            buf.extend_from_slice(&s.octets());
            buf.extend_from_slice(&d.octets());
            buf.extend_from_slice(&[0, proto]);
            buf.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        _ => unreachable!("one family"),
    }
    buf.extend_from_slice(l4);
    checksum(&buf)
}

/// Source, destination, and whether every checksum and length of the TCP
/// or UDP packet is valid (IPv4 options and one IPv6 Destination Options
/// header, as DSR inserts them, skipped).
pub fn parse(pkt: &[u8]) -> (SocketAddr, SocketAddr, bool) {
    let ethertype = u16::from_be_bytes([pkt[12], pkt[13]]);
    let (src, dst, proto, l4, ip_ok) = if ethertype == ETH_P_IPV6 {
        let s: [u8; 16] = pkt[22..38].try_into().unwrap();
        let d: [u8; 16] = pkt[38..54].try_into().unwrap();
        let (proto, l4) = if pkt[20] == 60 {
            (pkt[54], 54 + (usize::from(pkt[55]) + 1) * 8)
        } else {
            (pkt[20], 54)
        };
        (IpAddr::from(s), IpAddr::from(d), proto, &pkt[l4..], true)
    } else {
        let s: [u8; 4] = pkt[26..30].try_into().unwrap();
        let d: [u8; 4] = pkt[30..34].try_into().unwrap();
        let l4 = 14 + usize::from(pkt[14] & 0xf) * 4;
        (
            IpAddr::from(s),
            IpAddr::from(d),
            pkt[23],
            &pkt[l4..],
            checksum(&pkt[14..l4]) == 0
                && usize::from(u16::from_be_bytes([pkt[16], pkt[17]])) == pkt.len() - 14,
        )
    };
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    (
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        ip_ok && l4_checksum(src, dst, proto, l4) == 0,
    )
}
