//! Hotfix: an attached endpoint's programs are re-specialized and swapped
//! inside their pinned links. The link stays (same id), the program is new;
//! a successor the verifier rejects leaves the old program attached; pinned
//! maps of another layout are refused, not silently reused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cilia_abi::EndpointConfig;
use cilia_datapath::inspect::{link_target, program_tag};
use cilia_datapath::object::{LXC_OBJECT, MAP_CT, PROG_TO_CONTAINER};
use cilia_datapath::{BpfDatapath, DatapathError};
use cilia_testnet::{BpfRoot, Netns};

mod common;
use common::*;

fn config(ifindex: u32) -> EndpointConfig {
    EndpointConfig {
        ipv6: a6().octets(),
        ipv4: a4().octets(),
        mac: A_MAC,
        node_mac: A_NODE_MAC,
        ifindex,
        identity: 300,
        endpoint_id: 9,
        enable_ipv4: 1,
        monitor: 1,
    }
}

/// A bpffs root with endpoint 9 attached to `lxc9` in a fresh namespace.
struct Attached {
    _ns: Netns,
    root: BpfRoot,
    dp: BpfDatapath,
    config: EndpointConfig,
}

fn attached(prefix: &str) -> Attached {
    let root = BpfRoot::new();
    let ns = Netns::new(prefix).unwrap();
    ns.ip(&[
        "link", "add", "lxc9", "type", "veth", "peer", "name", "peer9",
    ])
    .unwrap();
    let ifindex: u32 = ns.run(|| nix::net::if_::if_nametoindex("lxc9").unwrap());
    let dp = BpfDatapath::open(root.path()).unwrap();
    let config = config(ifindex);
    ns.run(|| dp.attach_endpoint(&config, "lxc9")).unwrap();
    Attached {
        _ns: ns,
        root,
        dp,
        config,
    }
}

/// (link id, program id) of both of endpoint 9's links.
fn links(a: &Attached) -> Vec<(u32, u32)> {
    ["ep9", "ep9_to"]
        .iter()
        .map(|p| {
            let t = link_target(&a.root.path().join("links").join(p)).unwrap();
            (t.link_id, t.program_id)
        })
        .collect()
}

#[test]
fn reload_swaps_the_program_inside_the_same_link() {
    privileged!("reload_swaps");
    let a = attached("crld");
    let before = links(&a);
    let config = a.config;
    let done = a.dp.reload_endpoint(&config, true).unwrap();
    assert!(done.swapped);
    let after = links(&a);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.0, new.0, "same link");
        assert_ne!(old.1, new.1, "new program");
    }
    let reported: Vec<(u32, u32)> = done
        .links
        .iter()
        .map(|l| (l.link_id, l.new_program_id))
        .collect();
    assert_eq!(reported, after);
    // Same build, same configuration: the check still says all is current.
    let checks = a.dp.check_links(&config).unwrap().unwrap();
    assert!(checks.iter().all(|c| c.config_matches && c.build_matches));
}

#[test]
fn reload_without_force_leaves_programs_of_this_build_alone() {
    privileged!("reload_unchanged");
    let a = attached("crlu");
    let before = links(&a);
    let config = a.config;
    // Learns this build's tags from a program specialized for `config`.
    assert!(a.dp.check_links(&config).unwrap().unwrap()[0].build_matches);
    let done = a.dp.reload_endpoint(&config, false).unwrap();
    assert!(!done.swapped);
    assert_eq!(links(&a), before);
    // A changed configuration is swapped in without force.
    let mut relabelled = config;
    relabelled.identity = 301;
    let done = a.dp.reload_endpoint(&relabelled, false).unwrap();
    assert!(done.swapped);
    // A tag does not depend on the specialization: another identity's
    // program is still this build's.
    let checks = a.dp.check_links(&relabelled).unwrap().unwrap();
    assert!(checks.iter().all(|c| c.config_matches && c.build_matches));
}

/// The section header table of an ELF64 little-endian object: the file
/// offset of section `index`.
fn section_offset(elf: &[u8], index: usize) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize) = (u64_at(0x28), u16_at(0x3a));
    u64_at(shoff + index * shentsize + 24)
}

/// This build's lxc.o with the to-container program's first instruction
/// replaced by a read far outside its context: `r0 = *(u64 *)(r1 + 32752)`.
fn object_the_verifier_rejects() -> Vec<u64> {
    let obj = aya_obj::Object::parse(LXC_OBJECT).unwrap();
    let prog = &obj.programs[PROG_TO_CONTAINER];
    let at = section_offset(LXC_OBJECT, prog.section_index) + prog.address as usize;
    let mut bytes = LXC_OBJECT.to_vec();
    assert_ne!(bytes[at], 0x18, "first instruction is no map load");
    bytes[at..at + 8].copy_from_slice(&[0x79, 0x10, 0xf0, 0x7f, 0, 0, 0, 0]);
    // Loading needs the object 8-byte aligned, as embedded ones are.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    words
}

#[test]
fn a_successor_the_verifier_rejects_leaves_the_old_programs_attached() {
    privileged!("reload_rejected");
    let a = attached("crlr");
    let before = links(&a);
    let words = object_the_verifier_rejects();
    // SAFETY: a u64 slice viewed as its bytes.
    let object =
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
    let config = a.config;
    let err =
        a.dp.reload_endpoint_from(object, &config, true)
            .unwrap_err();
    let DatapathError::Verifier { name, summary, .. } = &err else {
        panic!("not a verifier rejection: {err}");
    };
    assert_eq!(name, PROG_TO_CONTAINER);
    assert!(summary.contains("invalid bpf_context access"), "{summary}");
    assert!(err.to_string().len() < 600, "a short message: {err}");
    assert_eq!(links(&a), before, "both links keep their programs");
    assert!(a.dp.endpoint_attached(9));
}

#[test]
fn a_program_of_another_build_is_reported_as_such() {
    privileged!("reload_other_build");
    let a = attached("crlb");
    let pin = a.root.path().join("links").join("ep9");
    let attached_tag = program_tag(link_target(&pin).unwrap().program_id).unwrap();
    let checks = a.dp.check_links(&a.config).unwrap().unwrap();
    assert!(checks.iter().all(|c| c.build_matches));
    // Swap in a program of other code (the probe object's empty program).
    let mut probe = aya::Ebpf::load(cilia_datapath::object::PROBE_OBJECT).unwrap();
    let prog: &mut aya::programs::SchedClassifier = probe
        .program_mut(cilia_datapath::object::PROG_EMPTY)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let link = aya::programs::links::FdLink::from(
        aya::programs::links::PinnedLink::from_pin(&pin).unwrap(),
    );
    let id = prog.attach_to_link(link.try_into().unwrap()).unwrap();
    drop(prog.take_link(id).unwrap());
    assert_ne!(
        program_tag(link_target(&pin).unwrap().program_id).unwrap(),
        attached_tag
    );
    let checks = a.dp.check_links(&a.config).unwrap().unwrap();
    assert!(!checks[0].build_matches, "{checks:?}");
    assert!(checks[1].build_matches, "{checks:?}");
}

#[test]
fn reload_refuses_a_pinned_map_whose_layout_changed() {
    privileged!("reload_map_layout");
    let a = attached("crlm");
    a.dp.check_pins().unwrap();
    // Someone replaced the conntrack pin with a map of another layout.
    let ct = a.root.path().join("maps").join(MAP_CT);
    std::fs::remove_file(&ct).unwrap();
    let mut other = aya::maps::Array::<aya::maps::MapData, u32>::create(1, 0).unwrap();
    other.set(0, 1, 0).unwrap();
    other.pin(&ct).unwrap();
    let err = a.dp.check_pins().unwrap_err().to_string();
    assert!(err.contains("cilia_ct: type"), "{err}");
    assert!(err.contains("restart cilia-agent"), "{err}");
}
