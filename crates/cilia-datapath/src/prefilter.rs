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
    MetricsValue, PrefilterCount, PrefilterEntry, PrefilterKey, PrefilterValue, CILIA_XDP_LB_ACCEL,
    CILIA_XDP_MAGIC, CILIA_XDP_PREFILTER, PREFILTER_SLOTS,
};
use ipnet::IpNet;

use crate::endpoint::{is_not_found, lock, pin_mismatch, unpin_link, BpfDatapath};
use crate::error::DatapathError;
use crate::object::{
    GLOBAL_CONFIG, GLOBAL_XDP_FEATURES, MAP_PREFILTER_COUNTERS, MAP_PREFILTER_V4, MAP_PREFILTER_V6,
    PROG_XDP_PREFILTER, XDP_OBJECT,
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

/// What the XDP program of a device does (`CILIA_XDP_FEATURES` in
/// `bpf/xdp.c`): a device holds one XDP program, so the prefilter and the
/// NodePort acceleration share it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct XdpFeatures {
    /// Drop sources in a prefilter CIDR.
    pub prefilter: bool,
    /// NodePort load balancing in XDP (`--lb-acceleration native`).
    pub lb_acceleration: bool,
}

impl XdpFeatures {
    fn bits(self) -> u32 {
        (if self.prefilter {
            CILIA_XDP_PREFILTER
        } else {
            0
        }) | (if self.lb_acceleration {
            CILIA_XDP_LB_ACCEL
        } else {
            0
        })
    }

    fn from_bits(bits: u32) -> Self {
        Self {
            prefilter: bits & CILIA_XDP_PREFILTER != 0,
            lb_acceleration: bits & CILIA_XDP_LB_ACCEL != 0,
        }
    }

    pub fn is_empty(self) -> bool {
        self.bits() == 0
    }
}

/// The XDP program on one device, with what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceXdp {
    pub link: PrefilterLink,
    pub features: XdpFeatures,
}

/// The XDP program on one device (the prefilter's view of it).
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

    /// This build's XDP program doing `features`, loaded (verified)
    /// against the pinned maps, attached nowhere.
    fn load_xdp(&self, features: XdpFeatures) -> Result<aya::Ebpf, DatapathError> {
        let config = crate::node::node_program_config();
        let words = [CILIA_XDP_MAGIC, features.bits()];
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.root().join("maps"))
            .override_global(GLOBAL_CONFIG, &config, true)
            .override_global(GLOBAL_XDP_FEATURES, &words, true)
            .load(XDP_OBJECT)?;
        let prog = prefilter_prog(&mut ebpf)?;
        crate::error::load_program(PROG_XDP_PREFILTER, || prog.load())?;
        Ok(ebpf)
    }

    /// What the program in the pinned link `pin` does, read back from its
    /// `.rodata`. A program without the tag is an older build's, which was
    /// only ever the prefilter.
    fn link_features(pin: &Path) -> Result<XdpFeatures, DatapathError> {
        let io = |e| DatapathError::io(format!("inspecting {}", pin.display()), e);
        let target = crate::inspect::link_target(pin).map_err(io)?;
        let rodata = crate::inspect::program_rodata(target.program_id).map_err(io)?;
        let magic = CILIA_XDP_MAGIC.to_ne_bytes();
        let found = rodata.as_deref().and_then(|r| {
            r.windows(8)
                .find(|w| w[..4] == magic)
                .map(|w| u32::from_ne_bytes([w[4], w[5], w[6], w[7]]))
        });
        Ok(match found {
            Some(bits) => XdpFeatures::from_bits(bits),
            None => XdpFeatures {
                prefilter: true,
                lb_acceleration: false,
            },
        })
    }

    /// Makes the XDP program of `ifname` do `features`: nothing (the link
    /// is detached), or this build's program doing them. A device with a
    /// live pinned link gets the new program swapped in (`BPF_LINK_UPDATE`:
    /// no moment without a program, the mode kept); the link names its
    /// device, so a swap never looks the name up again. A device without
    /// one gets native XDP, or generic XDP when the driver refuses native
    /// (the link says which, and why); `force_generic` skips the native
    /// attempt. `may_attach` false (a feature being removed) never attaches
    /// a new link.
    fn set_xdp_features(
        &self,
        ifname: &str,
        features: XdpFeatures,
        force_generic: bool,
        may_attach: bool,
    ) -> Result<Option<DeviceXdp>, DatapathError> {
        let device = |ifindex, mode, native_error| {
            Some(DeviceXdp {
                link: PrefilterLink {
                    ifname: ifname.to_string(),
                    ifindex,
                    mode,
                    native_error,
                },
                features,
            })
        };
        if let Some((mode, pin)) = self.prefilter_pins()?.remove(ifname) {
            let on = crate::inspect::link_target(&pin)
                .map(|t| t.ifindex)
                .unwrap_or(0);
            if on != 0 {
                if features.is_empty() {
                    unpin_link(&pin)?;
                    return Ok(None);
                }
                let mut ebpf = self.load_xdp(features)?;
                swap_xdp(prefilter_prog(&mut ebpf)?, &pin)?;
                return Ok(device(on, mode, None));
            }
            tracing::info!(pin = %pin.display(), "XDP link of a device that is gone: unpinning it");
            unpin_link(&pin)?;
        }
        if features.is_empty() || !may_attach {
            return Ok(None);
        }
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|_| DatapathError::NoSuchInterface(ifname.to_string()))?;
        let mut ebpf = self.load_xdp(features)?;
        let prog = prefilter_prog(&mut ebpf)?;
        let native = if force_generic {
            Err("generic mode forced".to_string())
        } else {
            attach_xdp(prog, ifname, PrefilterMode::Native).map_err(|e| e.to_string())
        };
        let (mode, native_error) = match native {
            Ok(link) => {
                pin_fd_link(
                    link,
                    &self.prefilter_link_pin(ifname, PrefilterMode::Native),
                )?;
                (PrefilterMode::Native, None)
            }
            Err(reason) => {
                tracing::warn!(device = ifname, %reason, "native XDP refused: attaching the device's XDP program in generic mode");
                let link = attach_xdp(prog, ifname, PrefilterMode::Generic)?;
                pin_fd_link(
                    link,
                    &self.prefilter_link_pin(ifname, PrefilterMode::Generic),
                )?;
                (PrefilterMode::Generic, Some(reason))
            }
        };
        Ok(device(ifindex, mode, native_error))
    }

    /// The XDP program of every device that has one, with what it does.
    pub fn xdp_devices(&self) -> Result<Vec<DeviceXdp>, DatapathError> {
        self.prefilter_pins()?
            .into_iter()
            .map(|(ifname, (mode, pin))| {
                let target = crate::inspect::link_target(&pin)
                    .map_err(|e| DatapathError::io(format!("inspecting {}", pin.display()), e))?;
                Ok(DeviceXdp {
                    link: PrefilterLink {
                        ifname,
                        ifindex: target.ifindex,
                        mode,
                        native_error: None,
                    },
                    features: Self::link_features(&pin)?,
                })
            })
            .collect()
    }

    /// What the XDP program of `ifname` does now (nothing: no program).
    fn xdp_features_of(&self, ifname: &str) -> Result<XdpFeatures, DatapathError> {
        match self.prefilter_pins()?.remove(ifname) {
            Some((_, pin)) => Self::link_features(&pin),
            None => Ok(XdpFeatures::default()),
        }
    }

    /// Adds or removes one feature of `ifname`'s XDP program, keeping the
    /// other; only an addition may attach a new link.
    fn toggle_xdp(
        &self,
        ifname: &str,
        change: impl FnOnce(&mut XdpFeatures),
        force_generic: bool,
        may_attach: bool,
    ) -> Result<Option<DeviceXdp>, DatapathError> {
        let mut features = self.xdp_features_of(ifname)?;
        change(&mut features);
        self.set_xdp_features(ifname, features, force_generic, may_attach)
    }

    /// Attaches the prefilter to `ifname` (see [`Self::set_xdp_features`]);
    /// NodePort acceleration on the device stays.
    pub fn attach_prefilter(&self, ifname: &str) -> Result<PrefilterLink, DatapathError> {
        self.toggle_xdp(ifname, |f| f.prefilter = true, false, true)?
            .map(|d| d.link)
            .ok_or_else(|| DatapathError::NoSuchInterface(ifname.to_string()))
    }

    /// Swaps this build's XDP program (each link's features kept) into
    /// every pinned XDP link (`datapath reload`); returns how many. Links
    /// whose device is gone are left alone.
    pub fn reload_prefilter(&self) -> Result<usize, DatapathError> {
        let mut swapped = 0;
        for (_, pin) in self.prefilter_pins()?.values() {
            let on = crate::inspect::link_target(pin).map(|t| t.ifindex).ok();
            if matches!(on, Some(0) | None) {
                continue;
            }
            let mut ebpf = self.load_xdp(Self::link_features(pin)?)?;
            swap_xdp(prefilter_prog(&mut ebpf)?, pin)?;
            swapped += 1;
        }
        Ok(swapped)
    }

    /// Detaches the prefilter from `ifname` (the whole XDP program when the
    /// device does nothing else). Not attached is not an error.
    pub fn detach_prefilter(&self, ifname: &str) -> Result<(), DatapathError> {
        if self.xdp_features_of(ifname)?.prefilter {
            self.toggle_xdp(ifname, |f| f.prefilter = false, false, false)?;
        }
        Ok(())
    }

    /// The devices the prefilter is attached to.
    pub fn prefilter_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        Ok(self
            .xdp_devices()?
            .into_iter()
            .filter(|d| d.features.prefilter)
            .map(|d| d.link)
            .collect())
    }

    /// Turns NodePort acceleration on for `ifname` (the node's underlay
    /// device); a prefilter on the device stays. `force_generic`: generic
    /// XDP even where the driver has native (tests, broken drivers).
    pub fn attach_lb_acceleration(
        &self,
        ifname: &str,
        force_generic: bool,
    ) -> Result<PrefilterLink, DatapathError> {
        self.toggle_xdp(ifname, |f| f.lb_acceleration = true, force_generic, true)?
            .map(|d| d.link)
            .ok_or_else(|| DatapathError::NoSuchInterface(ifname.to_string()))
    }

    /// Turns NodePort acceleration off for `ifname`. Not on is not an error.
    pub fn detach_lb_acceleration(&self, ifname: &str) -> Result<(), DatapathError> {
        if self.xdp_features_of(ifname)?.lb_acceleration {
            self.toggle_xdp(ifname, |f| f.lb_acceleration = false, false, false)?;
        }
        Ok(())
    }

    /// The devices NodePort acceleration runs on.
    pub fn lb_acceleration_links(&self) -> Result<Vec<PrefilterLink>, DatapathError> {
        Ok(self
            .xdp_devices()?
            .into_iter()
            .filter(|d| d.features.lb_acceleration)
            .map(|d| d.link)
            .collect())
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
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

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
        crate::error::load_program(name, || prog.load())?;
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

    /// Runs the program once on `frame` as received by the device
    /// `ingress_ifindex` of the calling thread's network namespace (what
    /// its FIB lookups start from); returns the verdict and the frame as
    /// the program left it.
    pub fn run_on(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(u32, Vec<u8>), DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (u32 each); data_end = the length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let result = self
            .prog()?
            .test_run(opts)
            .map_err(|e| DatapathError::program(self.name, e))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
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
        self.test_xdp_program(XdpFeatures {
            prefilter: true,
            lb_acceleration: false,
        })
    }

    /// Loads the device XDP program doing `features` for
    /// `BPF_PROG_TEST_RUN`, sharing this datapath's maps, attached nowhere.
    pub fn test_xdp_program(&self, features: XdpFeatures) -> Result<XdpTestProgram, DatapathError> {
        let ebpf = self.load_xdp(features)?;
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
