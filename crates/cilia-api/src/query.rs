//! Query parameters of the agent's routes as types, and their encoding.
//! [`crate::ApiClient`] turns them into query strings; nothing else in the
//! workspace writes a query string by hand.

use std::fmt::Display;

use crate::flows::FlowFilter;

/// Which endpoints a list or delete is about (`/v1/endpoints`). A
/// container's attachment is (container id, interface, network), as the CNI
/// spec keys it; endpoints the agent recorded without a network match every
/// network. The agent deletes only with a container id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointQuery<'a> {
    pub container_id: Option<&'a str>,
    pub ifname: Option<&'a str>,
    pub network: Option<&'a str>,
}

impl<'a> EndpointQuery<'a> {
    /// The attachment (container id, interface) of network `network`.
    pub fn attachment(container_id: &'a str, ifname: &'a str, network: &'a str) -> Self {
        Self {
            container_id: Some(container_id),
            ifname: Some(ifname),
            network: Some(network),
        }
    }

    /// The query string: empty, or `?` and the given parameters.
    pub fn query(&self) -> String {
        let mut q = QueryString::default();
        q.push_opt("container_id", self.container_id);
        q.push_opt("ifname", self.ifname);
        q.push_opt("network", self.network);
        q.finish()
    }
}

/// Which policies `DELETE /v1/policy` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyDelete {
    /// Every policy.
    All,
    /// The policies of this name: of every kind and namespace, or only of
    /// `namespace`.
    Named {
        name: String,
        namespace: Option<String>,
    },
}

impl PolicyDelete {
    pub fn query(&self) -> String {
        let mut q = QueryString::default();
        match self {
            PolicyDelete::All => q.push("all", true),
            PolicyDelete::Named { name, namespace } => {
                q.push("name", name);
                q.push_opt("namespace", namespace.as_deref());
            }
        }
        q.finish()
    }
}

/// `GET /v1/flows`: the recent flows `filter` selects, optionally only the
/// last N, optionally followed live.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowsQuery {
    pub filter: FlowFilter,
    /// Only the last N matching flows of the agent's ring.
    pub last: Option<usize>,
    /// Keep the stream open and receive new flows as they happen.
    pub follow: bool,
}

impl FlowsQuery {
    pub fn query(&self) -> String {
        let mut q = filter_query(&self.filter);
        q.push_opt("last", self.last);
        if self.follow {
            q.push("follow", true);
        }
        q.finish()
    }
}

/// The query string of `GET /v1/monitor` for `filter`.
pub fn monitor_query(filter: &FlowFilter) -> String {
    filter_query(filter).finish()
}

fn filter_query(f: &FlowFilter) -> QueryString {
    let mut q = QueryString::default();
    q.push_opt("from_label", f.from_label.as_deref());
    q.push_opt("to_label", f.to_label.as_deref());
    q.push_opt("from_ip", f.from_ip.as_deref());
    q.push_opt("to_ip", f.to_ip.as_deref());
    q.push_opt("namespace", f.namespace.as_deref());
    q.push_opt("verdict", f.verdict.as_deref());
    q.push_opt("protocol", f.protocol.as_deref());
    q.push_opt("types", f.types.as_deref());
    q.push_opt("port", f.port);
    q.push_opt("since_ns", f.since_ns);
    q.push_opt("related_to", f.related_to);
    q.push_opt("http_method", f.http_method.as_deref());
    q.push_opt("http_path", f.http_path.as_deref());
    q
}

/// `key=value` pairs, values percent-encoded.
#[derive(Default)]
struct QueryString(Vec<String>);

impl QueryString {
    fn push(&mut self, key: &str, value: impl Display) {
        self.0.push(format!("{key}={}", encode(&value.to_string())));
    }

    fn push_opt(&mut self, key: &str, value: Option<impl Display>) {
        if let Some(v) = value {
            self.push(key, v);
        }
    }

    fn finish(self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!("?{}", self.0.join("&"))
        }
    }
}

/// Percent-encodes a query value or a path segment (RFC 3986 unreserved
/// characters kept), so a `/`, `&` or space in a name stays in its place.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_query_values_are_encoded() {
        assert_eq!(
            EndpointQuery::attachment("a b", "eth0", "net/1").query(),
            "?container_id=a%20b&ifname=eth0&network=net%2F1"
        );
    }

    #[test]
    fn an_empty_query_adds_nothing_to_the_path() {
        assert_eq!(EndpointQuery::default().query(), "");
        assert_eq!(monitor_query(&FlowFilter::default()), "");
    }

    #[test]
    fn a_policy_name_with_query_syntax_stays_one_value() {
        let q = PolicyDelete::Named {
            name: "a&all=true".into(),
            namespace: Some("prod".into()),
        };
        assert_eq!(q.query(), "?name=a%26all%3Dtrue&namespace=prod");
        assert_eq!(PolicyDelete::All.query(), "?all=true");
    }

    #[test]
    fn flows_query_carries_filter_last_and_follow() {
        let q = FlowsQuery {
            filter: FlowFilter {
                to_label: Some("class=deathstar".into()),
                verdict: Some("DROPPED".into()),
                port: Some(80),
                ..Default::default()
            },
            last: Some(20),
            follow: true,
        };
        assert_eq!(
            q.query(),
            "?to_label=class%3Ddeathstar&verdict=DROPPED&port=80&last=20&follow=true"
        );
    }

    #[test]
    fn monitor_query_carries_types_and_endpoint() {
        let f = FlowFilter {
            types: Some("drop,trace".into()),
            related_to: Some(3),
            ..Default::default()
        };
        assert_eq!(monitor_query(&f), "?types=drop%2Ctrace&related_to=3");
    }

    #[test]
    fn http_filters_travel_encoded() {
        let f = FlowFilter {
            types: Some("l7".into()),
            http_method: Some("PUT".into()),
            http_path: Some("/v1/.*".into()),
            ..Default::default()
        };
        assert_eq!(
            monitor_query(&f),
            "?types=l7&http_method=PUT&http_path=%2Fv1%2F.%2A"
        );
    }
}
