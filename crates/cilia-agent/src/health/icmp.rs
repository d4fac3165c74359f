//! ICMP and ICMPv6 echo messages as bytes: what the prober sends on its
//! raw sockets and how it recognizes its own replies among everything a
//! raw socket receives (other pings, neighbour discovery, errors).
//!
//! A raw IPv4 ICMP socket hands over the whole IP packet; a raw ICMPv6
//! socket only the ICMPv6 message (and the kernel computes its checksum on
//! send), so the two families differ in parsing and checksumming only.

use std::net::{IpAddr, Ipv4Addr};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const IPPROTO_ICMP: u8 = 1;

/// One echo reply, as far as the prober needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReply {
    /// The replying address (IPv4 only: an ICMPv6 raw socket gives no
    /// header; the sequence number identifies the probe anyway).
    pub source: Option<IpAddr>,
    pub id: u16,
    pub seq: u16,
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request (ICMP for `v6 == false`, ICMPv6 otherwise) with `id`,
/// `seq` and `payload`. The ICMPv6 checksum is left 0: the kernel fills
/// it in for raw ICMPv6 sockets (it needs the pseudo-header).
pub fn echo_request(v6: bool, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let kind = if v6 {
        ICMPV6_ECHO_REQUEST
    } else {
        ICMP_ECHO_REQUEST
    };
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.extend_from_slice(&[kind, 0, 0, 0]);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    if !v6 {
        let sum = checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    msg
}

/// The echo reply in what a raw socket received, if it is one: for IPv4 a
/// whole IP packet, for IPv6 an ICMPv6 message.
pub fn parse_echo_reply(v6: bool, packet: &[u8]) -> Option<EchoReply> {
    let (source, msg, reply) = if v6 {
        (None, packet, ICMPV6_ECHO_REPLY)
    } else {
        let first = *packet.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 || packet.len() < ihl || packet[9] != IPPROTO_ICMP {
            return None;
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        (Some(IpAddr::V4(src)), &packet[ihl..], ICMP_ECHO_REPLY)
    };
    if msg.len() < 8 || msg[0] != reply || msg[1] != 0 {
        return None;
    }
    Some(EchoReply {
        source,
        id: u16::from_be_bytes([msg[4], msg[5]]),
        seq: u16::from_be_bytes([msg[6], msg[7]]),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    #[test]
    fn an_icmp_echo_request_carries_id_seq_and_a_valid_checksum() {
        let msg = echo_request(false, 0x1234, 7, b"cilia");
        assert_eq!(&msg[..2], &[8, 0]);
        assert_eq!(&msg[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(&msg[8..], b"cilia");
        // A message with its checksum in place sums to zero.
        assert_eq!(checksum(&msg), 0);
    }

    #[test]
    fn an_icmpv6_echo_request_leaves_the_checksum_to_the_kernel() {
        let msg = echo_request(true, 1, 2, b"");
        assert_eq!(msg, [128, 0, 0, 0, 0, 1, 0, 2]);
    }

    /// The IPv4 packet a peer sends back for `echo_request(false, id, seq, ..)`.
    fn ipv4_reply(id: u16, seq: u16) -> Vec<u8> {
        let mut icmp = echo_request(false, id, seq, b"cilia");
        icmp[0] = 0;
        icmp[2..4].fill(0);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&[192, 0, 2, 2, 192, 0, 2, 1]);
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn an_ipv4_echo_reply_is_recognized_with_its_source() {
        assert_eq!(
            parse_echo_reply(false, &ipv4_reply(0x1234, 9)),
            Some(EchoReply {
                source: Some("192.0.2.2".parse().unwrap()),
                id: 0x1234,
                seq: 9
            })
        );
    }

    #[test]
    fn requests_errors_and_truncated_packets_are_not_replies() {
        let mut request = ipv4_reply(1, 1);
        request[20] = 8; // an echo request someone else sent
        assert_eq!(parse_echo_reply(false, &request), None);
        let mut unreachable = ipv4_reply(1, 1);
        unreachable[20] = 3;
        assert_eq!(parse_echo_reply(false, &unreachable), None);
        assert_eq!(parse_echo_reply(false, &ipv4_reply(1, 1)[..24]), None);
        assert_eq!(parse_echo_reply(false, &[]), None);
        // Neighbour solicitation on the ICMPv6 socket.
        assert_eq!(parse_echo_reply(true, &[135, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn an_icmpv6_echo_reply_is_recognized() {
        let reply = [129, 0, 0xab, 0xcd, 0, 5, 1, 0, b'x'];
        assert_eq!(
            parse_echo_reply(true, &reply),
            Some(EchoReply {
                source: None,
                id: 5,
                seq: 256
            })
        );
    }
}
