//! Compiles the C datapath under `bpf/` with clang into BPF objects that the
//! crate embeds, so every binary carries exactly the datapath it was built
//! with and nodes need no compiler.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (source under bpf/, object name, extra clang arguments). `lxc_generic`
/// is the endpoint program that reads its configuration from a map instead of
/// `.rodata` (see bpf/lib/config.h).
const PROGRAMS: &[(&str, &str, &[&str])] = &[
    ("lxc", "lxc", &[]),
    ("lxc", "lxc_generic", &["-DCILIA_GENERIC"]),
    ("overlay", "overlay", &[]),
    ("probe", "probe", &[]),
    ("sock", "sock", &[]),
    ("xdp", "xdp", &[]),
    ("floor", "floor", &[]),
];

fn multiarch_include() -> Option<PathBuf> {
    let out = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let arch = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!arch.is_empty()).then(|| Path::new("/usr/include").join(arch))
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let bpf = manifest.join("../../bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));
    let clang = std::env::var("CILIA_CLANG").unwrap_or_else(|_| "clang-19".into());
    println!("cargo:rerun-if-env-changed=CILIA_CLANG");
    let strip = std::env::var("CILIA_LLVM_STRIP").unwrap_or_else(|_| "llvm-strip-19".into());
    println!("cargo:rerun-if-env-changed=CILIA_LLVM_STRIP");
    for dir in ["", "lib", "include/cilia"] {
        let d = bpf.join(dir);
        for entry in std::fs::read_dir(&d).expect("bpf/ is readable").flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
    for (prog, object, extra) in PROGRAMS {
        let mut cmd = Command::new(&clang);
        cmd.args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .args(*extra)
            .arg("-I")
            .arg(bpf.join("include"));
        if let Some(inc) = multiarch_include() {
            cmd.arg("-I").arg(inc);
        }
        cmd.arg("-c")
            .arg(bpf.join(format!("{prog}.c")))
            .arg("-o")
            .arg(out.join(format!("{object}.o")));
        let status = cmd.status().unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} ({e}): the BPF datapath needs clang-19 and libbpf-dev \
                 (run scripts/setup.sh, or apt-get install clang-19 libbpf-dev)"
            )
        });
        assert!(status.success(), "{clang} failed to compile bpf/{prog}.c");
        // `-g` is what makes clang emit BTF (maps, CO-RE, the verifier's
        // line info in .BTF.ext); the DWARF it also emits is used by
        // nothing that loads the object, and is 35-40 % of it. Every agent
        // carries these objects and parses them, so their size is resident
        // memory: strip it.
        let path = out.join(format!("{object}.o"));
        let status = Command::new(&strip)
            .arg("--strip-debug")
            .arg(&path)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {strip} ({e}): the BPF build needs llvm-19 \
                     (run scripts/setup.sh, or apt-get install llvm-19)"
                )
            });
        assert!(status.success(), "{strip} failed on {}", path.display());
    }
}
