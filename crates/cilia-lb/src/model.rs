//! The service model: what a user declares, parsed and validated.
//!
//! A [`Service`] that passed [`Service::validate`] keeps these invariants,
//! which the datapath rows rely on: its id is 1..=65535, its frontend and
//! every backend have non-zero ports, every backend is of the frontend's
//! address family, no backend address appears twice, and it has at most
//! [`crate::SLOTS_MAX`] backends.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a service, or a piece of one, is refused. Each variant names the
/// input (or field) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LbError {
    /// A frontend that does not parse or cannot be a frontend.
    #[error("frontend {input:?}: {reason}")]
    Frontend { input: String, reason: String },
    /// A backend that does not parse or does not fit its service.
    #[error("backend {input:?}: {reason}")]
    Backend { input: String, reason: String },
    /// Any other field of a service (`id`, `weights`, `affinity`, ...).
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

impl LbError {
    /// The field the error is about, as the API names it.
    pub fn field(&self) -> &str {
        match self {
            LbError::Frontend { .. } => "frontend",
            LbError::Backend { .. } => "backends",
            LbError::Field { field, .. } => field,
        }
    }

    fn field_error(field: &str, reason: impl Into<String>) -> Self {
        LbError::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The transport protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (`IPPROTO_*`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol of an IP protocol number, if a frontend can have it.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A service frontend: `[VIP]:PORT/PROTO` (IPv6 in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Frontend {
    pub addr: SocketAddr,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto.as_str())
    }
}

impl From<Frontend> for String {
    fn from(f: Frontend) -> String {
        f.to_string()
    }
}

impl TryFrom<String> for Frontend {
    type Error = LbError;
    fn try_from(s: String) -> Result<Self, LbError> {
        s.parse()
    }
}

impl FromStr for Frontend {
    type Err = LbError;

    fn from_str(input: &str) -> Result<Self, LbError> {
        let err = |reason: String| LbError::Frontend {
            input: input.into(),
            reason,
        };
        let (addr, proto) = input.rsplit_once('/').ok_or_else(|| {
            err("expected [VIP]:PORT/PROTO (e.g. 192.0.2.10:80/tcp, [2001:db8::10]:53/udp)".into())
        })?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => return Err(err(format!("protocol {other:?} is not tcp or udp"))),
        };
        let addr = parse_socket_addr(addr).map_err(err)?;
        check_frontend_address(addr).map_err(err)?;
        Ok(Frontend { addr, proto })
    }
}

/// Parses `ADDR:PORT` (`[IPv6]:PORT`), saying what is wrong otherwise.
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
                "{s:?} has no port: put an IPv6 address in brackets ([IPv6]:PORT)"
            ))
        }
        Ok(IpAddr::V4(_)) => return Err(format!("{s:?} has no port (ADDR:PORT)")),
        Err(_) => {}
    }
    if s.matches(':').count() > 1 && !s.starts_with('[') {
        return Err(format!(
            "{s:?}: put an IPv6 address in brackets ([IPv6]:PORT)"
        ));
    }
    match s.rsplit_once(':') {
        Some((ip, port)) => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            if ip.parse::<IpAddr>().is_err() {
                Err(format!("{ip:?} is not an IP address"))
            } else {
                Err(format!("{port:?} is not a port number (1-65535)"))
            }
        }
        None => Err(format!("{s:?} is not ADDR:PORT ([IPv6]:PORT)")),
    }
}

/// A frontend may be the unspecified address (`0.0.0.0`, `[::]`): a
/// NodePort service, served at every address of the node.
fn check_frontend_address(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_unspecified() && addr.port() != 0 {
        return Ok(());
    }
    check_address(addr)
}

/// What no backend (and no frontend but a NodePort's) address may be.
fn check_address(addr: SocketAddr) -> Result<(), String> {
    if addr.port() == 0 {
        return Err("port 0 is not a port (1-65535)".into());
    }
    let ip = addr.ip();
    if ip.is_unspecified() {
        return Err(format!("{ip} is the unspecified address"));
    }
    if ip.is_multicast() {
        return Err(format!("{ip} is a multicast address"));
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(format!("{ip} is the broadcast address"));
        }
    }
    Ok(())
}

/// How a service picks the backend of a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// A random active backend.
    #[default]
    Random,
    /// The service's Maglev table, by the flow's hash: the same flow gets
    /// the same backend on every node, and a change of the backend set
    /// moves few flows.
    Maglev,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
}

impl FromStr for Algorithm {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s.to_ascii_lowercase().as_str() {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            _ => Err(LbError::field_error(
                "algorithm",
                format!("{s:?} is not random or maglev"),
            )),
        }
    }
}

/// A backend's state. Only active backends receive new flows; the others
/// keep the flows already pinned to them until those end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    /// Being shut down: no new flows, existing ones finish.
    Terminating,
    /// Judged unhealthy: no new flows, existing ones finish.
    Quarantined,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::Quarantined => "quarantined",
        }
    }
}

impl FromStr for BackendState {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self, LbError> {
        match s.to_ascii_lowercase().as_str() {
            "active" => Ok(BackendState::Active),
            "terminating" => Ok(BackendState::Terminating),
            "quarantined" => Ok(BackendState::Quarantined),
            _ => Err(LbError::field_error(
                "state",
                format!("{s:?} is not active, terminating or quarantined"),
            )),
        }
    }
}

/// The weight of a backend nobody gave one.
pub const DEFAULT_WEIGHT: u16 = 1;

/// One backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Relative share of new flows under Maglev; 0: no new flows (like a
    /// terminating backend).
    #[serde(default = "default_weight")]
    pub weight: u16,
    #[serde(default)]
    pub state: BackendState,
}

fn default_weight() -> u16 {
    DEFAULT_WEIGHT
}

impl Backend {
    /// An active backend of weight 1.
    pub fn new(addr: SocketAddr) -> Self {
        Backend {
            addr,
            weight: DEFAULT_WEIGHT,
            state: BackendState::Active,
        }
    }

    /// Parses `ADDR:PORT` (`[IPv6]:PORT`).
    pub fn parse(input: &str) -> Result<Self, LbError> {
        let err = |reason: String| LbError::Backend {
            input: input.into(),
            reason,
        };
        let addr = parse_socket_addr(input.trim()).map_err(err)?;
        check_address(addr).map_err(err)?;
        Ok(Backend::new(addr))
    }

    /// Whether the backend gets new flows: active with a non-zero weight.
    pub fn selectable(&self) -> bool {
        self.state == BackendState::Active && self.weight > 0
    }
}

/// A service: a frontend and the backends its flows go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Also the datapath's rev-NAT id: 1..=65535.
    pub id: u16,
    pub frontend: Frontend,
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Client-address affinity: a client's new flows go to the backend of
    /// its last flow if that was at most this many seconds ago. `None`: off.
    #[serde(default)]
    pub affinity_timeout: Option<u32>,
    /// NodePort only: externalTrafficPolicy=Local (external clients go to
    /// this node's backends only).
    #[serde(default)]
    pub external_local: bool,
}

impl Service {
    /// A NodePort service: its frontend address is unspecified, it is
    /// served at every address of the node (the underlay device).
    pub fn is_nodeport(&self) -> bool {
        self.frontend.addr.ip().is_unspecified()
    }

    /// Checks the invariants of the module doc.
    pub fn validate(&self) -> Result<(), LbError> {
        if self.id == 0 {
            return Err(LbError::field_error(
                "id",
                "0 is not a service id (1-65535)",
            ));
        }
        let frontend = self.frontend.to_string();
        check_frontend_address(self.frontend.addr).map_err(|reason| LbError::Frontend {
            input: frontend.clone(),
            reason,
        })?;
        if self.backends.len() > crate::SLOTS_MAX {
            return Err(LbError::field_error(
                "backends",
                format!(
                    "{} backends: a service has at most {}",
                    self.backends.len(),
                    crate::SLOTS_MAX
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for b in &self.backends {
            let input = b.addr.to_string();
            let err = |reason: String| LbError::Backend {
                input: input.clone(),
                reason,
            };
            check_address(b.addr).map_err(err)?;
            if b.addr.is_ipv4() != self.frontend.addr.is_ipv4() {
                return Err(err(format!(
                    "not of the frontend {frontend}'s address family (IPv{})",
                    if self.frontend.addr.is_ipv4() { 4 } else { 6 }
                )));
            }
            if !seen.insert(b.addr) {
                return Err(err("listed twice".into()));
            }
        }
        if self.external_local && !self.is_nodeport() {
            return Err(LbError::field_error(
                "external_traffic_policy",
                format!("Local applies to NodePort services (frontend 0.0.0.0 or [::]), not to {frontend}"),
            ));
        }
        if self.affinity_timeout == Some(0) {
            return Err(LbError::field_error(
                "affinity.timeout_secs",
                "0 seconds: give a positive timeout, or no affinity",
            ));
        }
        Ok(())
    }

    /// The backends that get new flows, in list order.
    pub fn selectable(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().filter(|b| b.selectable())
    }
}

/// Parses a comma-separated backend list (`A:P,B:P`), each of weight 1.
pub fn parse_backends(list: &str) -> Result<Vec<Backend>, LbError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Backend::parse)
        .collect()
}

/// Parses a comma-separated weight list (`1,3`), one per backend.
pub fn parse_weights(list: &str, backends: usize) -> Result<Vec<u16>, LbError> {
    let weights = list
        .split(',')
        .map(|w| {
            w.trim().parse::<u16>().map_err(|_| {
                LbError::field_error(
                    "weights",
                    format!("{:?} is not a weight (0-65535)", w.trim()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if weights.len() != backends {
        return Err(LbError::field_error(
            "weights",
            format!(
                "{} weights for {backends} backends: give one per backend",
                weights.len()
            ),
        ));
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(frontend: &str, backends: &str) -> Service {
        Service {
            id: 1,
            frontend: frontend.parse().expect("frontend"),
            backends: parse_backends(backends).expect("backends"),
            algorithm: Algorithm::Random,
            affinity_timeout: None,
            external_local: false,
        }
    }

    #[test]
    fn frontends_of_both_families_parse_and_print_back() {
        for text in ["192.0.2.10:80/tcp", "[2001:db8::10]:53/udp"] {
            let f: Frontend = text.parse().expect(text);
            assert_eq!(f.to_string(), text);
        }
        let f: Frontend = "[2001:db8::1]:443/TCP".parse().expect("upper case");
        assert_eq!(f.proto, Protocol::Tcp);
        assert_eq!(f.addr.port(), 443);
    }

    #[test]
    fn bad_frontends_are_refused_naming_the_input_and_reason() {
        let cases = [
            ("192.0.2.10:80", "expected [VIP]:PORT/PROTO"),
            ("192.0.2.10:80/sctp", "\"sctp\" is not tcp or udp"),
            ("192.0.2.10/tcp", "has no port"),
            ("2001:db8::1:80/tcp", "brackets"),
            ("192.0.2.10:0/tcp", "port 0"),
            ("192.0.2.10:99999/tcp", "\"99999\" is not a port number"),
            ("192.0.2.300:80/tcp", "is not an IP address"),
            ("0.0.0.0:0/tcp", "port 0"),
            ("[ff02::1]:80/udp", "multicast"),
        ];
        for (input, reason) in cases {
            let e = input.parse::<Frontend>().expect_err(input).to_string();
            assert!(e.contains(input), "{input}: {e}");
            assert!(e.contains(reason), "{input}: {e}");
        }
    }

    #[test]
    fn backend_of_the_other_family_is_refused_naming_it() {
        let s = service("[2001:db8::10]:80/tcp", "[2001:db8::1]:8080,192.0.2.1:8080");
        let e = s.validate().expect_err("mixed").to_string();
        assert!(e.contains("192.0.2.1:8080"), "{e}");
        assert!(e.contains("address family (IPv6)"), "{e}");
    }

    #[test]
    fn duplicate_backend_is_refused() {
        let s = service("192.0.2.10:80/tcp", "192.0.2.1:80,192.0.2.1:80");
        let e = s.validate().expect_err("dup").to_string();
        assert!(e.contains("192.0.2.1:80") && e.contains("twice"), "{e}");
    }

    #[test]
    fn id_zero_and_zero_affinity_are_refused() {
        let mut s = service("192.0.2.10:80/tcp", "192.0.2.1:80");
        s.id = 0;
        assert_eq!(s.validate().expect_err("id").field(), "id");
        s.id = 7;
        s.affinity_timeout = Some(0);
        assert_eq!(
            s.validate().expect_err("affinity").field(),
            "affinity.timeout_secs"
        );
        s.affinity_timeout = Some(10_800);
        s.validate().expect("valid");
    }

    #[test]
    fn more_backends_than_slots_are_refused() {
        let mut s = service("[2001:db8::10]:80/tcp", "");
        s.backends = (0..=crate::SLOTS_MAX as u32)
            .map(|i| {
                let ip = std::net::Ipv6Addr::from(
                    0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + u128::from(i) + 1,
                );
                Backend::new(SocketAddr::new(ip.into(), 80))
            })
            .collect();
        let e = s.validate().expect_err("too many").to_string();
        assert!(e.contains("at most 32767"), "{e}");
    }

    #[test]
    fn backend_and_weight_lists_parse() {
        let b = parse_backends("192.0.2.1:80, 192.0.2.2:81").expect("list");
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].addr.port(), 81);
        assert_eq!(parse_weights("1,3", 2).expect("weights"), vec![1, 3]);
        let e = parse_weights("1", 2).expect_err("count").to_string();
        assert!(e.contains("1 weights for 2 backends"), "{e}");
        let e = parse_weights("1,x", 2).expect_err("value").to_string();
        assert!(e.contains("\"x\" is not a weight"), "{e}");
        let e = parse_backends("192.0.2.1")
            .expect_err("no port")
            .to_string();
        assert!(
            e.contains("backend \"192.0.2.1\"") && e.contains("no port"),
            "{e}"
        );
    }

    #[test]
    fn service_round_trips_through_json() {
        let mut s = service("[2001:db8::10]:80/tcp", "[2001:db8::1]:8080");
        s.algorithm = Algorithm::Maglev;
        s.backends[0].state = BackendState::Terminating;
        let json = serde_json::to_string(&s).expect("json");
        assert!(json.contains("\"[2001:db8::10]:80/tcp\""), "{json}");
        let back: Service = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
    }
}
