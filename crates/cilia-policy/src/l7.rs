//! HTTP rules (`toPorts[].rules.http[]`): their source form, which is what the
//! agent stores, traces and hands to the proxy, and their compiled form, which
//! is what decides a request. One matcher serves `cilia policy trace` and the
//! proxy, so the two can never disagree about a request.
//!
//! Matching follows upstream Cilium (whose Envoy matches with RE2 `safe_regex`):
//! `method`, `path` and `host` are regular expressions that must match the
//! *whole* value (they are anchored here), `path` is matched against the
//! request target as sent (path and query), `host` against the `Host` header
//! (the authority, port included when the client sent one). `headers` entries
//! are `Name` (present) or `Name: value` (present with exactly that value);
//! header names are case-insensitive. An absent field matches everything; a
//! rule with no field at all matches every request.

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// Compiled size limit of one regular expression: a policy author cannot make
/// the proxy build (or run) an automaton of unbounded size.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One HTTP rule as written in the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleSpec {
    /// Regular expression matched against the whole request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Regular expression matched against the whole request target (path and query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Regular expression matched against the whole `Host` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Name` or `Name: value`; every entry must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Structured header conditions; every entry must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_matches: Vec<HeaderMatchSpec>,
}

/// `headerMatches[]`: a header that must be present, with `value` when given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value; absent or empty: presence only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Why an HTTP rule cannot be compiled. `field` is relative to the rule
/// (`method`, `headers[1]` …); callers prefix the rule's own path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct L7Error {
    /// The offending field of the rule.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A request as the matcher sees it.
pub trait RequestView {
    /// The method (`GET`, `POST` …).
    fn method(&self) -> &str;
    /// The request target as sent: path and query.
    fn path(&self) -> &str;
    /// The `Host` header (HTTP/1.1) or `:authority` (HTTP/2), if any.
    fn host(&self) -> Option<&str>;
    /// Whether header `name` (lowercase) is present, with exactly `value` when given.
    fn has_header(&self, name: &str, value: Option<&str>) -> bool;
}

/// A request given as plain values: what `cilia policy trace` builds from its flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimpleRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host` header.
    pub host: Option<String>,
    /// Headers as (name, value); names compare case-insensitively.
    pub headers: Vec<(String, String)>,
}

impl RequestView for SimpleRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }
    fn has_header(&self, name: &str, value: Option<&str>) -> bool {
        self.headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && value.is_none_or(|want| v == want))
    }
}

/// A compiled [`HttpRuleSpec`].
#[derive(Debug, Clone)]
pub struct HttpRule {
    spec: HttpRuleSpec,
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    /// (lowercase name, exact value or presence).
    headers: Vec<(String, Option<String>)>,
}

fn anchored(field: &str, pattern: &str) -> Result<Regex, L7Error> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| L7Error {
            field: field.to_string(),
            reason: format!("invalid regular expression: {}", first_line(&e.to_string())),
        })
}

fn first_line(s: &str) -> String {
    // regex errors span several lines (the pattern with a caret under it); the
    // last line names the problem.
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

fn header_name(field: &str, name: &str) -> Result<String, L7Error> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        let excerpt: String = name.chars().take(40).collect();
        return Err(L7Error {
            field: field.to_string(),
            reason: format!("{excerpt:?} is not an HTTP header name"),
        });
    }
    Ok(name.to_ascii_lowercase())
}

impl HttpRule {
    /// Compiles a rule; the error names the field and why.
    pub fn compile(spec: &HttpRuleSpec) -> Result<HttpRule, L7Error> {
        let regex =
            |field: &str, p: &Option<String>| p.as_deref().map(|p| anchored(field, p)).transpose();
        let mut headers = Vec::new();
        for (i, h) in spec.headers.iter().enumerate() {
            let field = format!("headers[{i}]");
            let (name, value) = match h.split_once(':') {
                Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
                None => (h.trim(), None),
            };
            headers.push((header_name(&field, name)?, value));
        }
        for (i, m) in spec.header_matches.iter().enumerate() {
            let field = format!("headerMatches[{i}].name");
            let value = m.value.clone().filter(|v| !v.is_empty());
            headers.push((header_name(&field, &m.name)?, value));
        }
        Ok(HttpRule {
            spec: spec.clone(),
            method: regex("method", &spec.method)?,
            path: regex("path", &spec.path)?,
            host: regex("host", &spec.host)?,
            headers,
        })
    }

    /// The rule as written.
    pub fn spec(&self) -> &HttpRuleSpec {
        &self.spec
    }

    /// Whether the request satisfies every condition of the rule.
    pub fn matches(&self, req: &dyn RequestView) -> bool {
        if self
            .method
            .as_ref()
            .is_some_and(|r| !r.is_match(req.method()))
        {
            return false;
        }
        if self.path.as_ref().is_some_and(|r| !r.is_match(req.path())) {
            return false;
        }
        if let Some(r) = &self.host {
            if !req.host().is_some_and(|h| r.is_match(h)) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, value)| req.has_header(name, value.as_deref()))
    }
}

/// What an L7 entry lets through: every request, or those matching one of the rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L7Policy {
    /// An L4-only rule covers the same peer and port: every request passes (the
    /// traffic still goes through the proxy, and is still recorded).
    AllowAll,
    /// Only requests matching one of these rules pass.
    Http(Vec<HttpRuleSpec>),
}

/// Where one HTTP rule of a resolved L7 policy was written:
/// `<rule> toPorts[i].rules.http[j]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpOrigin {
    /// The allow rule.
    pub rule: crate::RuleRef,
    /// Index of the `toPorts` entry within the rule.
    pub to_ports: usize,
    /// Index within that entry's `rules.http`.
    pub http: usize,
}

impl std::fmt::Display for HttpOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} toPorts[{}].rules.http[{}]",
            self.rule, self.to_ports, self.http
        )
    }
}

/// The L7 policy of one proxied map entry: the union of the HTTP rules of every
/// allow rule covering the entry's packets (or every request, when one of
/// those rules has none), and the rules behind it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResolvedL7 {
    /// What the proxy lets through.
    pub policy: L7Policy,
    /// Where each rule of `policy` (when [`L7Policy::Http`]) was written, in
    /// the same order; empty for [`L7Policy::AllowAll`].
    pub origins: Vec<HttpOrigin>,
    /// Every allow rule covering the entry that counts: those with HTTP rules,
    /// and the first L4-only allow of each covering key, in merge order.
    pub rules: Vec<crate::RuleRef>,
}

impl ResolvedL7 {
    /// `rules`, as displayed (what the proxy's `L7Entry::rules` carry).
    pub fn rule_names(&self) -> Vec<String> {
        self.rules.iter().map(ToString::to_string).collect()
    }
}

/// A compiled [`L7Policy`].
#[derive(Debug, Clone)]
pub enum CompiledL7 {
    /// Every request passes.
    AllowAll,
    /// Requests matching one of the rules pass.
    Http(Vec<HttpRule>),
}

impl CompiledL7 {
    /// Compiles every rule; the error's field is prefixed with `http[i].`.
    pub fn compile(policy: &L7Policy) -> Result<CompiledL7, L7Error> {
        match policy {
            L7Policy::AllowAll => Ok(CompiledL7::AllowAll),
            L7Policy::Http(rules) => rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    HttpRule::compile(r).map_err(|e| L7Error {
                        field: format!("http[{i}].{}", e.field),
                        reason: e.reason,
                    })
                })
                .collect::<Result<_, _>>()
                .map(CompiledL7::Http),
        }
    }

    /// `Some(index)` of the first matching rule (`Some(0)` for allow-all), or
    /// `None` when the request is denied.
    pub fn decide(&self, req: &dyn RequestView) -> Option<usize> {
        match self {
            CompiledL7::AllowAll => Some(0),
            CompiledL7::Http(rules) => rules.iter().position(|r| r.matches(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> SimpleRequest {
        SimpleRequest {
            method: method.into(),
            path: path.into(),
            host: Some("deathstar.empire.svc".into()),
            headers: vec![("X-Ship".into(), "tie".into())],
        }
    }

    fn rule(method: &str, path: &str) -> HttpRule {
        HttpRule::compile(&HttpRuleSpec {
            method: Some(method.into()),
            path: Some(path.into()),
            ..Default::default()
        })
        .expect("valid rule")
    }

    #[test]
    fn method_and_path_must_match_whole_values() {
        let r = rule("POST", "/v1/request-landing");
        assert!(r.matches(&req("POST", "/v1/request-landing")));
        assert!(!r.matches(&req("PUT", "/v1/request-landing")));
        assert!(!r.matches(&req("POST", "/v1/request-landing/x")));
        assert!(!r.matches(&req("POST", "/x/v1/request-landing")));
        assert!(!r.matches(&req("XPOST", "/v1/request-landing")));
    }

    #[test]
    fn an_alternation_is_anchored_as_a_whole() {
        let r = rule("GET|HEAD", "/public/.*");
        assert!(r.matches(&req("HEAD", "/public/a")));
        assert!(!r.matches(&req("GETX", "/public/a")));
        assert!(!r.matches(&req("XHEAD", "/public/a")));
    }

    #[test]
    fn the_query_is_part_of_the_path() {
        let r = rule("GET", "/v1/status");
        assert!(!r.matches(&req("GET", "/v1/status?all=1")));
    }

    #[test]
    fn headers_need_presence_or_the_exact_value() {
        let spec = |h: &str| HttpRuleSpec {
            headers: vec![h.into()],
            ..Default::default()
        };
        let ok = |h: &str| {
            HttpRule::compile(&spec(h))
                .expect("valid")
                .matches(&req("GET", "/"))
        };
        assert!(ok("x-ship"));
        assert!(ok("X-Ship: tie"));
        assert!(!ok("X-Ship: xwing"));
        assert!(!ok("X-Other"));
    }

    #[test]
    fn host_is_required_when_a_host_rule_exists() {
        let r = HttpRule::compile(&HttpRuleSpec {
            host: Some(r"deathstar\..*".into()),
            ..Default::default()
        })
        .expect("valid");
        assert!(r.matches(&req("GET", "/")));
        let mut no_host = req("GET", "/");
        no_host.host = None;
        assert!(!r.matches(&no_host));
    }

    #[test]
    fn a_bad_regex_names_its_field() {
        let err = CompiledL7::compile(&L7Policy::Http(vec![
            HttpRuleSpec::default(),
            HttpRuleSpec {
                path: Some("/v1/(".into()),
                ..Default::default()
            },
        ]))
        .expect_err("unbalanced group");
        assert_eq!(err.field, "http[1].path");
        assert!(
            err.reason.starts_with("invalid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_header_name_is_refused() {
        let err = HttpRule::compile(&HttpRuleSpec {
            headers: vec!["Bad Name: x".into()],
            ..Default::default()
        })
        .expect_err("space in name");
        assert_eq!(err.field, "headers[0]");
    }

    #[test]
    fn decide_names_the_first_matching_rule() {
        let l7 = CompiledL7::compile(&L7Policy::Http(vec![
            HttpRuleSpec {
                method: Some("GET".into()),
                ..Default::default()
            },
            HttpRuleSpec {
                method: Some("POST".into()),
                ..Default::default()
            },
        ]))
        .expect("valid");
        assert_eq!(l7.decide(&req("POST", "/")), Some(1));
        assert_eq!(l7.decide(&req("PUT", "/")), None);
        assert_eq!(CompiledL7::AllowAll.decide(&req("PUT", "/")), Some(0));
    }
}
