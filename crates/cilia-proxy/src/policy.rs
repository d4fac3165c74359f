//! The compiled form of a [`ProxyPolicy`]: what decides one request from its
//! addresses and head. Pure: no socket, no clock.
//!
//! Invariants:
//! - compiling either succeeds for every entry or fails naming the endpoint,
//!   direction, entry and field; a policy is never half applied;
//! - an entry is looked up the way the datapath looks up the policy map (the
//!   peer identity's entry with the longest port prefix, else identity 0), so
//!   the proxy enforces L7 on exactly the entries that redirected the flow;
//! - a request with no entry on either side is denied (fail closed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use cilia_policy::l7::{CompiledL7, RequestView};
use ipnet::IpNet;

use crate::control::{L7Direction, L7Entry, ProxyPolicy, PROTOCOL_VERSION};

/// Identity of an address that is neither a local endpoint nor in a prefix.
pub const WORLD_IDENTITY: u32 = 2;

const TCP: u8 = 6;

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

#[derive(Debug)]
struct Entry {
    identity: u32,
    proto: u8,
    port: u16,
    port_prefix_len: u8,
    l7: CompiledL7,
    rules: Vec<String>,
}

impl Entry {
    fn covers(&self, port: u16) -> bool {
        let mask = if self.port_prefix_len == 0 {
            0
        } else {
            u16::MAX << (16 - u32::from(self.port_prefix_len))
        };
        (self.proto == TCP || self.proto == 0) && (port & mask) == (self.port & mask)
    }
}

#[derive(Debug)]
struct Endpoint {
    id: u16,
    identity: u32,
    ingress: Vec<Entry>,
    egress: Vec<Entry>,
}

/// A policy ready to decide requests.
#[derive(Debug)]
pub struct CompiledPolicy {
    revision: u64,
    endpoints: Vec<Endpoint>,
    by_addr: HashMap<IpAddr, usize>,
    /// Prefix lengths present, longest first, and the prefixes of each.
    prefixes: Vec<(u8, HashMap<IpNet, u32>)>,
}

/// The verdict on one request and what the flow record says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may be forwarded.
    pub allowed: bool,
    /// The endpoint whose entry decided (0 when no endpoint is involved).
    pub endpoint_id: u16,
    /// Which of its policies decided.
    pub direction: L7Direction,
    /// Identity of the client address.
    pub src_identity: u32,
    /// Identity of the destination address.
    pub dst_identity: u32,
    /// Rules of the deciding entry (empty when none applied).
    pub rules: Vec<String>,
    /// Whether the destination is a local endpoint (the upstream connection
    /// then leaves from the client's own address).
    pub dst_is_local: bool,
}

fn compile_entries(
    endpoint_index: usize,
    endpoint_id: u16,
    direction: &str,
    entries: &[L7Entry],
) -> Result<Vec<Entry>, PolicyError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let name = format!(
                "endpoint {endpoint_id} (endpoints[{endpoint_index}]) {direction}[{i}] \
                 (identity {}, proto {}, port {}/{})",
                e.identity, e.proto, e.port, e.port_prefix_len
            );
            if e.port_prefix_len > 16 {
                return Err(PolicyError(format!(
                    "{name}: port_prefix_len: {} is longer than 16 bits",
                    e.port_prefix_len
                )));
            }
            let l7 = CompiledL7::compile(&e.policy)
                .map_err(|err| PolicyError(format!("{name}: policy.{err}")))?;
            Ok(Entry {
                identity: e.identity,
                proto: e.proto,
                port: e.port,
                port_prefix_len: e.port_prefix_len,
                l7,
                rules: e.rules.clone(),
            })
        })
        .collect()
}

/// The entry the datapath would find for (peer identity, TCP, port).
fn lookup(entries: &[Entry], peer: u32, port: u16) -> Option<&Entry> {
    let best = |identity: u32| {
        entries
            .iter()
            .filter(|e| e.identity == identity && e.covers(port))
            .max_by_key(|e| (e.proto == TCP, e.port_prefix_len))
    };
    best(peer).or_else(|| best(0))
}

impl CompiledPolicy {
    /// Compiles every entry of `policy`; the error names the endpoint,
    /// direction, entry and field.
    pub fn compile(policy: &ProxyPolicy) -> Result<CompiledPolicy, PolicyError> {
        if policy.version != PROTOCOL_VERSION {
            return Err(PolicyError(format!(
                "version: protocol version {} is not supported; this proxy speaks {}",
                policy.version, PROTOCOL_VERSION
            )));
        }
        let mut endpoints = Vec::with_capacity(policy.endpoints.len());
        let mut by_addr = HashMap::new();
        for (i, ep) in policy.endpoints.iter().enumerate() {
            for (j, addr) in ep.addrs.iter().enumerate() {
                if let Some(other) = by_addr.insert(addr.to_canonical(), i) {
                    return Err(PolicyError(format!(
                        "endpoint {} (endpoints[{i}]) addrs[{j}]: {addr} also belongs to endpoint {}",
                        ep.id, policy.endpoints[other].id
                    )));
                }
            }
            endpoints.push(Endpoint {
                id: ep.id,
                identity: ep.identity,
                ingress: compile_entries(i, ep.id, "ingress", &ep.ingress)?,
                egress: compile_entries(i, ep.id, "egress", &ep.egress)?,
            });
        }
        let mut by_len: HashMap<u8, HashMap<IpNet, u32>> = HashMap::new();
        for p in &policy.prefixes {
            by_len
                .entry(p.prefix.prefix_len())
                .or_default()
                .insert(p.prefix.trunc(), p.identity);
        }
        let mut prefixes: Vec<_> = by_len.into_iter().collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0));
        Ok(CompiledPolicy {
            revision: policy.revision,
            endpoints,
            by_addr,
            prefixes,
        })
    }

    /// The agent's revision this policy was built at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn endpoint(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.by_addr
            .get(&ip.to_canonical())
            .and_then(|&i| self.endpoints.get(i))
    }

    /// Identity of an address: its local endpoint's, else the longest
    /// matching prefix's, else world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        if let Some(ep) = self.endpoint(ip) {
            return ep.identity;
        }
        for (len, table) in &self.prefixes {
            let Ok(net) = IpNet::new(ip, *len) else {
                continue; // a prefix length of the other family
            };
            if let Some(id) = table.get(&net.trunc()) {
                return *id;
            }
        }
        WORLD_IDENTITY
    }

    /// Decides a request from `src` to `dst` (the original destination).
    pub fn decide(&self, src: SocketAddr, dst: SocketAddr, req: &dyn RequestView) -> Decision {
        let src_ep = self.endpoint(src.ip());
        let dst_ep = self.endpoint(dst.ip());
        let src_identity = self.identity_of(src.ip());
        let dst_identity = self.identity_of(dst.ip());
        let mut decision = Decision {
            allowed: false,
            endpoint_id: dst_ep.or(src_ep).map_or(0, |e| e.id),
            direction: if dst_ep.is_some() || src_ep.is_none() {
                L7Direction::Ingress
            } else {
                L7Direction::Egress
            },
            src_identity,
            dst_identity,
            rules: Vec::new(),
            dst_is_local: dst_ep.is_some(),
        };
        // The client's egress first, as the datapath decides a new flow; the
        // first entry that denies decides, else the last one that allowed.
        let egress = src_ep.and_then(|ep| {
            lookup(&ep.egress, dst_identity, dst.port()).map(|e| (ep, L7Direction::Egress, e))
        });
        let ingress = dst_ep.and_then(|ep| {
            lookup(&ep.ingress, src_identity, dst.port()).map(|e| (ep, L7Direction::Ingress, e))
        });
        for (ep, direction, entry) in egress.into_iter().chain(ingress) {
            decision.endpoint_id = ep.id;
            decision.direction = direction;
            decision.rules.clone_from(&entry.rules);
            decision.allowed = entry.l7.decide(req).is_some();
            if !decision.allowed {
                return decision;
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{PrefixIdentity, ProxyEndpoint};
    use cilia_policy::l7::{HttpRuleSpec, L7Policy, SimpleRequest};

    fn entry(identity: u32, port: u16, len: u8, policy: L7Policy, rule: &str) -> L7Entry {
        L7Entry {
            identity,
            proto: 6,
            port,
            port_prefix_len: len,
            policy,
            rules: vec![rule.into()],
        }
    }

    fn http(method: &str, path: &str) -> L7Policy {
        L7Policy::Http(vec![HttpRuleSpec {
            method: Some(method.into()),
            path: Some(path.into()),
            ..Default::default()
        }])
    }

    fn req(method: &str, path: &str) -> SimpleRequest {
        SimpleRequest {
            method: method.into(),
            path: path.into(),
            ..Default::default()
        }
    }

    const SERVER: &str = "10.0.0.2";
    const CLIENT: &str = "10.0.0.1";

    fn policy(ingress: Vec<L7Entry>, egress: Vec<L7Entry>) -> CompiledPolicy {
        CompiledPolicy::compile(&ProxyPolicy {
            version: PROTOCOL_VERSION,
            revision: 7,
            endpoints: vec![
                ProxyEndpoint {
                    id: 10,
                    identity: 1000,
                    addrs: vec![SERVER.parse().unwrap()],
                    ingress,
                    egress: vec![],
                },
                ProxyEndpoint {
                    id: 20,
                    identity: 2000,
                    addrs: vec![CLIENT.parse().unwrap()],
                    ingress: vec![],
                    egress,
                },
            ],
            prefixes: vec![
                PrefixIdentity {
                    prefix: "203.0.113.0/24".parse().unwrap(),
                    identity: 16777217,
                },
                PrefixIdentity {
                    prefix: "203.0.113.128/25".parse().unwrap(),
                    identity: 16777218,
                },
            ],
        })
        .expect("valid policy")
    }

    fn sa(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[test]
    fn identity_is_endpoint_then_longest_prefix_then_world() {
        let p = policy(vec![], vec![]);
        assert_eq!(p.identity_of(SERVER.parse().unwrap()), 1000);
        assert_eq!(p.identity_of("203.0.113.5".parse().unwrap()), 16777217);
        assert_eq!(p.identity_of("203.0.113.200".parse().unwrap()), 16777218);
        assert_eq!(
            p.identity_of("198.51.100.1".parse().unwrap()),
            WORLD_IDENTITY
        );
        assert_eq!(
            p.identity_of("2001:db8::1".parse().unwrap()),
            WORLD_IDENTITY
        );
        assert_eq!(p.identity_of("::ffff:10.0.0.2".parse().unwrap()), 1000);
    }

    #[test]
    fn ingress_entry_of_the_client_identity_decides() {
        let p = policy(
            vec![entry(
                2000,
                80,
                16,
                http("POST", "/v1/request-landing"),
                "r1",
            )],
            vec![],
        );
        let d = p.decide(
            sa(CLIENT, 40000),
            sa(SERVER, 80),
            &req("POST", "/v1/request-landing"),
        );
        assert!(d.allowed);
        assert_eq!((d.endpoint_id, d.direction), (10, L7Direction::Ingress));
        assert_eq!((d.src_identity, d.dst_identity), (2000, 1000));
        assert_eq!(d.rules, vec!["r1".to_string()]);
        assert!(d.dst_is_local);
        let d = p.decide(
            sa(CLIENT, 40000),
            sa(SERVER, 80),
            &req("PUT", "/v1/exhaust-port"),
        );
        assert!(!d.allowed);
    }

    #[test]
    fn longest_port_prefix_of_the_identity_wins_over_identity_zero() {
        let p = policy(
            vec![
                entry(0, 80, 16, L7Policy::AllowAll, "any"),
                entry(2000, 0, 0, http("GET", "/.*"), "all-ports"),
                entry(2000, 80, 12, http("POST", "/.*"), "port-block"),
            ],
            vec![],
        );
        let d = p.decide(sa(CLIENT, 1), sa(SERVER, 80), &req("GET", "/"));
        assert!(!d.allowed, "the /12 entry of identity 2000 decides");
        assert_eq!(d.rules, vec!["port-block".to_string()]);
        let d = p.decide(sa(CLIENT, 1), sa(SERVER, 8080), &req("GET", "/"));
        assert!(d.allowed);
        assert_eq!(d.rules, vec!["all-ports".to_string()]);
        let d = p.decide(sa("10.9.9.9", 1), sa(SERVER, 80), &req("PUT", "/"));
        assert!(d.allowed, "another identity falls back to identity 0");
        assert_eq!(d.rules, vec!["any".to_string()]);
    }

    #[test]
    fn both_sides_must_allow_and_the_denying_side_is_named() {
        let p = policy(
            vec![entry(2000, 80, 16, http("GET|POST", "/.*"), "server")],
            vec![entry(1000, 80, 16, http("GET", "/.*"), "client")],
        );
        let d = p.decide(sa(CLIENT, 1), sa(SERVER, 80), &req("POST", "/"));
        assert!(!d.allowed);
        assert_eq!((d.endpoint_id, d.direction), (20, L7Direction::Egress));
        let d = p.decide(sa(CLIENT, 1), sa(SERVER, 80), &req("GET", "/"));
        assert!(d.allowed);
        assert_eq!((d.endpoint_id, d.direction), (10, L7Direction::Ingress));
    }

    #[test]
    fn no_entry_on_either_side_is_denied() {
        let p = policy(
            vec![entry(2000, 443, 16, L7Policy::AllowAll, "tls")],
            vec![],
        );
        let d = p.decide(sa(CLIENT, 1), sa(SERVER, 80), &req("GET", "/"));
        assert!(!d.allowed);
        assert!(d.rules.is_empty());
        let d = p.decide(
            sa("198.51.100.1", 1),
            sa("203.0.113.1", 80),
            &req("GET", "/"),
        );
        assert!(!d.allowed);
        assert_eq!(d.endpoint_id, 0);
    }

    #[test]
    fn egress_to_the_world_is_decided_by_the_client() {
        let p = policy(
            vec![],
            vec![entry(16777217, 80, 16, http("GET", "/.*"), "to-cidr")],
        );
        let d = p.decide(sa(CLIENT, 1), sa("203.0.113.9", 80), &req("GET", "/x"));
        assert!(d.allowed);
        assert_eq!((d.endpoint_id, d.direction), (20, L7Direction::Egress));
        assert!(!d.dst_is_local);
    }

    #[test]
    fn a_bad_entry_is_rejected_naming_endpoint_direction_entry_and_field() {
        let mut pp = ProxyPolicy {
            version: PROTOCOL_VERSION,
            revision: 1,
            endpoints: vec![ProxyEndpoint {
                id: 42,
                identity: 1000,
                addrs: vec![SERVER.parse().unwrap()],
                ingress: vec![
                    entry(0, 80, 16, L7Policy::AllowAll, "ok"),
                    entry(0, 81, 16, http("GET", "/v1/("), "bad"),
                ],
                egress: vec![],
            }],
            prefixes: vec![],
        };
        let err = CompiledPolicy::compile(&pp).expect_err("bad regex");
        assert!(
            err.0.starts_with("endpoint 42 (endpoints[0]) ingress[1] ")
                && err
                    .0
                    .contains("policy.http[0].path: invalid regular expression"),
            "{err}"
        );
        pp.version = 99;
        let err = CompiledPolicy::compile(&pp).expect_err("version");
        assert!(err.0.starts_with("version: protocol version 99"), "{err}");
    }

    #[test]
    fn an_address_of_two_endpoints_is_rejected() {
        let ep = |id| ProxyEndpoint {
            id,
            identity: 1,
            addrs: vec![SERVER.parse().unwrap()],
            ..Default::default()
        };
        let err = CompiledPolicy::compile(&ProxyPolicy {
            version: PROTOCOL_VERSION,
            endpoints: vec![ep(1), ep(2)],
            ..Default::default()
        })
        .expect_err("duplicate");
        assert!(err.0.contains("also belongs to endpoint 1"), "{err}");
    }
}
