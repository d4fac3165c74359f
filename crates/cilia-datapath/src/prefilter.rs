//! The XDP prefilter (`bpf/xdp.c`): source CIDRs dropped on a node device
//! before the node's stack sees them.
//!
//! ```text
//! <root>/node/prefilter_<mode>_<ifname>   XDP link of cil_xdp_prefilter (mode native|generic)
//! <root>/maps/cilia_prefilter_v4, _v6     LPM tries: CIDR -> counter slot
//! <root>/maps/cilia_prefilter_counters    per-CPU packets/bytes per slot
//! ```
//!
//! Invariants: the links are pinned, so the prefilter keeps dropping while
//! the agent is gone; the mode a link was attached in is part of its pin's
//! name, so it is reported as it is after a restart; a CIDR update is one
//! element update of a trie (atomic for packets), so adding or removing a
//! CIDR never disturbs a packet of another source; attaching again swaps
//! the program inside the pinned link (`BPF_LINK_UPDATE`), so a device
//! never runs without the prefilter once it has it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::lpm_trie::Key;
use aya::maps::{LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use aya::EbpfLoader;
use cilia_abi::{
    MetricsValue, PrefilterCount, PrefilterEntry, PrefilterKey, PrefilterValue, PREFILTER_SLOTS,
};
use ipnet::IpNet;

use crate::endpoint::{is_not_found, lock, pin_mismatch, unpin_link, BpfDatapath};
use crate::error::DatapathError;
use crate::object::{
    MAP_PREFILTER_COUNTERS, MAP_PREFILTER_V4, MAP_PREFILTER_V6, PROG_XDP_PREFILTER, XDP_OBJECT,
};

/// How the prefilter runs on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrefilterMode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// Generic (SKB) XDP: after the socket buffer is built; what a device
    /// without native XDP gets.
    Generic,
}

impl PrefilterMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            _ => None,
        }
    }

    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// The prefilter on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefilterLink {
    pub ifname: String,
    /// The device the link is attached to (0: the device is gone).
    pub ifindex: u32,
    pub mode: PrefilterMode,
    /// Why native mode was refused, when this attach fell back to generic
    /// mode (`None` after a restart: the link was already there).
    pub native_error: Option<String>,
}

type V4Trie = LpmTrie<MapData, [u8; 4], PrefilterValue>;
type V6Trie = LpmTrie<MapData, [u8; 16], PrefilterValue>;

/// Handles on the prefilter's pinned maps.
pub(crate) struct PrefilterMaps {
    v4: Mutex<V4Trie>,
    v6: Mutex<V6Trie>,
    counters: Mutex<PerCpuArray<MapData, MetricsValue>>,
}

const PREFILTER_MAPS: [&str; 3] = [MAP_PREFILTER_V4, MAP_PREFILTER_V6, MAP_PREFILTER_COUNTERS];

impl PrefilterMaps {
    /// Opens (creating and pinning on first use) the prefilter's maps in
    /// `maps_dir`. A pin of another layout is recreated: the agent writes
    /// the CIDRs again from its store (their counters start over).
    pub(crate) fn open(maps_dir: &Path) -> Result<Self, DatapathError> {
        let object = aya_obj::Object::parse(XDP_OBJECT).map_err(|e| DatapathError::BpfRoot {
            path: maps_dir.to_path_buf(),
            reason: format!("parsing the embedded xdp.o: {e}"),
        })?;
        for name in PREFILTER_MAPS {
            let path = maps_dir.join(name);
            if !path.exists() {
                continue;
            }
            let want = object
                .maps
                .get(name)
                .ok_or(DatapathError::MissingMap(name))?;
            if let Some(reason) = pin_mismatch(&path, want)? {
                tracing::warn!(map = name, %reason, "pinned prefilter map does not match this build: recreating it");
                std::fs::remove_file(&path).map_err(|e| DatapathError::IncompatiblePin {
                    path: path.clone(),
                    reason: format!("{reason}; removing it failed ({e}): delete it by hand"),
                })?;
            }
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir)
            .load(XDP_OBJECT)?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name));
        let v4 = take(MAP_PREFILTER_V4)?;
        let v6 = take(MAP_PREFILTER_V6)?;
        let counters = take(MAP_PREFILTER_COUNTERS)?;
        Ok(Self {
            v4: Mutex::new(
                LpmTrie::try_from(v4).map_err(|e| DatapathError::map(MAP_PREFILTER_V4, e))?,
            ),
            v6: Mutex::new(
                LpmTrie::try_from(v6).map_err(|e| DatapathError::map(MAP_PREFILTER_V6, e))?,
            ),
            counters: Mutex::new(
                PerCpuArray::try_from(counters)
                    .map_err(|e| DatapathError::map(MAP_PREFILTER_COUNTERS, e))?,
            ),
        })
    }

    fn zero_counter(&self, slot: u32) -> Result<(), DatapathError> {
        let err = |e: MapError| DatapathError::map(MAP_PREFILTER_COUNTERS, e);
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DatapathError::io(format!("reading {what}"), e))?;
        let zeros = PerCpuValues::try_from(vec![MetricsValue::default(); cpus])
            .map_err(|e| DatapathError::io("sizing per-CPU counters", e))?;
        lock(&self.counters).set(slot, zeros, 0).map_err(err)
    }

    fn counter(&self, slot: u32) -> Result<MetricsValue, DatapathError> {
        let values = lock(&self.counters)
            .get(&slot, 0)
            .map_err(|e| DatapathError::map(MAP_PREFILTER_COUNTERS, e))?;
        Ok(values
            .iter()
            .fold(MetricsValue::default(), |acc, v| MetricsValue {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            }))
    }

    /// The slot a CIDR has in the kernel, if it is listed.
    fn slot_of(&self, key: &PrefilterKey) -> Result<Option<u32>, DatapathError> {
        let found = match key {
            PrefilterKey::V4(k) => lock(&self.v4)
                .get(&Key::new(k.prefixlen, k.addr), 0)
                .map_err(|e| (MAP_PREFILTER_V4, e)),
            PrefilterKey::V6(k) => lock(&self.v6)
                .get(&Key::new(k.prefixlen, k.addr), 0)
                .map_err(|e| (MAP_PREFILTER_V6, e)),
        };
        match found {
            Ok(v) => Ok(Some(v.counter)),
            Err((_, e)) if is_not_found(&e) => Ok(None),
            Err((name, e)) => Err(DatapathError::map(name, e)),
        }
    }

    pub(crate) fn upsert(&self, entries: &[PrefilterEntry]) -> Result<(), DatapathError> {
        for entry in entries {
            if entry.counter >= PREFILTER_SLOTS {
                return Err(DatapathError::Prefilter {
                    cidr: entry.cidr.to_string(),
                    reason: format!(
                        "counter slot {} is beyond the {PREFILTER_SLOTS} slots",
                        entry.counter
                    ),
                });
            }
            let key = entry.key();
            // A CIDR that keeps its slot keeps its counts (a restart
            // writes every CIDR again); a new one starts from zero.
            if self.slot_of(&key)? == Some(entry.counter) {
                continue;
            }
            self.zero_counter(entry.counter)?;
            let value = entry.value();
            match key {
                PrefilterKey::V4(k) => lock(&self.v4)
                    .insert(&Key::new(k.prefixlen, k.addr), value, 0)
                    .map_err(|e| DatapathError::map(MAP_PREFILTER_V4, e))?,
                PrefilterKey::V6(k) => lock(&self.v6)
                    .insert(&Key::new(k.prefixlen, k.addr), value, 0)
                    .map_err(|e| DatapathError::map(MAP_PREFILTER_V6, e))?,
            }
        }
        Ok(())
    }

    pub(crate) fn remove(&self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        for cidr in cidrs {
            let removed = match PrefilterKey::of(cidr) {
                PrefilterKey::V4(k) => lock(&self.v4)
                    .remove(&Key::new(k.prefixlen, k.addr))
                    .map_err(|e| (MAP_PREFILTER_V4, e)),
                PrefilterKey::V6(k) => lock(&self.v6)
                    .remove(&Key::new(k.prefixlen, k.addr))
                    .map_err(|e| (MAP_PREFILTER_V6, e)),
            };
            match removed {
                Ok(()) => {}
                Err((_, e)) if is_not_found(&e) => {}
                Err((name, e)) => return Err(DatapathError::map(name, e)),
            }
        }
        Ok(())
    }

    pub(crate) fn list(&self) -> Result<Vec<PrefilterCount>, DatapathError> {
        let mut entries = Vec::new();
        {
            let v4 = lock(&self.v4);
            for item in v4.iter() {
                let (k, v) = item.map_err(|e| DatapathError::map(MAP_PREFILTER_V4, e))?;
                let key = cilia_abi::PrefilterV4Key {
                    prefixlen: k.prefix_len(),
                    addr: k.data(),
                };
                entries.extend(PrefilterEntry::decode_v4(&key, &v));
            }
        }
        {
            let v6 = lock(&self.v6);
            for item in v6.iter() {
                let (k, v) = item.map_err(|e| DatapathError::map(MAP_PREFILTER_V6, e))?;
                let key = cilia_abi::PrefilterV6Key {
                    prefixlen: k.prefix_len(),
                    addr: k.data(),
                };
                entries.extend(PrefilterEntry::decode_v6(&key, &v));
            }
        }
        entries.sort();
        entries
            .into_iter()
            .map(|entry| {
                let c = self.counter(entry.counter)?;
                Ok(PrefilterCount {
                    entry,
                    packets: c.packets,
                    bytes: c.bytes,
                })
            })
            .collect()
    }
}

impl BpfDatapath {
    /// Pin path of the prefilter's link on `ifname` in `mode`.
    pub fn prefilter_link_pin(&self, ifname: &str, mode: PrefilterMode) -> PathBuf {
        self.root()
            .join("node")
            .join(format!("prefilter_{}_{ifname}", mode.name()))
    }

    /// The prefilter's pinned links: device name (as at attach) -> mode and pin.
    fn prefilter_pins(&self) -> Result<BTreeMap<String, (PrefilterMode, PathBuf)>, DatapathError> {
        let dir = self.root().join("node");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DatapathError::io(format!("listing {}", dir.display()), e))?;
        let mut out = BTreeMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("prefilter_") else {
                continue;
            };
            let Some((mode, ifname)) = rest.split_once('_') else {
                continue;
            };
            if let Some(mode) = PrefilterMode::parse(mode) {
                out.insert(ifname.to_string(), (mode, entry.path()));
            }
        }
        Ok(out)
    }

    /// This build's prefilter program, loaded (verified) against the
    /// pinned maps, attached nowhere.
    fn load_prefilter(&self) -> Result<aya::Ebpf, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.root().join("maps"))
            .load(XDP_OBJECT)?;
        prefilter_prog(&mut ebpf)?
            .load()
            .map_err(|e| DatapathError::program(PROG_XDP_PREFILTER, e))?;
        Ok(ebpf)
    }

    /// Attaches the prefilter to `ifname`: native XDP, or generic XDP when
    /// the driver refuses native (the returned link says which, and why).
    /// A link already pinned for the device keeps its mode and gets this
    /// build's program swapped in; one whose device was made again is
    /// detached first.
    pub fn attach_prefilter(&self, ifname: &str) -> Result<PrefilterLink, DatapathError> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|_| DatapathError::NoSuchInterface(ifname.to_string()))?;
        let mut ebpf = self.load_prefilter()?;
        let prog = prefilter_prog(&mut ebpf)?;

        if let Some((mode, pin)) = self.prefilter_pins()?.remove(ifname) {
            let on = crate::inspect::link_target(&pin).map(|t| t.ifindex).ok();
            if on == Some(ifindex) {
                swap_xdp(prog, &pin)?;
                return Ok(PrefilterLink {
                    ifname: ifname.to_string(),
                    ifindex,
                    mode,
                    native_error: None,
                });
            }
            tracing::info!(pin = %pin.display(), ?on, ifindex, "prefilter link on another device: detaching it");
            unpin_link(&pin)?;
        }

        let (mode, native_error) = match attach_xdp(prog, ifname, PrefilterMode::Native) {
            Ok(link) => {
                pin_fd_link(
                    link,
                    &self.prefilter_link_pin(ifname, PrefilterMode::Native),
                )?;
                (PrefilterMode::Native, None)
            }
            Err(native) => {
                let reason = native.to_string();
                tracing::warn!(device = ifname, %reason, "native XDP refused: attaching the prefilter in generic mode");
                let link = attach_xdp(prog, ifname, PrefilterMode::Generic)?;
                pin_fd_link(
                    link,
                    &self.prefilter_link_pin(ifname, PrefilterMode::Generic),
                )?;
                (PrefilterMode::Generic, Some(reason))
            }
        };
        Ok(PrefilterLink {
            ifname: ifname.to_string(),
            ifindex,
            mode,
            native_error,
        })
    }

    /// Swaps this build's prefilter program into every pinned prefilter
    /// link (`datapath reload`); returns how many. Links whose device is
    /// gone are left alone.
    pub fn reload_prefilter(&self) -> Result<usize, DatapathError> {
        let pins = self.prefilter_pins()?;
        if pins.is_empty() {
            return Ok(0);
        }
        let mut ebpf = self.load_prefilter()?;
        let prog = prefilter_prog(&mut ebpf)?;
        let mut swapped = 0;
        for (_, pin) in pins.values() {
            let on = crate::inspect::link_target(pin).map(|t| t.ifindex).ok();
            if matches!(on, Some(0) | None) {
                continue;
            }
            swap_xdp(prog, pin)?;
            swapped += 1;
        }
        Ok(swapped)
    }

    /// Detaches the prefilter from `ifname`. Not attached is not an error.
    pub fn detach_prefilter(&self, ifname: &str) -> Result<(), DatapathError> {
        if let Some((_, pin)) = self.prefilter_pins()?.remove(ifname) {
            unpin_link(&pin)?;
        }
        Ok(())
    }

    /// The devices the prefilter is attached to.
    pub fn prefilter_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        self.prefilter_pins()?
            .into_iter()
            .map(|(ifname, (mode, pin))| {
                let target = crate::inspect::link_target(&pin)
                    .map_err(|e| DatapathError::io(format!("inspecting {}", pin.display()), e))?;
                Ok(PrefilterLink {
                    ifname,
                    ifindex: target.ifindex,
                    mode,
                    native_error: None,
                })
            })
            .collect()
    }

    /// Adds or re-slots prefilter CIDRs (one atomic trie update each); a
    /// CIDR new to the kernel, or moved to another slot, starts its counts
    /// from zero.
    pub fn upsert_prefilter(&self, entries: &[PrefilterEntry]) -> Result<(), DatapathError> {
        self.prefilter.upsert(entries)
    }

    /// Removes prefilter CIDRs. Absent ones are not an error.
    pub fn remove_prefilter(&self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        self.prefilter.remove(cidrs)
    }

    /// The prefilter's CIDRs with what each dropped.
    pub fn prefilter(&self) -> Result<Vec<PrefilterCount>, DatapathError> {
        self.prefilter.list()
    }
}

/// Attaches `prog` to `ifname` in `mode` as a BPF link (the only kind that
/// can be pinned: a netlink attachment is detached again and refused).
fn attach_xdp(prog: &mut Xdp, ifname: &str, mode: PrefilterMode) -> Result<FdLink, DatapathError> {
    let err = |e| DatapathError::program(PROG_XDP_PREFILTER, e);
    let id = prog.attach(ifname, mode.xdp_mode()).map_err(err)?;
    let link = prog.take_link(id).map_err(err)?;
    link.try_into().map_err(|e: LinkError| DatapathError::Pin {
        path: PathBuf::from(ifname),
        reason: format!(
            "the kernel attached the prefilter ({} mode) without a BPF link, which cannot be pinned: {e}",
            mode.name()
        ),
    })
}

fn pin_fd_link(link: FdLink, pin: &Path) -> Result<(), DatapathError> {
    link.pin(pin).map(drop).map_err(|e| DatapathError::Pin {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Swaps `prog` into the XDP link pinned at `pin` (`BPF_LINK_UPDATE`).
fn swap_xdp(prog: &mut Xdp, pin: &Path) -> Result<(), DatapathError> {
    let pin_err = |reason: String| DatapathError::Pin {
        path: pin.to_path_buf(),
        reason,
    };
    let link = PinnedLink::from_pin(pin).map_err(|e| pin_err(e.to_string()))?;
    let link: XdpLink = FdLink::from(link)
        .try_into()
        .map_err(|e: LinkError| pin_err(e.to_string()))?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| DatapathError::program(PROG_XDP_PREFILTER, e))?;
    // The pin keeps the link; the handle we hold may go.
    drop(
        prog.take_link(id)
            .map_err(|e| DatapathError::program(PROG_XDP_PREFILTER, e))?,
    );
    Ok(())
}

/// XDP verdicts, as returned by the program.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// An XDP program loaded, attached nowhere: the prefilter (against a
/// datapath's maps) or the empty XDP program, for `BPF_PROG_TEST_RUN`
/// fixtures and benchmarks.
pub struct XdpTestProgram {
    ebpf: aya::Ebpf,
    name: &'static str,
}

impl XdpTestProgram {
    /// The empty XDP program (`probe_xdp`, returns XDP_PASS): the
    /// benchmark baseline.
    pub fn empty() -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(crate::object::PROBE_OBJECT)?;
        let name = crate::object::PROG_PROBE_XDP;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        prog.load().map_err(|e| DatapathError::program(name, e))?;
        Ok(Self { ebpf, name })
    }

    fn prog(&self) -> Result<&Xdp, DatapathError> {
        self.ebpf
            .program(self.name)
            .ok_or(DatapathError::MissingProgram(self.name))?
            .try_into()
            .map_err(|e| DatapathError::program(self.name, e))
    }

    /// Runs the program once on `frame`; returns its XDP verdict.
    pub fn run(&self, frame: &[u8]) -> Result<u32, DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let result = self
            .prog()?
            .test_run(opts)
            .map_err(|e| DatapathError::program(self.name, e))?;
        Ok(result.return_value)
    }

    /// Mean time per run over `repeat` runs inside the kernel.
    pub fn time_per_run(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let result = self
            .prog()?
            .test_run(opts)
            .map_err(|e| DatapathError::program(self.name, e))?;
        Ok(result.duration)
    }
}

impl BpfDatapath {
    /// Loads the prefilter program for `BPF_PROG_TEST_RUN`, sharing this
    /// datapath's maps but attached nowhere.
    pub fn test_prefilter_program(&self) -> Result<XdpTestProgram, DatapathError> {
        let ebpf = self.load_prefilter()?;
        Ok(XdpTestProgram {
            ebpf,
            name: PROG_XDP_PREFILTER,
        })
    }
}

/// The prefilter program of a loaded XDP object.
fn prefilter_prog(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(PROG_XDP_PREFILTER)
        .ok_or(DatapathError::MissingProgram(PROG_XDP_PREFILTER))?
        .try_into()
        .map_err(|e| DatapathError::program(PROG_XDP_PREFILTER, e))
}
