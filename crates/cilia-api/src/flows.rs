//! Flow filters, shared by the agent (which applies them) and the CLI
//! (which builds them from flags), so a filter means the same on both sides.

use serde::{Deserialize, Serialize};

use crate::model::{Flow, FlowPeer};

/// Filters of `GET /v1/flows` and `GET /v1/monitor`, as query parameters.
/// Every given filter must match; lists are comma-separated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::IntoParams)]
pub struct FlowFilter {
    /// Source labels `k=v` (or `k`: key present), comma-separated, all must match.
    pub from_label: Option<String>,
    /// Destination labels, as `from_label`.
    pub to_label: Option<String>,
    pub from_ip: Option<String>,
    pub to_ip: Option<String>,
    /// Either side in this namespace.
    pub namespace: Option<String>,
    /// `FORWARDED`, `DROPPED` or `AUDIT` (comma-separated for several).
    pub verdict: Option<String>,
    /// `TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`.
    pub protocol: Option<String>,
    /// Either side's port.
    pub port: Option<u16>,
    /// Only flows at or after this time (nanoseconds since the epoch).
    pub since_ns: Option<u64>,
    /// Event types: `drop`, `trace`, `policy-verdict`, `debug` (comma-separated).
    pub types: Option<String>,
    /// Only flows to or from this endpoint.
    pub related_to: Option<u16>,
}

fn labels_match(peer: &FlowPeer, spec: &str) -> bool {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|item| match item.split_once('=') {
            Some((k, v)) => peer.labels.get(k).map(String::as_str) == Some(v),
            None => peer.labels.contains_key(item),
        })
}

fn listed(list: &str, value: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|item| item.eq_ignore_ascii_case(value))
}

impl FlowFilter {
    pub fn matches(&self, f: &Flow) -> bool {
        self.from_label
            .as_deref()
            .is_none_or(|s| labels_match(&f.source, s))
            && self
                .to_label
                .as_deref()
                .is_none_or(|s| labels_match(&f.destination, s))
            && self
                .from_ip
                .as_deref()
                .is_none_or(|ip| f.source.ip.as_deref() == Some(ip))
            && self
                .to_ip
                .as_deref()
                .is_none_or(|ip| f.destination.ip.as_deref() == Some(ip))
            && self.namespace.as_deref().is_none_or(|ns| {
                f.source.namespace.as_deref() == Some(ns)
                    || f.destination.namespace.as_deref() == Some(ns)
            })
            && self
                .verdict
                .as_deref()
                .is_none_or(|v| listed(v, &f.verdict))
            && self
                .protocol
                .as_deref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&f.protocol))
            && self
                .port
                .is_none_or(|p| f.source.port == Some(p) || f.destination.port == Some(p))
            && self.since_ns.is_none_or(|t| f.time_ns >= t)
            && self.types.as_deref().is_none_or(|t| listed(t, &f.event))
            && self.related_to.is_none_or(|id| {
                f.observed_at == id
                    || f.source.endpoint == Some(id)
                    || f.destination.endpoint == Some(id)
            })
    }

    /// Whether the filter asks for trace events (the datapath then emits them).
    pub fn wants_traces(&self) -> bool {
        self.types.as_deref().is_some_and(|t| listed(t, "trace"))
    }

    /// Whether the filter asks for debug events (conntrack state per packet).
    pub fn wants_debug(&self) -> bool {
        self.types.as_deref().is_some_and(|t| listed(t, "debug"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            event: "drop".into(),
            verdict: "DROPPED".into(),
            protocol: "TCP".into(),
            observed_at: 3,
            time_ns: 100,
            source: FlowPeer {
                endpoint: Some(3),
                ip: Some("fd00::4".into()),
                port: Some(40000),
                labels: [("class".to_string(), "xwing".to_string())].into(),
                namespace: Some("default".into()),
                ..Default::default()
            },
            destination: FlowPeer {
                endpoint: Some(1),
                ip: Some("fd00::2".into()),
                port: Some(80),
                labels: [("class".to_string(), "deathstar".to_string())].into(),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn every_given_filter_must_match() {
        let f = flow();
        let all = FlowFilter {
            from_label: Some("class=xwing".into()),
            to_label: Some("class".into()),
            to_ip: Some("fd00::2".into()),
            namespace: Some("default".into()),
            verdict: Some("forwarded,dropped".into()),
            protocol: Some("tcp".into()),
            port: Some(80),
            since_ns: Some(100),
            types: Some("drop".into()),
            related_to: Some(1),
            ..Default::default()
        };
        assert!(all.matches(&f));
        for miss in [
            FlowFilter {
                from_label: Some("class=tiefighter".into()),
                ..Default::default()
            },
            FlowFilter {
                verdict: Some("FORWARDED".into()),
                ..Default::default()
            },
            FlowFilter {
                port: Some(443),
                ..Default::default()
            },
            FlowFilter {
                since_ns: Some(101),
                ..Default::default()
            },
            FlowFilter {
                types: Some("trace".into()),
                ..Default::default()
            },
            FlowFilter {
                related_to: Some(9),
                ..Default::default()
            },
            FlowFilter {
                namespace: Some("prod".into()),
                ..Default::default()
            },
        ] {
            assert!(!miss.matches(&f), "{miss:?}");
        }
    }
}
