//! Generates the Rust constants of the ABI from the `#define CILIA_<NAME>
//! <integer literal>` lines of `bpf/include/cilia/abi.h`, so the header is
//! their only definition.
//!
//! Shared by `build.rs` (which writes `$OUT_DIR/consts.rs`) and the crate's
//! tests (which check what it refuses). It refuses, naming the define, any
//! `CILIA_` define whose value is not an integer literal, that no type rule
//! covers, or whose value does not fit its type: a new define needs a rule
//! here, never a hand-written Rust copy.

use std::borrow::ToOwned;
use std::format;
use std::string::String;
use std::vec::Vec;

/// `CILIA_` macros of abi.h that are not constants of the ABI.
pub const EXCLUDED: &[&str] = &["CILIA_ABI_H"]; // the include guard

/// How a type rule picks its defines.
pub enum Pattern {
    Exact(&'static str),
    Prefix(&'static str),
    Suffix(&'static str),
}

/// The Rust type of each constant: the first rule that matches its name wins.
/// The type is that of the field or API the constant is compared with, so
/// callers never cast.
pub const TYPE_RULES: &[(Pattern, &str)] = &[
    // Map capacities (`max_entries`) and sizes.
    (Pattern::Suffix("_MAX"), "u32"),
    (Pattern::Suffix("_SIZE"), "u32"),
    // Bit positions in the metrics array's index: shift amounts.
    (Pattern::Suffix("_SHIFT"), "u32"),
    // Conntrack budget: `global_config.ct_budget`.
    (Pattern::Suffix("_BUDGET_DEFAULT"), "u32"),
    // The length of `event.data`: an array length.
    (Pattern::Suffix("_CAPLEN"), "usize"),
    // Fragment deadline, added to u64 nanosecond clocks.
    (Pattern::Exact("CILIA_FRAG_TIMEOUT"), "u64"),
    // Conntrack states: the `event.reason` byte of debug events.
    (Pattern::Prefix("CILIA_CT_STATE_"), "u8"),
    // Kinds of conntrack key: the `ct_key.kind` byte.
    (Pattern::Prefix("CILIA_CT_KEY_"), "u8"),
    // Conntrack timeouts (seconds).
    (Pattern::Prefix("CILIA_CT_TCP_"), "u32"),
    (Pattern::Prefix("CILIA_CT_OTHER_"), "u32"),
    // Remaining conntrack constants are bits of `ct_value.flags`.
    (Pattern::Prefix("CILIA_CT_"), "u16"),
    // Security identities.
    (Pattern::Prefix("CILIA_ID_"), "u32"),
    // `global_config.monitor_level`.
    (Pattern::Prefix("CILIA_MONITOR_"), "u32"),
    // Byte fields of keys, values and events.
    (Pattern::Prefix("CILIA_FAMILY_"), "u8"),
    (Pattern::Prefix("CILIA_METRIC_"), "u8"),
    (Pattern::Prefix("CILIA_FWD_"), "u8"),
    (Pattern::Prefix("CILIA_DROP_"), "u8"),
    (Pattern::Prefix("CILIA_DIR_"), "u8"),
    (Pattern::Prefix("CILIA_VERDICT_"), "u8"),
    (Pattern::Prefix("CILIA_MATCH_"), "u8"),
    (Pattern::Exact("CILIA_ENFORCE"), "u8"),
    // The enforcement marker's prefix length (`policy_key.prefixlen`).
    (Pattern::Exact("CILIA_POLICY_MARKER_PREFIX"), "u32"),
    (Pattern::Prefix("CILIA_ENFORCE_"), "u8"),
    (Pattern::Prefix("CILIA_EVENT_"), "u8"),
    // `node_config.tunnel_mode`.
    (Pattern::Prefix("CILIA_TUNNEL_"), "u32"),
    // skb->mark / SO_MARK values and mask.
    (Pattern::Prefix("CILIA_MARK_"), "u32"),
    // Load balancing: `lb_service_value.algorithm`/`.flags`, `lb_backend.state`
    // (bytes); the Maglev table size and slot limit are sizes.
    (Pattern::Prefix("CILIA_LB_ALG_"), "u8"),
    (Pattern::Prefix("CILIA_LB_FLAG_"), "u8"),
    (Pattern::Prefix("CILIA_LB_BACKEND_"), "u8"),
    // `event.reason` of a service event.
    (Pattern::Prefix("CILIA_LB_PATH_"), "u8"),
    (Pattern::Exact("CILIA_LB_MAGLEV_SIZE_DEFAULT"), "u32"),
    // The frontend filter: its size in words and bits, the hash's multiplier.
    (Pattern::Prefix("CILIA_ADDR_FILTER_"), "u32"),
    // Socket LB: `lb_sock_key.kind` (byte).
    (Pattern::Prefix("CILIA_LB_SOCK_"), "u8"),
    // Hairpin: the service loopback addresses (IPv4 as a host-order u32,
    // IPv6 as two host-order u64 halves).
    (Pattern::Exact("CILIA_LB_LOOPBACK_IPV4"), "u32"),
    (Pattern::Prefix("CILIA_LB_LOOPBACK_IPV6_"), "u64"),
    // NodePort: the SNAT port range (host order), `lb_nat_key.dir`.
    (Pattern::Prefix("CILIA_LB_SNAT_PORT_"), "u16"),
    (Pattern::Prefix("CILIA_NAT_"), "u8"),
    // DSR option types and lengths (bytes of the packet).
    (Pattern::Prefix("CILIA_DSR_"), "u8"),
    // The XDP program's feature word (`CILIA_XDP_FEATURES`, u32s).
    (Pattern::Prefix("CILIA_XDP_"), "u32"),
    // Routing table id and rule priority (rtnetlink u32 attributes).
    (Pattern::Prefix("CILIA_PROXY_"), "u32"),
];

/// One constant of abi.h.
pub struct Define {
    pub name: String,
    pub value: u64,
    pub ty: &'static str,
    /// The comment on the define's line, then the comment directly above
    /// its group of consecutive defines, as Markdown lines.
    pub doc: Vec<String>,
}

/// The Rust type the rules give `name`, if any.
pub fn rust_type(name: &str) -> Option<&'static str> {
    TYPE_RULES.iter().find_map(|(pattern, ty)| {
        let hit = match pattern {
            Pattern::Exact(n) => name == *n,
            Pattern::Prefix(p) => name.starts_with(p),
            Pattern::Suffix(s) => name.ends_with(s),
        };
        hit.then_some(*ty)
    })
}

/// The largest value each type of the rules holds (usize: the 32-bit one).
fn type_max(ty: &str) -> u64 {
    match ty {
        "u8" => u8::MAX.into(),
        "u16" => u16::MAX.into(),
        "u32" | "usize" => u32::MAX.into(),
        _ => u64::MAX,
    }
}

/// An integer literal as C writes it: decimal or `0x` hex, an optional
/// `U`/`L` suffix, optionally in parentheses.
fn integer_literal(text: &str) -> Option<u64> {
    let mut t = text.trim();
    while let Some(inner) = t.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        t = inner.trim();
    }
    let t = t.trim_end_matches(['u', 'U', 'l', 'L']);
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    // A leading 0 would be octal in C: only "0" itself is read as decimal.
    if t.is_empty() || (t.len() > 1 && t.starts_with('0')) {
        return None;
    }
    t.parse().ok()
}

/// A C comment's text as Markdown: `CILIA_` names become code, and the
/// characters Markdown would take for links, HTML or emphasis are escaped.
fn markdown(comment: &str) -> String {
    let mut out = String::new();
    let mut rest = comment;
    while let Some(c) = rest.chars().next() {
        let at_word_start = !out.ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_');
        if at_word_start && rest.starts_with("CILIA_") {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '*'))
                .unwrap_or(rest.len());
            out.push('`');
            out.push_str(&rest[..end]);
            out.push('`');
            rest = &rest[end..];
            continue;
        }
        if matches!(c, '[' | ']' | '<' | '>' | '*' | '_' | '`' | '\\') {
            out.push('\\');
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The lines of a C comment's text, without `/*`, `*/` and leading `*`.
fn comment_lines(raw: &str) -> Vec<String> {
    let body = raw.trim().trim_start_matches("/*").trim_end_matches("*/");
    body.lines()
        .map(|l| l.trim().trim_start_matches('*').trim())
        .filter(|l| !l.is_empty())
        .map(markdown)
        .collect()
}

/// Every constant of abi.h, in header order.
pub fn parse(header: &str) -> Result<Vec<Define>, String> {
    let mut defines = Vec::new();
    // The comment that heads the current run of consecutive defines.
    let mut group: Vec<String> = Vec::new();
    let mut lines = header.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let number = index + 1;
        let trimmed = line.trim();
        if trimmed.starts_with("/*") {
            let mut raw = trimmed.to_owned();
            while !raw.contains("*/") {
                let Some((_, next)) = lines.next() else {
                    return Err(format!("abi.h line {number}: comment never closed"));
                };
                raw.push('\n');
                raw.push_str(next);
            }
            group = comment_lines(&raw);
            continue;
        }
        let Some(directive) = trimmed.strip_prefix('#') else {
            group.clear();
            continue;
        };
        let Some(rest) = directive.trim_start().strip_prefix("define") else {
            group.clear();
            continue;
        };
        let rest = rest.trim_start();
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if !name.starts_with("CILIA_") || EXCLUDED.contains(&name) {
            continue;
        }
        let (value_text, trailing) = match rest[name_end..].split_once("/*") {
            Some((v, c)) => (v, Some(c)),
            None => (&rest[name_end..], None),
        };
        let value_text = value_text.split("//").next().unwrap_or_default().trim();
        let excerpt: String = value_text.chars().take(40).collect();
        let Some(value) =
            integer_literal(value_text).filter(|_| !rest[name_end..].starts_with('('))
        else {
            return Err(format!(
                "abi.h line {number}: #define {name}: `{excerpt}` is not an integer literal \
                 (decimal or 0x hex, optional U/L suffix and parentheses); \
                 only literals become Rust constants"
            ));
        };
        let Some(ty) = rust_type(name) else {
            return Err(format!(
                "abi.h line {number}: #define {name}: no type rule matches this name; \
                 add one to TYPE_RULES in crates/cilia-abi/build/consts.rs"
            ));
        };
        if value > type_max(ty) {
            return Err(format!(
                "abi.h line {number}: #define {name}: {value} does not fit its Rust type {ty}"
            ));
        }
        // The line's own comment is the most specific: it leads, so it is
        // the summary rustdoc lists.
        let mut doc = trailing.map(comment_lines).unwrap_or_default();
        if !doc.is_empty() && !group.is_empty() {
            doc.push(String::new());
        }
        doc.extend(group.iter().cloned());
        defines.push(Define {
            name: name.to_owned(),
            value,
            ty,
            doc,
        });
    }
    Ok(defines)
}

/// The Rust source of the constants: one documented `pub const` each, and
/// for the tests a table of every constant's value as u64.
pub fn generate(header: &str) -> Result<String, String> {
    let defines = parse(header)?;
    let mut out =
        String::from("// Generated by crates/cilia-abi/build.rs from abi.h: do not edit.\n");
    for d in &defines {
        out.push('\n');
        for line in &d.doc {
            if line.is_empty() {
                out.push_str("///\n");
            } else {
                out.push_str(&format!("/// {line}\n"));
            }
        }
        if !d.doc.is_empty() {
            out.push_str("///\n");
        }
        out.push_str(&format!(
            "/// `#define {}` in `bpf/include/cilia/abi.h`.\npub const {}: {} = {};\n",
            d.name, d.name, d.ty, d.value
        ));
    }
    out.push_str(
        "\n/// Every generated constant's value, for the tests against the C compiler.\n\
         #[cfg(test)]\n#[allow(clippy::unnecessary_cast)] // some are u64 already\n\
         const RUST_CONSTANTS: &[(&str, u64)] = &[\n",
    );
    for d in &defines {
        out.push_str(&format!("    (\"{0}\", {0} as u64),\n", d.name));
    }
    out.push_str("];\n");
    Ok(out)
}
