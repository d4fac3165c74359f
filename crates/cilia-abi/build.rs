//! Generates the ABI's Rust constants from `bpf/include/cilia/abi.h`
//! (`$OUT_DIR/consts.rs`, see `build/consts.rs`), and compiles a tiny C
//! program against the header with the host compiler that records every
//! struct's size and field offsets and the value of every `CILIA_` macro the
//! preprocessor defines, so the tests compare Rust against the C header
//! itself, not against a copy.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/consts.rs"]
mod consts;

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
    (
        "ipcache_value",
        &["identity", "flags", "tunnel", "tunnel_family", "encap_key"],
    ),
    ("node_value", &["flags"]),
    (
        "node_config",
        &[
            "tunnel_mode",
            "tunnel_ifindex",
            "underlay_ifindex",
            "tunnel_port",
        ],
    ),
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
            "proxy_port",
            "rev_nat",
            "backend_id",
        ],
    ),
    (
        "lb_service_key",
        &["addr", "port", "proto", "family", "slot", "gen"],
    ),
    (
        "lb_service_value",
        &[
            "backend_id",
            "count",
            "rev_nat",
            "gen",
            "algorithm",
            "flags",
            "affinity_timeout",
        ],
    ),
    ("lb_backend", &["addr", "port", "family", "state"]),
    ("lb_revnat", &["addr", "port", "family"]),
    ("lb_affinity_key", &["addr", "rev_nat", "family"]),
    ("lb_affinity_value", &["last_used", "backend_id"]),
    (
        "lb_nat_key",
        &["saddr", "daddr", "sport", "dport", "proto", "family", "dir"],
    ),
    (
        "lb_nat_value",
        &[
            "addr",
            "port",
            "fport",
            "backend_id",
            "expires",
            "rev_nat",
            "family",
        ],
    ),
    ("prefilter_v4_key", &["prefixlen", "addr"]),
    ("prefilter_v6_key", &["prefixlen", "addr"]),
    ("prefilter_value", &["counter"]),
    ("lb_stats", &["flows", "packets", "bytes"]),
    ("lb_sock_key", &["cookie", "addr", "port", "family", "kind"]),
    (
        "lb_sock_value",
        &["addr", "port", "family", "backend_id", "rev_nat"],
    ),
    ("frag_key", &["saddr", "daddr", "id", "proto", "family"]),
    ("frag_value", &["expires", "sport", "dport"]),
    (
        "global_config",
        &["policy_rev", "monitor_level", "ct_budget", "maglev_size"],
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
    println!("cargo:rerun-if-changed=build/consts.rs");
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
    // Constants: every CILIA_ macro the preprocessor defines, whichever way
    // abi.h spells it, valued by the C compiler.
    let cc = std::env::var("HOST_CC").unwrap_or_else(|_| "cc".into());
    c.push_str("printf(\"pub const C_CONSTANTS: &[(&str, u64)] = &[\\n\");\n");
    for name in c_macro_names(&cc, &include, &header) {
        c.push_str(&format!(
            "printf(\"(\\\"{name}\\\", %llu),\\n\", (unsigned long long)({name}));\n"
        ));
    }
    c.push_str("printf(\"];\\n\");\nreturn 0;}\n");

    let text = std::fs::read_to_string(&header).expect("abi.h is readable");
    match consts::generate(&text) {
        Ok(rust) => std::fs::write(out.join("consts.rs"), rust).expect("write consts.rs"),
        Err(e) => panic!("cannot generate the Rust constants of the ABI: {e}"),
    }

    let src = out.join("layout.c");
    let bin = out.join("layout");
    std::fs::write(&src, c).expect("write layout.c");
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

/// Names of the object-like `CILIA_` macros abi.h defines, as the C
/// preprocessor lists them (`-dM`), without the excluded ones.
fn c_macro_names(cc: &str, include: &Path, header: &Path) -> Vec<String> {
    let output = Command::new(cc)
        .args(["-dM", "-E", "-I"])
        .arg(include)
        .arg(header)
        .output()
        .unwrap_or_else(|e| panic!("cannot run host C compiler {cc}: {e}"));
    assert!(
        output.status.success(),
        "preprocessing abi.h failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("#define ")?.split(' ').next())
        .filter(|n| n.starts_with("CILIA_") && !n.contains('('))
        .filter(|n| !consts::EXCLUDED.contains(n))
        .map(String::from)
        .collect();
    names.sort();
    names
}
