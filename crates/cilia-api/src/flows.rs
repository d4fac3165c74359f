//! Flow filters, shared by the agent (which applies them) and the CLI
//! (which builds them from flags), so a filter means the same on both sides.
//! A [`FlowFilter`] is the request's form; [`FlowFilter::compile`] checks it
//! once (the HTTP path regex) into the [`FlowMatcher`] applied to each flow.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::model::{Flow, FlowPeer};

/// Compiled size limit of an `http_path` regex: a filter is compiled per
/// request, and a hostile pattern must not cost the agent more than this.
const HTTP_PATH_REGEX_SIZE_LIMIT: usize = 1 << 20;

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
    /// `FORWARDED`, `DROPPED`, `AUDIT` or `ERROR` (comma-separated for several).
    pub verdict: Option<String>,
    /// `TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, or `HTTP` (L7 flows).
    pub protocol: Option<String>,
    /// Either side's port.
    pub port: Option<u16>,
    /// Only flows at or after this time (nanoseconds since the epoch).
    pub since_ns: Option<u64>,
    /// Event types: `drop`, `trace`, `policy-verdict`, `debug`, `l7`,
    /// `service` (comma-separated).
    pub types: Option<String>,
    /// Only flows to or from this endpoint.
    pub related_to: Option<u16>,
    /// Only L7 flows of these HTTP methods (comma-separated, any case).
    pub http_method: Option<String>,
    /// Only L7 flows whose request target (path and query) matches this
    /// regular expression as a whole, as a policy's `path` rule does.
    pub http_path: Option<String>,
}

/// A filter the agent cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flow filter {field}: {reason}")]
pub struct FilterError {
    /// The query parameter.
    pub field: &'static str,
    pub reason: String,
}

/// A checked [`FlowFilter`], ready to test flows.
#[derive(Debug, Clone)]
pub struct FlowMatcher {
    filter: FlowFilter,
    http_path: Option<Regex>,
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

/// The last non-empty line of a regex error (the others repeat the pattern).
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(&text)
        .trim();
    format!("invalid regular expression: {last}")
}

impl FlowFilter {
    /// Checks the filter once: an `http_path` that is no regular
    /// expression (or compiles too large) is an error naming the field.
    pub fn compile(self) -> Result<FlowMatcher, FilterError> {
        let http_path = self
            .http_path
            .as_deref()
            .map(|p| {
                RegexBuilder::new(&format!("^(?:{p})$"))
                    .size_limit(HTTP_PATH_REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| FilterError {
                        field: "http_path",
                        reason: regex_reason(&e),
                    })
            })
            .transpose()?;
        Ok(FlowMatcher {
            filter: self,
            http_path,
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

impl FlowMatcher {
    /// The filter it was compiled from.
    pub fn filter(&self) -> &FlowFilter {
        &self.filter
    }

    /// Whether `f` passes every given filter.
    pub fn matches(&self, f: &Flow) -> bool {
        self.filter.matches_fields(f)
            && self
                .http_path
                .as_ref()
                .is_none_or(|re| f.l7.as_ref().is_some_and(|l7| re.is_match(&l7.path)))
    }
}

impl FlowFilter {
    /// Every filter but `http_path` (which needs compiling).
    fn matches_fields(&self, f: &Flow) -> bool {
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
            && self.protocol.as_deref().is_none_or(|p| {
                p.eq_ignore_ascii_case(&f.protocol)
                    || f.l7
                        .as_ref()
                        .is_some_and(|l7| p.eq_ignore_ascii_case(&l7.protocol))
            })
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
            && self
                .http_method
                .as_deref()
                .is_none_or(|m| f.l7.as_ref().is_some_and(|l7| listed(m, &l7.method)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FlowL7;

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
                labels: std::sync::Arc::new([("class".to_string(), "xwing".to_string())].into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            destination: FlowPeer {
                endpoint: Some(1),
                ip: Some("fd00::2".into()),
                port: Some(80),
                labels: std::sync::Arc::new(
                    [("class".to_string(), "deathstar".to_string())].into(),
                ),
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
        assert!(all.compile().unwrap().matches(&f));
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
            assert!(!miss.clone().compile().unwrap().matches(&f), "{miss:?}");
        }
    }

    /// The flow of a tiefighter's `PUT /v1/exhaust-port` the proxy denied.
    fn l7_flow() -> Flow {
        Flow {
            event: "l7".into(),
            verdict: "DROPPED".into(),
            l7: Some(FlowL7 {
                protocol: "http".into(),
                method: "PUT".into(),
                path: "/v1/exhaust-port?force=1".into(),
                host: Some("deathstar".into()),
                status: 403,
                latency_us: 400,
                verdict: "denied".into(),
            }),
            ..flow()
        }
    }

    fn matches(filter: FlowFilter, f: &Flow) -> bool {
        filter.compile().unwrap().matches(f)
    }

    #[test]
    fn http_filters_select_only_l7_flows() {
        for filter in [
            FlowFilter {
                http_method: Some("PUT".into()),
                ..Default::default()
            },
            FlowFilter {
                http_path: Some(".*".into()),
                ..Default::default()
            },
        ] {
            assert!(matches(filter.clone(), &l7_flow()), "{filter:?}");
            assert!(!matches(filter.clone(), &flow()), "{filter:?}");
        }
    }

    #[test]
    fn http_method_is_a_list_in_any_case() {
        let by = |m: &str| FlowFilter {
            http_method: Some(m.into()),
            ..Default::default()
        };
        assert!(matches(by("get,put"), &l7_flow()));
        assert!(!matches(by("GET,POST"), &l7_flow()));
    }

    #[test]
    fn http_path_regex_must_match_the_whole_target_with_its_query() {
        let by = |p: &str| FlowFilter {
            http_path: Some(p.into()),
            ..Default::default()
        };
        assert!(matches(by("/v1/.*"), &l7_flow()));
        assert!(matches(by("/v1/exhaust-port\\?force=1"), &l7_flow()));
        assert!(!matches(by("/v1/exhaust-port"), &l7_flow()));
        assert!(!matches(by("exhaust"), &l7_flow()));
        assert!(!matches(by("/v1/exhaust-port|.*"), &flow()));
    }

    #[test]
    fn an_invalid_http_path_is_an_error_naming_the_field() {
        let err = FlowFilter {
            http_path: Some("/v1/(".into()),
            ..Default::default()
        }
        .compile()
        .unwrap_err();
        assert_eq!(err.field, "http_path");
        assert!(
            err.reason.starts_with("invalid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn protocol_http_selects_l7_flows_and_tcp_still_matches_them() {
        let by = |p: &str| FlowFilter {
            protocol: Some(p.into()),
            ..Default::default()
        };
        assert!(matches(by("http"), &l7_flow()));
        assert!(!matches(by("HTTP"), &flow()));
        assert!(matches(by("TCP"), &l7_flow()));
    }

    #[test]
    fn type_l7_selects_l7_flows() {
        let by = |t: &str| FlowFilter {
            types: Some(t.into()),
            ..Default::default()
        };
        assert!(matches(by("drop,l7"), &l7_flow()));
        assert!(!matches(by("drop"), &l7_flow()));
        assert!(!matches(by("l7"), &flow()));
    }
}
