//! The node's policy routing for the L7 proxy: packets the datapath marks
//! `CILIA_MARK_TO_PROXY` (under `CILIA_MARK_MASK`) are delivered locally,
//! whatever their destination address, so that they reach the proxy's
//! socket the datapath assigned them to. For IPv4 and IPv6:
//!
//! ```text
//! rule  fwmark CILIA_MARK_TO_PROXY/CILIA_MARK_MASK lookup CILIA_PROXY_ROUTE_TABLE pref CILIA_PROXY_RULE_PRIORITY
//! route local 0.0.0.0/0 (::/0) dev lo table CILIA_PROXY_ROUTE_TABLE
//! ```
//!
//! Installed in the calling thread's network namespace (the node's), over
//! rtnetlink ([`crate::endpoint::rtnl`]). Both calls are idempotent: an
//! entry already there is left alone, one already gone is not an error.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilia_abi::{
    CILIA_MARK_MASK, CILIA_MARK_TO_PROXY, CILIA_PROXY_ROUTE_TABLE, CILIA_PROXY_RULE_PRIORITY,
};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::endpoint::rtnl::{family, Rtnl};

#[derive(Debug, thiserror::Error)]
#[error("L7 proxy routing: {what}: {source}")]
pub struct ProxyRoutingError {
    /// The rule or route, as `ip` would print it.
    pub what: String,
    #[source]
    pub source: io::Error,
}

const FAMILIES: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
];

fn describe_rule(any: IpAddr) -> String {
    format!(
        "{}rule fwmark {CILIA_MARK_TO_PROXY:#x}/{CILIA_MARK_MASK:#x} lookup {CILIA_PROXY_ROUTE_TABLE} pref {CILIA_PROXY_RULE_PRIORITY}",
        if any.is_ipv6() { "-6 " } else { "" }
    )
}

fn describe_route(any: IpAddr) -> String {
    format!("route local {any}/0 dev lo table {CILIA_PROXY_ROUTE_TABLE}")
}

fn rule(any: IpAddr) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = family(any);
    // The table id does not fit the header's byte: it goes in FRA_TABLE.
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.action = RuleAction::ToTable;
    msg.attributes = vec![
        RuleAttribute::Priority(CILIA_PROXY_RULE_PRIORITY),
        RuleAttribute::FwMark(CILIA_MARK_TO_PROXY),
        RuleAttribute::FwMask(CILIA_MARK_MASK),
        RuleAttribute::Table(CILIA_PROXY_ROUTE_TABLE),
    ];
    msg
}

fn route(any: IpAddr, lo: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(any);
    msg.header.destination_prefix_length = 0;
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Host;
    msg.header.kind = RouteType::Local;
    msg.attributes = vec![
        RouteAttribute::Table(CILIA_PROXY_ROUTE_TABLE),
        RouteAttribute::Oif(lo),
    ];
    msg
}

fn loopback(rtnl: &mut Rtnl) -> Result<u32, ProxyRoutingError> {
    let err = |source| ProxyRoutingError {
        what: "looking up the loopback device lo".into(),
        source,
    };
    rtnl.link_index("lo")
        .map_err(err)?
        .ok_or_else(|| err(io::Error::from(io::ErrorKind::NotFound)))
}

fn open() -> Result<Rtnl, ProxyRoutingError> {
    Rtnl::new(None).map_err(|source| ProxyRoutingError {
        what: "opening a netlink socket".into(),
        source,
    })
}

/// Adds the TO_PROXY rule and the local route of both families in the
/// current network namespace; what is already there stays as it is.
pub fn install_proxy_routing() -> Result<(), ProxyRoutingError> {
    let mut rtnl = open()?;
    let lo = loopback(&mut rtnl)?;
    for any in FAMILIES {
        // The route first: a rule pointing at an empty table would send
        // marked packets on to the main table meanwhile.
        let steps = [
            (
                describe_route(any),
                RouteNetlinkMessage::NewRoute(route(any, lo)),
            ),
            (describe_rule(any), RouteNetlinkMessage::NewRule(rule(any))),
        ];
        for (what, msg) in steps {
            match rtnl.request(msg, NLM_F_CREATE | NLM_F_EXCL) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
                Err(source) => return Err(ProxyRoutingError { what, source }),
            }
        }
    }
    Ok(())
}

/// Removes what [`install_proxy_routing`] adds, from the current network
/// namespace; what is already gone is not an error.
pub fn remove_proxy_routing() -> Result<(), ProxyRoutingError> {
    let mut rtnl = open()?;
    let lo = loopback(&mut rtnl)?;
    for any in FAMILIES {
        let steps = [
            (describe_rule(any), RouteNetlinkMessage::DelRule(rule(any))),
            (
                describe_route(any),
                RouteNetlinkMessage::DelRoute(route(any, lo)),
            ),
        ];
        for (what, msg) in steps {
            match rtnl.request(msg, 0) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENOENT) | Some(nix::libc::ESRCH)
                    ) => {}
                Err(source) => return Err(ProxyRoutingError { what, source }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;
    use std::process::Command;

    /// Runs `f` on a thread in a fresh network namespace of its own (with
    /// `lo` up); the namespace goes away with the thread.
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                ip(&["link", "set", "lo", "up"]);
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// `ip <args>` in the calling thread's namespace (a child inherits it).
    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn table() -> String {
        CILIA_PROXY_ROUTE_TABLE.to_string()
    }

    /// The proxy rules and routes of both families, as `ip` prints them.
    fn installed() -> Vec<String> {
        let mut lines = Vec::new();
        for fam in ["-4", "-6"] {
            for line in ip(&[fam, "rule", "show"]).lines() {
                if line.contains(&format!("lookup {}", table())) {
                    lines.push(format!("{fam} {}", line.trim()));
                }
            }
            // An empty table may be reported as missing: no routes.
            let routes = Command::new("ip")
                .args([fam, "route", "show", "table", &table()])
                .output()
                .unwrap();
            for line in String::from_utf8(routes.stdout).unwrap().lines() {
                lines.push(format!("{fam} {}", line.trim()));
            }
        }
        lines
    }

    #[test]
    fn install_adds_the_proxy_rule_and_local_route_of_both_families_once() {
        if !cilia_testnet::require_privileges("install_proxy_routing") {
            return;
        }
        let lines = in_fresh_netns(|| {
            install_proxy_routing().unwrap();
            install_proxy_routing().unwrap();
            installed()
        });
        let rule = format!(
            "{CILIA_PROXY_RULE_PRIORITY}:\tfrom all fwmark {CILIA_MARK_TO_PROXY:#x}/{CILIA_MARK_MASK:#x} lookup {}",
            table()
        );
        assert_eq!(
            lines,
            vec![
                format!("-4 {rule}"),
                "-4 local default dev lo scope host".to_string(),
                format!("-6 {rule}"),
                "-6 local default dev lo metric 1024 pref medium".to_string(),
            ],
        );
    }

    #[test]
    fn remove_takes_away_what_install_added_and_may_run_twice() {
        if !cilia_testnet::require_privileges("remove_proxy_routing") {
            return;
        }
        let lines = in_fresh_netns(|| {
            install_proxy_routing().unwrap();
            remove_proxy_routing().unwrap();
            remove_proxy_routing().unwrap();
            installed()
        });
        assert_eq!(lines, Vec::<String>::new());
    }
}
