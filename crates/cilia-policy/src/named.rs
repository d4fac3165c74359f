//! Named ports: a policy port may be a name (`http`) that each endpoint
//! declares for itself (`http=TCP/8080`).
//!
//! An ingress rule's name resolves against the ports of the endpoint the
//! policy applies to; an egress rule's against the ports of each peer
//! identity (the union over the local endpoints with that identity, so one
//! name may stand for several numbers). A name that does not resolve gives no
//! entry: the rule allows (or denies) nothing on it for that peer.

use std::collections::BTreeSet;
use std::fmt;

use crate::model::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// The longest port name (IANA service names are 1–15 characters).
pub const PORT_NAME_MAX: usize = 15;

/// Whether `s` is a port name: an IANA service name (Kubernetes'
/// `IANA_SVC_NAME`): 1–15 characters of `a-z`, `0-9` and `-`, at least one
/// letter, no `-` at either end and no `--`.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= PORT_NAME_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Port names and what they stand for: (name, IP protocol, port) triples,
/// sorted. An endpoint's have one (protocol, port) per name; an identity's
/// (the union over its endpoints) may have several.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPorts(BTreeSet<(String, u8, u16)>);

impl NamedPorts {
    /// No names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` standing for `port` of protocol `proto`.
    pub fn insert(&mut self, name: impl Into<String>, proto: u8, port: u16) {
        self.0.insert((name.into(), proto, port));
    }

    /// Adds every name of `other`.
    pub fn extend(&mut self, other: &NamedPorts) {
        self.0.extend(other.0.iter().cloned());
    }

    /// Whether there is no name.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every (name, protocol, port), sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u8, u16)> {
        self.0.iter().map(|(n, p, port)| (n.as_str(), *p, *port))
    }

    /// The (protocol, port)s `name` stands for.
    pub fn get<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (u8, u16)> + 'a {
        self.0
            .range((name.to_string(), 0, 0)..)
            .take_while(move |(n, _, _)| n == name)
            .map(|(_, p, port)| (*p, *port))
    }

    /// Whether `name` is declared.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).next().is_some()
    }

    /// The names declared (each once).
    pub fn names(&self) -> BTreeSet<&str> {
        self.0.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    /// Only the names in `names`.
    pub(crate) fn restricted_to(&self, names: &BTreeSet<std::sync::Arc<str>>) -> NamedPorts {
        NamedPorts(
            self.0
                .iter()
                .filter(|(n, _, _)| names.contains(n.as_str()))
                .cloned()
                .collect(),
        )
    }

    /// The names whose numbers differ between `self` and `other`.
    pub(crate) fn changed_names(&self, other: &NamedPorts) -> BTreeSet<String> {
        self.0
            .symmetric_difference(&other.0)
            .map(|(n, _, _)| n.clone())
            .collect()
    }
}

/// A port name declaration that is not `NAME=PROTO/PORT` with a valid name,
/// protocol and port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("named port {excerpt}: {reason}")]
pub struct NamedPortError {
    /// The declaration, or its first characters.
    pub excerpt: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One declared port name: `http=TCP/8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPortDecl {
    /// The name (an IANA service name).
    pub name: String,
    /// IP protocol number (TCP, UDP or SCTP).
    pub proto: u8,
    /// The port, 1–65535.
    pub port: u16,
}

impl fmt::Display for NamedPortDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}/{}",
            self.name,
            protocol_name(self.proto),
            self.port
        )
    }
}

/// `TCP`, `UDP` or `SCTP` for their protocol numbers (the number otherwise).
pub fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".to_string(),
        PROTO_UDP => "UDP".to_string(),
        PROTO_SCTP => "SCTP".to_string(),
        other => other.to_string(),
    }
}

/// The protocol number of `TCP`, `UDP` or `SCTP` (any case).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn short(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Checks one declaration's parts: a port name, TCP/UDP/SCTP (any case), 1–65535.
pub fn named_port(name: &str, protocol: &str, port: u32) -> Result<NamedPortDecl, NamedPortError> {
    let err = |reason: String| NamedPortError {
        excerpt: short(name),
        reason,
    };
    if !is_port_name(name) {
        return Err(err(
            "is not a port name (1-15 characters a-z, 0-9 and '-', at least one letter, \
             no leading, trailing or double '-')"
                .to_string(),
        ));
    }
    let proto = protocol_number(protocol).ok_or_else(|| {
        err(format!(
            "protocol {} is not TCP, UDP or SCTP",
            short(protocol)
        ))
    })?;
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err(format!("port {port} is not between 1 and 65535")))?;
    Ok(NamedPortDecl {
        name: name.to_string(),
        proto,
        port,
    })
}

/// An endpoint's port names from its declarations: the same name twice is
/// fine with the same protocol and port, an error otherwise (naming it).
pub fn endpoint_named_ports<'a>(
    decls: impl IntoIterator<Item = &'a NamedPortDecl>,
) -> Result<NamedPorts, NamedPortError> {
    let mut out = NamedPorts::new();
    for d in decls {
        if let Some((proto, port)) = out.get(&d.name).next() {
            if (proto, port) != (d.proto, d.port) {
                return Err(NamedPortError {
                    excerpt: short(&d.name),
                    reason: format!(
                        "declared twice with different ports: {}/{port} and {}/{}",
                        protocol_name(proto),
                        protocol_name(d.proto),
                        d.port
                    ),
                });
            }
            continue;
        }
        out.insert(d.name.clone(), d.proto, d.port);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_iana_service_name_syntax() {
        for ok in [
            "http",
            "h",
            "http-alt",
            "a1",
            "1a",
            "dns-tcp",
            "abcdefghijklmno",
        ] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "HTTP",
            "-http",
            "http-",
            "ht--tp",
            "abcdefghijklmnop",
            "ht_tp",
            "ht.tp",
            "ht tp",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }

    fn parse(s: &str) -> Result<NamedPortDecl, NamedPortError> {
        let (name, rest) = s.split_once('=').unwrap();
        let (proto, port) = rest.split_once('/').unwrap();
        named_port(name, proto, port.parse().unwrap())
    }

    #[test]
    fn a_declaration_is_name_protocol_and_port() {
        let d = parse("http=tcp/8080").unwrap();
        assert_eq!(
            d,
            NamedPortDecl {
                name: "http".into(),
                proto: PROTO_TCP,
                port: 8080
            }
        );
        assert_eq!(d.to_string(), "http=TCP/8080");
        assert_eq!(parse("dns=UDP/53").unwrap().proto, PROTO_UDP);
        assert_eq!(parse("x=Sctp/1").unwrap().proto, PROTO_SCTP);
    }

    #[test]
    fn bad_declarations_are_refused_with_the_reason() {
        for (bad, reason) in [
            ("HTTP=TCP/80", "not a port name"),
            ("80=TCP/80", "not a port name"),
            ("=TCP/80", "not a port name"),
            ("http=ICMP/80", "not TCP, UDP or SCTP"),
            ("http=TCP/0", "between 1 and 65535"),
            ("http=TCP/65536", "between 1 and 65535"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(reason), "{bad}: {e}");
        }
    }

    #[test]
    fn a_name_declared_twice_with_different_ports_is_refused() {
        let a = parse("http=TCP/80").unwrap();
        let b = parse("http=TCP/8080").unwrap();
        let e = endpoint_named_ports([&a, &b]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("named port \"http\": declared twice"),
            "{e}"
        );
        let same = endpoint_named_ports([&a, &a]).unwrap();
        assert_eq!(same.get("http").collect::<Vec<_>>(), vec![(PROTO_TCP, 80)]);
    }

    #[test]
    fn an_identity_may_have_several_numbers_for_one_name() {
        let mut p = NamedPorts::new();
        p.insert("http", PROTO_TCP, 80);
        p.insert("http", PROTO_TCP, 8080);
        p.insert("https", PROTO_TCP, 443);
        assert_eq!(
            p.get("http").collect::<Vec<_>>(),
            vec![(PROTO_TCP, 80), (PROTO_TCP, 8080)]
        );
        assert!(!p.has("htt"));
    }
}
