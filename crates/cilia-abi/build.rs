//! Compiles a tiny C program against `bpf/include/cilia/abi.h` with the host
//! compiler and records every struct's size and field offsets, so the layout
//! test compares Rust against the C header itself, not against a copy.

use std::path::PathBuf;
use std::process::Command;

const STRUCTS: &[(&str, &[&str])] = &[
    (
        "endpoint_config",
        &[
            "ipv6",
            "ipv4",
            "mac",
            "node_mac",
            "ifindex",
            "identity",
            "endpoint_id",
            "enable_ipv4",
            "monitor",
        ],
    ),
    ("endpoint_key", &["addr", "family"]),
    (
        "endpoint_info",
        &[
            "ifindex",
            "identity",
            "endpoint_id",
            "flags",
            "mac",
            "node_mac",
        ],
    ),
    ("metrics_key", &["kind", "reason", "dir"]),
    ("metrics_value", &["packets", "bytes"]),
    ("ipcache_key", &["prefixlen", "family", "addr"]),
    ("ipcache_value", &["identity", "flags"]),
    (
        "policy_key",
        &["prefixlen", "identity", "direction", "proto", "dport"],
    ),
    ("policy_value", &["verdict", "match", "proxy_port", "rule"]),
    (
        "ct_key",
        &["saddr", "daddr", "sport", "dport", "proto", "family"],
    ),
    (
        "ct_value",
        &[
            "expires",
            "packets",
            "bytes",
            "policy_rev",
            "src_identity",
            "dst_identity",
            "flags",
            "owner",
        ],
    ),
    ("frag_key", &["saddr", "daddr", "id", "proto", "family"]),
    ("frag_value", &["expires", "sport", "dport"]),
    (
        "global_config",
        &["policy_rev", "monitor_level", "ct_budget"],
    ),
    (
        "event",
        &[
            "ts",
            "type",
            "reason",
            "dir",
            "verdict",
            "endpoint_id",
            "peer_endpoint",
            "src_identity",
            "dst_identity",
            "rule",
            "len",
            "family",
            "proto",
            "match",
            "caplen",
            "sport",
            "dport",
            "saddr",
            "daddr",
            "data",
        ],
    ),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let include = manifest.join("../../bpf/include");
    let header = include.join("cilia/abi.h");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));

    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"cilia/abi.h\"\nint main(void){\n",
    );
    c.push_str("printf(\"pub const C_LAYOUT: &[(&str, &str, usize)] = &[\\n\");\n");
    for (name, fields) in STRUCTS {
        c.push_str(&format!(
            "printf(\"(\\\"{name}\\\", \\\"\\\", %zu),\\n\", sizeof(struct {name}));\n"
        ));
        for f in *fields {
            c.push_str(&format!(
                "printf(\"(\\\"{name}\\\", \\\"{f}\\\", %zu),\\n\", offsetof(struct {name}, {f}));\n"
            ));
        }
    }
    c.push_str("printf(\"];\\n\");\n");
    // Constants: every #define CILIA_* with a numeric value.
    let text = std::fs::read_to_string(&header).expect("abi.h is readable");
    c.push_str("printf(\"pub const C_CONSTANTS: &[(&str, u64)] = &[\\n\");\n");
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some("#define") {
            if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
                let numeric = value.chars().all(|ch| ch.is_ascii_digit())
                    || (value.starts_with("0x")
                        && value[2..].chars().all(|ch| ch.is_ascii_hexdigit()))
                    // A constant expression, e.g. `(1 << 22)`: C evaluates it.
                    || value.starts_with('(');
                let identifier = name
                    .chars()
                    .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_');
                if name.starts_with("CILIA_") && identifier && numeric {
                    c.push_str(&format!(
                        "printf(\"(\\\"{name}\\\", %llu),\\n\", (unsigned long long)({name}));\n"
                    ));
                }
            }
        }
    }
    c.push_str("printf(\"];\\n\");\nreturn 0;}\n");

    let src = out.join("layout.c");
    let bin = out.join("layout");
    std::fs::write(&src, c).expect("write layout.c");
    let cc = std::env::var("HOST_CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .status()
        .unwrap_or_else(|e| panic!("cannot run host C compiler {cc}: {e}"));
    assert!(status.success(), "compiling the ABI layout probe failed");
    let output = Command::new(&bin).output().expect("run layout probe");
    assert!(output.status.success(), "layout probe failed");
    std::fs::write(out.join("c_layout.rs"), output.stdout).expect("write c_layout.rs");
}
