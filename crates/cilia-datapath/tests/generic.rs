//! The generic endpoint programs (configuration from a map, see
//! `crates/cilia-datapath/src/generic.rs`) decide exactly as the specialized
//! ones: the same packet sequence through two fresh fixtures, one per
//! build, gives the same verdict, the same packet out and the same mark at
//! every step. A device the agent never configured gets nothing through.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;

use cilia_abi::*;
use cilia_datapath::object::{PROG_FROM_CONTAINER, PROG_TO_CONTAINER};
use cilia_datapath::packet::*;
use cilia_datapath::testrun::{RunResult, TC_ACT_SHOT};

mod common;
use common::fixture::*;
use common::*;

/// Which program of which endpoint a step runs.
#[derive(Clone, Copy, Debug)]
enum Prog {
    AOut,
    BOut,
    AIn,
    BIn,
}

/// Sets up the same policy in `fx` (a CIDR identity for A's egress, B
/// admitting A on TCP/80 but denying TCP/22) and runs `steps` through it.
fn run(fx: &mut Fixture, steps: &[(Prog, Vec<u8>)]) -> Vec<(u32, Vec<u8>, u32)> {
    fx.dp
        .upsert_ipcache(
            IpcacheKey::new(IpAddr::V4("192.0.2.0".parse().unwrap()), 24),
            1 << 24,
        )
        .unwrap();
    set(
        &mut fx.dp,
        A_ID,
        &[
            enforce(CILIA_DIR_EGRESS),
            rule(CILIA_DIR_EGRESS, B_IDENTITY, 0, 0, 0, CILIA_VERDICT_ALLOW),
            rule(CILIA_DIR_EGRESS, 1 << 24, 17, 53, 16, CILIA_VERDICT_ALLOW),
        ],
    );
    b_denies_ssh_from_a(fx);
    let (a_out, b_out, a_in, b_in) = (fx.a(), fx.b(), fx.a_to_container(), fx.b_to_container());
    steps
        .iter()
        .map(|(prog, packet)| {
            let p = match prog {
                Prog::AOut => &a_out,
                Prog::BOut => &b_out,
                Prog::AIn => &a_in,
                Prog::BIn => &b_in,
            };
            let RunResult {
                verdict,
                packet,
                mark,
            } = p.run(packet).unwrap();
            (verdict, packet, mark)
        })
        .collect()
}

fn steps() -> Vec<(Prog, Vec<u8>)> {
    let dns = |dst: &str| {
        eth(
            A_NODE_MAC,
            A_MAC,
            ETH_P_IP,
            &ipv4(
                a4(),
                dst.parse().unwrap(),
                IPPROTO_UDP,
                64,
                &udp(5000, 53, b"q"),
            ),
        )
    };
    let spoofed = eth(
        A_NODE_MAC,
        A_MAC,
        ETH_P_IPV6,
        &ipv6(b6(), a6(), IPPROTO_TCP, 64, &tcp(1, 2, 0x02)),
    );
    let from_world = eth(
        B_MAC,
        B_NODE_MAC,
        ETH_P_IPV6,
        &ipv6(
            "2001:db8::7".parse().unwrap(),
            b6(),
            IPPROTO_TCP,
            64,
            &tcp(3000, 80, 0x02),
        ),
    );
    vec![
        (Prog::AOut, a_to_b(80)),          // allowed both ways: redirected to B
        (Prog::BOut, b_to_a(80)),          // its reply
        (Prog::AOut, a_to_b(22)),          // B denies SSH
        (Prog::AOut, a_to_b(443)),         // B admits the rest
        (Prog::AOut, dns("192.0.2.9")),    // egress to the allowed CIDR: the stack
        (Prog::AOut, dns("198.51.100.1")), // outside it: denied
        (Prog::AOut, spoofed),             // not A's own source
        (Prog::BIn, from_world),           // host traffic meets B's ingress policy
        (Prog::AIn, from_world_to_a()),
    ]
}

fn from_world_to_a() -> Vec<u8> {
    eth(
        A_MAC,
        A_NODE_MAC,
        ETH_P_IP,
        &ipv4(
            "203.0.113.5".parse().unwrap(),
            a4(),
            IPPROTO_UDP,
            64,
            &udp(53, 5000, b"r"),
        ),
    )
}

#[test]
fn the_generic_programs_decide_every_step_as_the_specialized_ones() {
    privileged!("generic_equivalence");
    let steps = steps();
    let specialized = run(&mut Fixture::new(), &steps);
    let generic = run(&mut Fixture::generic(), &steps);
    for (i, ((s, g), (prog, _))) in specialized.iter().zip(&generic).zip(&steps).enumerate() {
        assert_eq!(s, g, "step {i} ({prog:?}): specialized vs generic");
    }
    // The sequence exercises both outcomes.
    assert!(specialized.iter().any(|r| r.0 == TC_ACT_SHOT));
    assert!(specialized.iter().any(|r| r.0 != TC_ACT_SHOT));
}

#[test]
fn a_device_without_configuration_gets_nothing_through() {
    privileged!("generic_unconfigured");
    let fx = Fixture::new();
    for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
        let prog = fx.dp.test_generic_program(None, name).unwrap();
        let packet = if name == PROG_FROM_CONTAINER {
            a_to_b(80)
        } else {
            from_world_to_a()
        };
        assert_eq!(prog.run(&packet).unwrap().verdict, TC_ACT_SHOT, "{name}");
    }
    assert_eq!(drops(&fx.dp, CILIA_DROP_UNCONFIGURED), 2);
}
