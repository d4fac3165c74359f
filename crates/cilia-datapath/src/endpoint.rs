//! Shared maps and per-endpoint programs, pinned under one bpffs root:
//!
//! ```text
//! <root>/maps/cilia_endpoints   shared by every endpoint program
//! <root>/maps/cilia_metrics
//! <root>/maps/cilia_ipcache, cilia_policy, cilia_ct, cilia_config
//! <root>/links/ep<ID>           TCX link of endpoint ID's from-container program (ingress)
//! <root>/links/ep<ID>_to        TCX link of its to-container program (egress)
//! <root>/policy/ep<ID>_a, _b    the endpoint's two policy maps; `cilia_policy`
//!                               points at one, updates go to the other, then swap
//! ```
//!
//! Invariants: a pinned link is the only thing keeping an endpoint's program
//! attached, so the agent may die at any time without cutting traffic; a
//! pinned map is reused only after its key/value sizes were checked against
//! this build's ABI; and a program is only ever replaced by swapping it
//! inside its link (`BPF_LINK_UPDATE`), after its successor passed the
//! verifier: an endpoint is never without a program, and a rejected
//! successor leaves the old one running.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use std::collections::{BTreeMap, BTreeSet};

use crate::interface::{CtBudgetUse, CtGcReport};
use aya::maps::{
    Array, ArrayOfMaps, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, MapInfo,
    PerCpuArray, RingBuf,
};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;
use cilia_abi::{
    CtKey, CtValue, EndpointConfig, EndpointInfo, EndpointKey, GlobalConfig, IpcacheKey,
    IpcacheValue, MetricsKey, MetricsValue, NodeConfigValue, NodeValue, PolicyKey, PolicyValue,
    CILIA_CT_BUDGET_DEFAULT, CILIA_CT_CLOSING, CILIA_CT_TCP_CLOSE, CILIA_POLICY_MAX,
};

use crate::error::DatapathError;
use crate::keys::{
    ipcache_from_lpm, ipcache_to_lpm, policy_from_lpm, policy_to_lpm, IpcacheData, PolicyData,
};
use crate::object::{
    GLOBAL_CONFIG, LXC_OBJECT, MAP_CLOCK, MAP_CONFIG, MAP_CT, MAP_CT_COUNT, MAP_ENDPOINTS,
    MAP_ENDPOINT_FILTER, MAP_ENDPOINT_SLOTS, MAP_EVENTS, MAP_IPCACHE, MAP_METRICS, MAP_NODES,
    MAP_NODE_CONFIG, MAP_POLICY, PROG_FROM_CONTAINER, PROG_TO_CONTAINER, SHARED_MAPS,
};
use crate::testrun::TestProgram;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Loads (and so verifies) one endpoint's specialized programs against
/// the pinned shared maps, needing nothing but their directory: it shares
/// no state with [`BpfDatapath`], so loads of different endpoints run on
/// different threads at once, outside whatever serializes the attaches.
#[derive(Debug, Clone)]
pub struct EndpointLoader {
    maps_dir: PathBuf,
}

/// An endpoint's two programs, loaded and verified, not attached: the
/// input of [`BpfDatapath::attach_loaded`].
pub struct LoadedEndpoint {
    ebpf: aya::Ebpf,
    config: EndpointConfig,
}

impl LoadedEndpoint {
    /// The configuration the programs were specialized for.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }
}

impl EndpointLoader {
    pub fn load(&self, config: &EndpointConfig) -> Result<LoadedEndpoint, DatapathError> {
        Ok(LoadedEndpoint {
            ebpf: load_object(&self.maps_dir, LXC_OBJECT, config)?,
            config: *config,
        })
    }
}

fn load_object(
    maps_dir: &Path,
    object: &[u8],
    config: &EndpointConfig,
) -> Result<aya::Ebpf, DatapathError> {
    load_programs(
        maps_dir,
        object,
        config,
        &[PROG_FROM_CONTAINER, PROG_TO_CONTAINER],
    )
}

/// Loads `object` specialized with `config` against the maps pinned in
/// `maps_dir`, and loads (verifies) its programs `names`.
pub(crate) fn load_programs(
    maps_dir: &Path,
    object: &[u8],
    config: &EndpointConfig,
    names: &[&'static str],
) -> Result<aya::Ebpf, DatapathError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .override_global(GLOBAL_CONFIG, config, true)
        .load(object)?;
    for &name in names {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        crate::error::load_program(name, || prog.load())?;
    }
    Ok(ebpf)
}

/// Handle on the pinned datapath of one agent.
pub struct BpfDatapath {
    root: PathBuf,
    endpoints: Mutex<HashMap<MapData, EndpointKey, EndpointInfo>>,
    metrics: Mutex<PerCpuArray<MapData, MetricsValue>>,
    ipcache: Mutex<LpmTrie<MapData, IpcacheData, IpcacheValue>>,
    policy: Mutex<ArrayOfMaps<MapData, MapData>>,
    /// `cilia_policy` once more, to clear a slot (see
    /// [`crate::inspect::clear_map_slot`]).
    policy_fd: std::os::fd::OwnedFd,
    /// One lock per endpoint, held across a write of its policy: two
    /// writers must not pick the same inactive map (see [`Self::set_policy`]).
    policy_writers: Mutex<std::collections::HashMap<u16, Arc<Mutex<()>>>>,
    /// Ids whose entry in `cilia_policy` is an empty spare map that no
    /// endpoint uses yet, with the map (not pinned: a spare leaves no
    /// trace in bpffs): the first policy write fills it in place and pins it.
    spare_policy: Mutex<std::collections::BTreeMap<u16, (PolicyMap, u32)>>,
    /// `cilia_policy` again, typed to take a policy map that was created
    /// here (not pinned) as its value: how spares are put in.
    policy_of_tries: Mutex<ArrayOfMaps<MapData, PolicyMap>>,
    ct: Mutex<HashMap<MapData, CtKey, CtValue>>,
    ct_count: Mutex<Array<MapData, u32>>,
    /// Endpoint id -> its delivery, for conntrack entries' cached
    /// deliveries (see `bpf/lib/fast.h`).
    endpoint_slots: Mutex<Array<MapData, EndpointInfo>>,
    /// The local endpoints' addresses (`cilia_endpoint_filter`); its
    /// updates are serialized by the `endpoints` lock.
    endpoint_filter: crate::filter::AddrFilter,
    /// Live conntrack entries at this handle's last GC (None before one):
    /// what a metrics scrape reports instead of walking the table again.
    ct_live: Mutex<Option<u64>>,
    /// What each endpoint held after this handle's last GC (endpoints
    /// without entries absent): what [`BpfDatapath::ct_pressure`] compares
    /// the counts with.
    ct_left: Mutex<BTreeMap<u16, u32>>,
    pub(crate) config: Mutex<Array<MapData, GlobalConfig>>,
    /// Underlay addresses of the cluster's nodes.
    pub(crate) nodes: Mutex<HashMap<MapData, EndpointKey, NodeValue>>,
    /// The node's tunnel settings.
    pub(crate) node_config: Mutex<Array<MapData, NodeConfigValue>>,
    /// The load balancer's maps (see [`crate::lb`]).
    pub(crate) lb: crate::lb::LbMaps,
    /// Handed to the one reader of events ([`BpfDatapath::take_events`]).
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Pinned maps found incompatible at open and recreated.
    recreated: Vec<RecreatedMap>,
    /// The conntrack table's size (`DatapathOptions::ct_max`).
    ct_max: u32,
    /// The XDP prefilter's maps (`bpf/xdp.c`).
    pub(crate) prefilter: crate::prefilter::PrefilterMaps,
    /// Tags of this build's from- and to-container programs, learnt from
    /// the first load (see [`BpfDatapath::build_tags`]).
    build_tags: std::sync::OnceLock<[[u8; 8]; 2]>,
    /// The generic endpoint program, loaded at its first use (see
    /// [`crate::generic`]).
    pub(crate) generic: crate::generic::GenericSlot,
}

/// Version of everything pinned under the bpffs root beyond what the
/// kernel can report (map type, size, key/value size): bump it whenever a
/// pinned map keeps its sizes but changes meaning (a field reused, a value
/// re-encoded). Stored in the pinned one-slot array `maps/cilia_abi`.
/// 4: conntrack keys in canonical order, one entry for both directions.
pub const PIN_ABI_VERSION: u32 = 4;

/// Pin of the ABI version array (not part of the BPF object).
const MAP_ABI: &str = "cilia_abi";

/// Sizes of the shared maps that configuration sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Entries of the conntrack table (`cilia_ct`), for all endpoints and
    /// node programs together; default `CILIA_CT_MAX` (262,144). The table
    /// is preallocated: about 150 bytes of kernel memory an entry (40 MB at the default).
    pub ct_max: u32,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            ct_max: cilia_abi::CILIA_CT_MAX,
        }
    }
}

/// The least and the most conntrack entries `DatapathOptions::ct_max`
/// takes: below, a node of a few endpoints runs out; above, the
/// preallocated table takes gigabytes of kernel memory.
pub const CT_MAX_RANGE: std::ops::RangeInclusive<u32> = 1024..=16_777_216;

impl DatapathOptions {
    fn check(&self) -> Result<(), DatapathError> {
        if CT_MAX_RANGE.contains(&self.ct_max) {
            return Ok(());
        }
        Err(DatapathError::Config(format!(
            "conntrack table size {} is out of range {}..={}",
            self.ct_max,
            CT_MAX_RANGE.start(),
            CT_MAX_RANGE.end()
        )))
    }
}

/// A pinned map that did not match this build and was recreated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecreatedMap {
    pub name: String,
    pub reason: String,
}

/// How one of an endpoint's pinned links stands against its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkCheck {
    /// The device the link is attached to; 0 when that device is gone.
    pub ifindex: u32,
    /// Whether its program's baked-in configuration is the expected one.
    pub config_matches: bool,
    /// Whether its program's code is this build's (same program tag): false
    /// after an upgrade, until the endpoint is re-specialized.
    pub build_matches: bool,
}

/// One of an endpoint's links after a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSwap {
    /// `cil_from_container` or `cil_to_container`.
    pub program: &'static str,
    /// The pinned link: the same before and after.
    pub link_id: u32,
    pub old_program_id: u32,
    /// Equal to `old_program_id` when nothing was swapped.
    pub new_program_id: u32,
}

/// What [`BpfDatapath::reload_endpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReload {
    /// Whether the programs were swapped (false: the attached ones already
    /// were this build's, with this configuration, and `force` was off).
    pub swapped: bool,
    pub links: Vec<LinkSwap>,
}

type PolicyMap = LpmTrie<MapData, PolicyData, PolicyValue>;

/// BPF_F_NO_PREALLOC: required for LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// What a policy update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyUpdate {
    pub added: usize,
    pub removed: usize,
}

impl std::fmt::Debug for BpfDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfDatapath")
            .field("root", &self.root)
            .finish()
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

fn mount_bpffs(path: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
}

/// Makes sure `root` is on a bpffs. The conventional `/sys/fs/bpf` is
/// mounted first when the machine has not done it (a directory cannot be
/// created inside sysfs); any other root gets a bpffs of its own.
fn ensure_bpffs(root: &Path) -> Result<(), DatapathError> {
    // Two checks-then-mounts racing would stack two bpffs instances, the
    // second hiding the first's pins: serialize them within the process.
    static MOUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let err = |reason: String| DatapathError::BpfRoot {
        path: root.to_path_buf(),
        reason,
    };
    let sys_bpf = Path::new("/sys/fs/bpf");
    if root.starts_with(sys_bpf) && sys_bpf.is_dir() && !is_bpffs(sys_bpf) {
        mount_bpffs(sys_bpf).map_err(|e| {
            err(format!(
                "/sys/fs/bpf is not a bpffs and mounting one failed: {e}"
            ))
        })?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| err(format!("cannot create: {e}")))?;
    if is_bpffs(root) {
        return Ok(());
    }
    mount_bpffs(root).map_err(|e| err(format!("not a bpffs and mounting one failed: {e}")))
}

// The configuration is compared as raw bytes inside `.rodata`: it must have
// no padding, whose bytes would be arbitrary.
const _: () = assert!(
    std::mem::size_of::<EndpointConfig>() == 16 + 4 + 6 + 6 + 4 + 4 + 2 + 1 + 1,
    "EndpointConfig has padding"
);

/// The bytes of a configuration as `override_global` writes them.
fn config_bytes(config: &EndpointConfig) -> &[u8] {
    // SAFETY: EndpointConfig is #[repr(C)], Copy, without padding (checked
    // above) and lives as long as the returned slice.
    unsafe {
        std::slice::from_raw_parts(
            (config as *const EndpointConfig).cast::<u8>(),
            std::mem::size_of::<EndpointConfig>(),
        )
    }
}

/// Why a pinned map cannot be reused by this build, if it cannot.
pub(crate) fn pin_mismatch(
    path: &Path,
    want: &aya_obj::Map,
) -> Result<Option<String>, DatapathError> {
    pin_mismatch_sized(path, want, want.max_entries())
}

/// [`pin_mismatch`] against `max_entries` instead of the object's (a map
/// sized by configuration).
fn pin_mismatch_sized(
    path: &Path,
    want: &aya_obj::Map,
    max_entries: u32,
) -> Result<Option<String>, DatapathError> {
    let name = path.display().to_string();
    let info = MapInfo::from_pin(path).map_err(|e| DatapathError::map(&name, e))?;
    let found_type = info
        .map_type()
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|_| "unknown".into());
    let want_type = aya_obj::generated::bpf_map_type::try_from(want.map_type())
        .ok()
        .and_then(|t| aya::maps::MapType::try_from(t).ok())
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|| "unknown".into());
    let mut diffs = Vec::new();
    if found_type != want_type {
        diffs.push(format!("type {found_type}, expected {want_type}"));
    }
    for (what, found, want) in [
        ("max_entries", info.max_entries(), max_entries),
        ("key size", info.key_size(), want.key_size()),
        ("value size", info.value_size(), want.value_size()),
    ] {
        if found != want {
            diffs.push(format!("{what} {found}, expected {want}"));
        }
    }
    Ok((!diffs.is_empty()).then(|| diffs.join(", ")))
}

/// The ABI version recorded under `maps_dir`, if any.
fn pinned_abi_version(maps_dir: &Path) -> Result<Option<u32>, DatapathError> {
    let path = maps_dir.join(MAP_ABI);
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: MapError| DatapathError::map(MAP_ABI, e);
    let data = MapData::from_pin(&path).map_err(err)?;
    let array: Array<MapData, u32> =
        Array::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)?;
    Ok(Some(array.get(&0, 0).map_err(err)?))
}

/// Records this build's ABI version under `maps_dir`.
fn pin_abi_version(maps_dir: &Path) -> Result<(), DatapathError> {
    let path = maps_dir.join(MAP_ABI);
    let err = |e: MapError| DatapathError::map(MAP_ABI, e);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DatapathError::io(format!("removing {}", path.display()), e)),
    }
    let mut array = Array::<MapData, u32>::create(1, 0).map_err(err)?;
    array.set(0, PIN_ABI_VERSION, 0).map_err(err)?;
    array.pin(&path).map_err(|e| DatapathError::Pin {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// Checks every pinned shared map against this build — kernel map type,
/// max_entries, key and value size — and the pinned ABI version. Every
/// shared map holds state the agent can rebuild (endpoints, ipcache,
/// policy, config from its records; metrics and events start over;
/// conntrack starts empty, so established flows meet policy again), so a
/// mismatch is migrated: the pin is removed and the loader creates the
/// map afresh. The caller must then re-attach every endpoint, since
/// attached programs still use the old maps. Returns what was recreated.
fn migrate_pins(
    maps_dir: &Path,
    options: &DatapathOptions,
) -> Result<Vec<RecreatedMap>, DatapathError> {
    let object = aya_obj::Object::parse(LXC_OBJECT).map_err(|e| DatapathError::BpfRoot {
        path: maps_dir.to_path_buf(),
        reason: format!("parsing the embedded lxc.o: {e}"),
    })?;
    let version = pinned_abi_version(maps_dir)?;
    let any_pinned = SHARED_MAPS.iter().any(|m| maps_dir.join(m.name).exists());
    let version_reason = match version {
        Some(v) if v == PIN_ABI_VERSION => None,
        Some(v) => Some(format!(
            "pinned ABI version {v}, this build uses {PIN_ABI_VERSION}"
        )),
        None if any_pinned => Some(format!(
            "pinned by a cilia without an ABI version, this build uses {PIN_ABI_VERSION}"
        )),
        None => None,
    };
    let mut recreated = Vec::new();
    for spec in SHARED_MAPS {
        let path = maps_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let reason = match (&version_reason, object.maps.get(spec.name)) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(want)) if spec.name == MAP_CT => {
                pin_mismatch_sized(&path, want, options.ct_max)?
            }
            (None, Some(want)) => pin_mismatch(&path, want)?,
            (None, None) => return Err(DatapathError::MissingMap(spec.name)),
        };
        let Some(reason) = reason else { continue };
        if spec.name == MAP_CT {
            tracing::warn!(
                map = spec.name,
                %reason,
                "conntrack map does not match this build: recreating it empty; established flows meet policy again as new flows"
            );
        } else {
            tracing::warn!(map = spec.name, %reason, "pinned map does not match this build: recreating it");
        }
        std::fs::remove_file(&path).map_err(|e| DatapathError::IncompatiblePin {
            path: path.clone(),
            reason: format!(
                "{reason}; removing it failed ({e}): delete it by hand (rm {}) and restart",
                path.display()
            ),
        })?;
        recreated.push(RecreatedMap {
            name: spec.name.to_string(),
            reason,
        });
    }
    Ok(recreated)
}

fn mkdir(path: &Path) -> Result<(), DatapathError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| DatapathError::io(format!("creating {}", path.display()), e))
}

impl BpfDatapath {
    /// Opens (creating and pinning on first use) the shared maps under `root`.
    pub fn open(root: &Path) -> Result<Self, DatapathError> {
        Self::open_with(root, &DatapathOptions::default())
    }

    /// [`Self::open`] with maps sized by `options`. A pinned map of
    /// another size is recreated (see [`Self::recreated_maps`]): a new
    /// conntrack size starts the table empty.
    pub fn open_with(root: &Path, options: &DatapathOptions) -> Result<Self, DatapathError> {
        options.check()?;
        ensure_bpffs(root)?;
        let maps_dir = root.join("maps");
        mkdir(&maps_dir)?;
        mkdir(&root.join("links"))?;
        mkdir(&root.join("node"))?;
        let recreated = migrate_pins(&maps_dir, options)?;
        // Loading the object creates (or reuses) and pins the shared maps;
        // its program is never loaded here. Later loads (endpoint and node
        // programs) reuse the pins, whatever size their object declares.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(MAP_CT, options.ct_max)
            .load(LXC_OBJECT)?;
        let endpoints = ebpf
            .take_map(MAP_ENDPOINTS)
            .ok_or(DatapathError::MissingMap(MAP_ENDPOINTS))?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name));
        let metrics = take(MAP_METRICS)?;
        let ipcache = take(MAP_IPCACHE)?;
        let policy = take(MAP_POLICY)?;
        let ct = take(MAP_CT)?;
        let ct_count = take(MAP_CT_COUNT)?;
        let endpoint_slots = take(MAP_ENDPOINT_SLOTS)?;
        let endpoint_filter =
            crate::filter::AddrFilter::new(MAP_ENDPOINT_FILTER, take(MAP_ENDPOINT_FILTER)?)?;
        let config = take(MAP_CONFIG)?;
        set_clock(take(MAP_CLOCK)?)?;
        let events = take(MAP_EVENTS)?;
        let nodes = take(MAP_NODES)?;
        let node_config = take(MAP_NODE_CONFIG)?;
        let lb = crate::lb::LbMaps::take(&mut take)?;
        mkdir(&root.join("policy"))?;
        if !recreated.is_empty() || pinned_abi_version(&maps_dir)? != Some(PIN_ABI_VERSION) {
            pin_abi_version(&maps_dir)?;
        }
        let dp = Self {
            root: root.to_path_buf(),
            endpoints: Mutex::new(
                HashMap::try_from(endpoints).map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))?,
            ),
            metrics: Mutex::new(
                PerCpuArray::try_from(metrics).map_err(|e| DatapathError::map(MAP_METRICS, e))?,
            ),
            ipcache: Mutex::new(
                LpmTrie::try_from(ipcache).map_err(|e| DatapathError::map(MAP_IPCACHE, e))?,
            ),
            policy: Mutex::new(
                ArrayOfMaps::try_from(policy).map_err(|e| DatapathError::map(MAP_POLICY, e))?,
            ),
            policy_fd: crate::inspect::obj_get(&maps_dir.join(MAP_POLICY)).map_err(|e| {
                DatapathError::io(
                    format!("opening {}", maps_dir.join(MAP_POLICY).display()),
                    e,
                )
            })?,
            policy_writers: Mutex::default(),
            spare_policy: Mutex::default(),
            policy_of_tries: Mutex::new({
                let err = |e| DatapathError::map(MAP_POLICY, e);
                let data = MapData::from_pin(maps_dir.join(MAP_POLICY)).map_err(err)?;
                ArrayOfMaps::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)?
            }),
            ct: Mutex::new(HashMap::try_from(ct).map_err(|e| DatapathError::map(MAP_CT, e))?),
            ct_count: Mutex::new(
                Array::try_from(ct_count).map_err(|e| DatapathError::map(MAP_CT_COUNT, e))?,
            ),
            endpoint_slots: Mutex::new(
                Array::try_from(endpoint_slots)
                    .map_err(|e| DatapathError::map(MAP_ENDPOINT_SLOTS, e))?,
            ),
            endpoint_filter,
            ct_live: Mutex::new(None),
            ct_left: Mutex::default(),
            config: Mutex::new(
                Array::try_from(config).map_err(|e| DatapathError::map(MAP_CONFIG, e))?,
            ),
            events: Mutex::new(Some(
                RingBuf::try_from(events).map_err(|e| DatapathError::map(MAP_EVENTS, e))?,
            )),
            nodes: Mutex::new(
                HashMap::try_from(nodes).map_err(|e| DatapathError::map(MAP_NODES, e))?,
            ),
            node_config: Mutex::new(
                Array::try_from(node_config).map_err(|e| DatapathError::map(MAP_NODE_CONFIG, e))?,
            ),
            lb,
            recreated,
            ct_max: options.ct_max,
            prefilter: crate::prefilter::PrefilterMaps::open(&maps_dir)?,
            build_tags: std::sync::OnceLock::new(),
            generic: crate::generic::GenericSlot::default(),
        };
        // Pins of a build without the filter, or a restart: the filter is
        // counted again from the endpoints the map holds.
        let addrs = dp
            .list_endpoints()?
            .into_iter()
            .filter_map(|(key, _)| key.ip());
        dp.endpoint_filter.rebuild(addrs)?;
        Ok(dp)
    }

    /// Pinned maps that did not match this build and were recreated when
    /// this handle opened them: every endpoint must be re-attached.
    pub fn recreated_maps(&self) -> &[RecreatedMap] {
        &self.recreated
    }

    /// Tags of this build's two endpoint programs. A tag hashes a
    /// program's instructions, not its `.rodata`, so it is the same for
    /// every endpoint's specialization: learnt once, by loading the
    /// programs specialized for `config` (the first endpoint asked about).
    fn build_tags(&self, config: &EndpointConfig) -> Result<[[u8; 8]; 2], DatapathError> {
        if let Some(tags) = self.build_tags.get() {
            return Ok(*tags);
        }
        let ebpf = self.load_specialized(config)?;
        let mut tags = [[0u8; 8]; 2];
        for (tag, name) in tags
            .iter_mut()
            .zip([PROG_FROM_CONTAINER, PROG_TO_CONTAINER])
        {
            *tag = program_identity(&ebpf, name)?.1;
        }
        Ok(*self.build_tags.get_or_init(|| tags))
    }

    /// How the endpoint's two pinned links stand: the device each is
    /// attached to, whether its program carries `expected` and whether it
    /// is this build's code. `None` when a pin is missing.
    pub fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError> {
        let want = config_bytes(expected);
        let mut build_tags = None;
        let mut out = Vec::new();
        for (i, pin) in [
            self.link_pin(expected.endpoint_id),
            self.to_link_pin(expected.endpoint_id),
        ]
        .into_iter()
        .enumerate()
        {
            if !pin.exists() {
                return Ok(None);
            }
            let io = |e| DatapathError::io(format!("inspecting {}", pin.display()), e);
            let target = crate::inspect::link_target(&pin).map_err(io)?;
            let rodata = crate::inspect::program_rodata(target.program_id).map_err(io)?;
            let tag = crate::inspect::program_tag(target.program_id).map_err(io)?;
            let tags = match build_tags {
                Some(t) => t,
                None => *build_tags.insert(self.build_tags(expected)?),
            };
            out.push(LinkCheck {
                ifindex: target.ifindex,
                config_matches: rodata.is_some_and(|r| crate::inspect::contains(&r, want)),
                build_matches: tag == tags[i],
            });
        }
        Ok(Some(out))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Pin path of an endpoint's TCX link (from-container, on ingress).
    pub fn link_pin(&self, endpoint_id: u16) -> PathBuf {
        self.root.join("links").join(format!("ep{endpoint_id}"))
    }

    /// Pin path of an endpoint's to-container TCX link (on egress).
    pub fn to_link_pin(&self, endpoint_id: u16) -> PathBuf {
        self.root.join("links").join(format!("ep{endpoint_id}_to"))
    }

    fn load_specialized(&self, config: &EndpointConfig) -> Result<aya::Ebpf, DatapathError> {
        self.load_object(LXC_OBJECT, config)
    }

    fn load_object(
        &self,
        object: &[u8],
        config: &EndpointConfig,
    ) -> Result<aya::Ebpf, DatapathError> {
        load_object(&self.maps_dir(), object, config)
    }

    /// A handle that loads endpoint programs without this one (see
    /// [`EndpointLoader`]).
    pub fn loader(&self) -> EndpointLoader {
        EndpointLoader {
            maps_dir: self.maps_dir(),
        }
    }

    /// Loads the endpoint's specialized programs and attaches them to
    /// `host_ifname` with TCX: from-container on ingress, to-container on
    /// egress. Where the endpoint already has a pinned link, the program is
    /// swapped atomically through it (no packet sees a missing program);
    /// otherwise a new link is created and pinned.
    pub fn attach_endpoint(
        &self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        if nix::net::if_::if_nametoindex(host_ifname).is_err() {
            return Err(DatapathError::NoSuchInterface(host_ifname.to_string()));
        }
        let loaded = self.loader().load(config)?;
        self.attach_loaded(loaded, host_ifname)
    }

    /// [`Self::attach_endpoint`] with programs [`EndpointLoader::load`]
    /// already loaded and verified: only the (fast) attach and pin happen
    /// here. The loaded object is dropped on return: the kernel keeps the
    /// programs through their links.
    pub fn attach_loaded(
        &self,
        loaded: LoadedEndpoint,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        if nix::net::if_::if_nametoindex(host_ifname).is_err() {
            return Err(DatapathError::NoSuchInterface(host_ifname.to_string()));
        }
        let LoadedEndpoint { mut ebpf, config } = loaded;
        let config = &config;
        self.attach_endpoint_programs(&mut ebpf, config.endpoint_id, host_ifname)?;
        // Off the generic program, if it was on it.
        self.forget_generic(config.endpoint_id);
        Ok(())
    }

    /// Attaches `ebpf`'s from- and to-container programs to `host_ifname`
    /// through endpoint `endpoint_id`'s link pins (swapping them into the
    /// links that exist).
    pub(crate) fn attach_endpoint_programs(
        &self,
        ebpf: &mut aya::Ebpf,
        endpoint_id: u16,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        for (name, attach, pin) in [
            (
                PROG_FROM_CONTAINER,
                TcAttachType::Ingress,
                self.link_pin(endpoint_id),
            ),
            (
                PROG_TO_CONTAINER,
                TcAttachType::Egress,
                self.to_link_pin(endpoint_id),
            ),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            attach_pinned(prog, name, host_ifname, attach, &pin)?;
        }
        Ok(())
    }

    /// Re-specializes the endpoint's programs from this build and swaps
    /// them into its pinned links (`BPF_LINK_UPDATE`): the links, the maps
    /// and every connection stay; each packet meets either the old program
    /// or the new one, never none. Both programs are loaded (and verified)
    /// before either link is touched, so a rejection changes nothing. When
    /// the attached programs already are this build's (same tags) with the
    /// same `.rodata`, nothing is swapped unless `force`.
    ///
    /// The endpoint must be attached (both link pins present, on the device
    /// `config.ifindex`): re-attaching is the agent's restore's job.
    pub fn reload_endpoint(
        &self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError> {
        self.reload_endpoint_from(LXC_OBJECT, config, force)
    }

    /// [`Self::reload_endpoint`] from another build of `lxc.o` (`object`
    /// must be 8-byte aligned). The agent always reloads its own embedded
    /// object; tests use this to offer a program the verifier rejects.
    pub fn reload_endpoint_from(
        &self,
        object: &[u8],
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError> {
        let id = config.endpoint_id;
        let links = [
            (PROG_FROM_CONTAINER, self.link_pin(id)),
            (PROG_TO_CONTAINER, self.to_link_pin(id)),
        ];
        let mut old = Vec::new();
        for (_, pin) in &links {
            if !pin.exists() {
                return Err(DatapathError::NotAttached {
                    endpoint_id: id,
                    pin: pin.clone(),
                });
            }
            let io = |e| DatapathError::io(format!("inspecting {}", pin.display()), e);
            let target = crate::inspect::link_target(pin).map_err(io)?;
            if target.ifindex != config.ifindex {
                return Err(DatapathError::WrongDevice {
                    pin: pin.clone(),
                    found: target.ifindex,
                    expected: config.ifindex,
                });
            }
            let tag = crate::inspect::program_tag(target.program_id).map_err(io)?;
            let rodata = crate::inspect::program_rodata(target.program_id).map_err(io)?;
            old.push((target, tag, rodata));
        }
        let mut ebpf = self.load_object(object, config)?;
        let mut swaps = Vec::new();
        let mut same = true;
        for ((name, _), (target, tag, rodata)) in links.iter().zip(&old) {
            let (new_id, new_tag) = program_identity(&ebpf, name)?;
            let new_rodata = crate::inspect::program_rodata(new_id)
                .map_err(|e| DatapathError::io(format!("inspecting program {name}"), e))?;
            same &= *tag == new_tag && *rodata == new_rodata;
            swaps.push(LinkSwap {
                program: name,
                link_id: target.link_id,
                old_program_id: target.program_id,
                new_program_id: new_id,
            });
        }
        if same && !force {
            for s in &mut swaps {
                s.new_program_id = s.old_program_id;
            }
            return Ok(EndpointReload {
                swapped: false,
                links: swaps,
            });
        }
        for (name, pin) in &links {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            swap_pinned(prog, name, pin)?;
        }
        self.forget_generic(id);
        Ok(EndpointReload {
            swapped: true,
            links: swaps,
        })
    }

    /// Checks, before a reload, that every shared map pinned under the root
    /// is still the one this build expects (ABI version, type, sizes).
    /// A running agent cannot migrate a map its own handles hold, so a
    /// mismatch is refused with what differs; migration happens at the
    /// agent's start-up (see [`BpfDatapath::open`]).
    pub fn check_pins(&self) -> Result<(), DatapathError> {
        let maps_dir = self.maps_dir();
        let object = aya_obj::Object::parse(LXC_OBJECT).map_err(|e| DatapathError::BpfRoot {
            path: maps_dir.clone(),
            reason: format!("parsing the embedded lxc.o: {e}"),
        })?;
        let mut problems = Vec::new();
        match pinned_abi_version(&maps_dir)? {
            Some(v) if v == PIN_ABI_VERSION => {}
            Some(v) => problems.push(format!(
                "{MAP_ABI}: pinned ABI version {v}, this build uses {PIN_ABI_VERSION}"
            )),
            None => problems.push(format!("{MAP_ABI}: no pinned ABI version")),
        }
        for spec in SHARED_MAPS {
            let path = maps_dir.join(spec.name);
            let want = object
                .maps
                .get(spec.name)
                .ok_or(DatapathError::MissingMap(spec.name))?;
            let max_entries = if spec.name == MAP_CT {
                self.ct_max
            } else {
                want.max_entries()
            };
            if !path.exists() {
                problems.push(format!("{}: pin missing", spec.name));
            } else if let Some(reason) = pin_mismatch_sized(&path, want, max_entries)? {
                problems.push(format!("{}: {reason}", spec.name));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(DatapathError::IncompatiblePin {
            path: maps_dir,
            reason: format!(
                "{}; a running agent does not migrate maps: restart cilia-agent, which recreates them and re-attaches every endpoint",
                problems.join("; ")
            ),
        })
    }

    /// Removes the endpoint's pinned links, which detaches its programs, and
    /// its policy maps. Succeeds when there is nothing to remove.
    pub fn detach_endpoint(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        for pin in [self.link_pin(endpoint_id), self.to_link_pin(endpoint_id)] {
            unpin_link(&pin)?;
        }
        self.forget_generic(endpoint_id);
        self.remove_policy(endpoint_id)
    }

    /// Whether the endpoint's programs are attached through their pinned links.
    pub fn endpoint_attached(&self, endpoint_id: u16) -> bool {
        self.link_pin(endpoint_id).exists() && self.to_link_pin(endpoint_id).exists()
    }

    /// Publishes a local endpoint address in the endpoints map (its bit in
    /// the endpoints' address filter first).
    pub fn upsert_endpoint(&self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError> {
        if info.endpoint_id != 0 {
            lock(&self.endpoint_slots)
                .set(u32::from(info.endpoint_id), info, 0)
                .map_err(|e| DatapathError::map(MAP_ENDPOINT_SLOTS, e))?;
        }
        let key = EndpointKey::from_ip(ip);
        {
            let mut endpoints = lock(&self.endpoints);
            let new = match endpoints.get(&key, 0) {
                Ok(_) => false,
                Err(e) if is_not_found(&e) => true,
                Err(e) => return Err(DatapathError::map(MAP_ENDPOINTS, e)),
            };
            if new {
                self.endpoint_filter.before_add(ip)?;
            }
            endpoints
                .insert(key, info, 0)
                .map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))?;
            if new {
                self.endpoint_filter.added(ip);
            }
        }
        self.bump_policy_revision().map(drop)
    }

    /// Withdraws a local endpoint address (its filter bit after it).
    /// Absent entries are not an error.
    pub fn remove_endpoint(&self, ip: IpAddr) -> Result<(), DatapathError> {
        {
            let mut endpoints = lock(&self.endpoints);
            match endpoints.remove(&EndpointKey::from_ip(ip)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(DatapathError::map(MAP_ENDPOINTS, e)),
            }
            self.endpoint_filter.removed(ip)?;
        }
        self.bump_policy_revision().map(drop)
    }

    /// The set bits of the endpoints' address filter, in order (what
    /// `endpoint_lookup_dst` in the datapath reads).
    pub fn endpoint_filter_bits(&self) -> Result<Vec<u32>, DatapathError> {
        self.endpoint_filter.bits()
    }

    /// Reads the endpoints map back from the kernel.
    pub fn list_endpoints(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, DatapathError> {
        lock(&self.endpoints)
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))
    }

    /// Packet counters summed over all CPUs.
    pub fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        let mut out = Vec::new();
        for (index, per_cpu) in lock(&self.metrics).iter().enumerate() {
            let per_cpu = per_cpu.map_err(|e| DatapathError::map(MAP_METRICS, e))?;
            let mut sum = MetricsValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            // A slot nothing was ever counted in is no counter.
            if sum.packets == 0 && sum.bytes == 0 {
                continue;
            }
            out.push((metrics_key_of(index as u32), sum));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Maps a prefix to an identity (not remote) in the ipcache.
    pub fn upsert_ipcache(&self, key: IpcacheKey, identity: u32) -> Result<(), DatapathError> {
        self.upsert_ipcache_value(
            key,
            IpcacheValue {
                identity,
                ..Default::default()
            },
        )
    }

    /// Writes one ipcache entry.
    pub fn upsert_ipcache_value(
        &self,
        key: IpcacheKey,
        value: IpcacheValue,
    ) -> Result<(), DatapathError> {
        lock(&self.ipcache)
            .insert(&ipcache_to_lpm(&key), value, 0)
            .map_err(|e| DatapathError::map(MAP_IPCACHE, e))
    }

    /// Removes a prefix from the ipcache. Absent entries are not an error.
    pub fn remove_ipcache(&self, key: IpcacheKey) -> Result<(), DatapathError> {
        let found = lock(&self.ipcache).remove(&ipcache_to_lpm(&key));
        match found {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_IPCACHE, e)),
        }
    }

    /// Reads the ipcache back from the kernel.
    pub fn list_ipcache(&self) -> Result<Vec<(IpcacheKey, IpcacheValue)>, DatapathError> {
        lock(&self.ipcache)
            .iter()
            .map(|r| r.map(|(k, v)| (ipcache_from_lpm(&k), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(MAP_IPCACHE, e))
    }

    fn policy_pin(&self, endpoint_id: u16, slot: char) -> PathBuf {
        self.root
            .join("policy")
            .join(format!("ep{endpoint_id}_{slot}"))
    }

    fn open_policy_map(path: &Path) -> Result<PolicyMap, DatapathError> {
        let err = |e: MapError| DatapathError::map(&path.display().to_string(), e);
        if path.exists() {
            // A policy map pinned by a build with another layout is
            // recreated; the caller rewrites all its entries anyway.
            let want = (
                CILIA_POLICY_MAX,
                std::mem::size_of::<aya::maps::lpm_trie::Key<PolicyData>>() as u32,
                std::mem::size_of::<PolicyValue>() as u32,
            );
            let info = MapInfo::from_pin(path).map_err(err)?;
            if (info.max_entries(), info.key_size(), info.value_size()) != want {
                tracing::warn!(pin = %path.display(), "policy map does not match this build: recreating it");
                std::fs::remove_file(path)
                    .map_err(|e| DatapathError::io(format!("removing {}", path.display()), e))?;
            }
        }
        if !path.exists() {
            let map = PolicyMap::create(CILIA_POLICY_MAX, BPF_F_NO_PREALLOC).map_err(err)?;
            map.pin(path).map_err(|e| DatapathError::Pin {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let data = MapData::from_pin(path).map_err(err)?;
        PolicyMap::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
    }

    /// The id of the policy map the datapath currently uses for an endpoint.
    fn active_policy_id(&self, endpoint_id: u16) -> Result<Option<u32>, DatapathError> {
        let found = lock(&self.policy).get(&u32::from(endpoint_id), 0);
        match found {
            Ok(map) => Ok(Some(
                map.info()
                    .map_err(|e| DatapathError::map(MAP_POLICY, e))?
                    .id(),
            )),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_POLICY, e)),
        }
    }

    /// The lock serializing writes of one endpoint's policy.
    fn policy_writer(&self, endpoint_id: u16) -> Arc<Mutex<()>> {
        lock(&self.policy_writers)
            .entry(endpoint_id)
            .or_default()
            .clone()
    }

    /// Installs an endpoint's complete policy. The entries are written into
    /// the map the datapath is *not* using (only the difference to what it
    /// held), then one update of `cilia_policy` switches the endpoint over:
    /// incremental, and atomic for every packet.
    pub fn set_policy(
        &self,
        endpoint_id: u16,
        entries: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<PolicyUpdate, DatapathError> {
        let writer = self.policy_writer(endpoint_id);
        let _writing = lock(&writer);
        self.write_policy(endpoint_id, entries)
    }

    /// Applies a change to an endpoint's policy in place, in the map the
    /// datapath uses, without reading it: each key changes atomically, the
    /// change as a whole does not (a packet may meet some of its keys
    /// changed and others not yet); removals go first. An endpoint without
    /// a policy gets `upserts` as its complete policy.
    pub fn update_policy(
        &self,
        endpoint_id: u16,
        removes: &BTreeSet<PolicyKey>,
        upserts: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<PolicyUpdate, DatapathError> {
        let writer = self.policy_writer(endpoint_id);
        let _writing = lock(&writer);
        lock(&self.spare_policy).remove(&endpoint_id);
        let err = |e| DatapathError::map(MAP_POLICY, e);
        // The outer map's lock is released before `write_policy`, which
        // takes it again (a guard in the `match` itself would live through
        // every arm: a thread waiting on itself).
        let found = lock(&self.policy).get(&u32::from(endpoint_id), 0);
        let active = match found {
            Ok(map) => map,
            Err(e) if is_not_found(&e) => return self.write_policy(endpoint_id, upserts),
            Err(e) => return Err(err(e)),
        };
        let mut trie =
            PolicyMap::try_from(Map::from_map_data(active).map_err(err)?).map_err(err)?;
        let mut update = PolicyUpdate {
            added: 0,
            removed: 0,
        };
        for key in removes {
            match trie.remove(&policy_to_lpm(key)) {
                Ok(()) => update.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(err(e)),
            }
        }
        for (key, value) in upserts {
            trie.insert(&policy_to_lpm(key), *value, 0).map_err(err)?;
            update.added += 1;
        }
        Ok(update)
    }

    /// Puts an empty policy map into `cilia_policy` for an id that no
    /// endpoint has yet, so that the endpoint that gets the id does not wait
    /// for the kernel's RCU grace period of a map-in-map update (~10-18 ms)
    /// when its policy is first written: that write fills the spare in
    /// place. Does nothing (`false`) when the id already has a map: an
    /// endpoint that got the id meanwhile has written its policy, and a
    /// spare is never made of a map that may be in use. The caller
    /// guarantees that no endpoint had the id when it chose it.
    pub fn spare_policy(&self, endpoint_id: u16) -> Result<bool, DatapathError> {
        let writer = self.policy_writer(endpoint_id);
        let _writing = lock(&writer);
        let err = |e| DatapathError::map(MAP_POLICY, e);
        let found = lock(&self.policy).get(&u32::from(endpoint_id), 0);
        match found {
            Ok(_) => return Ok(false),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(err(e)),
        }
        let map = PolicyMap::create(CILIA_POLICY_MAX, BPF_F_NO_PREALLOC).map_err(err)?;
        lock(&self.policy_of_tries)
            .set(u32::from(endpoint_id), &map, 0)
            .map_err(err)?;
        let Some(map_id) = self.active_policy_id(endpoint_id)? else {
            return Ok(false); // removed at once: no spare
        };
        lock(&self.spare_policy).insert(endpoint_id, (map, map_id));
        Ok(true)
    }

    /// Ids that have an entry in `cilia_policy`: every slot of the array
    /// is read (65,536 lookups, tens of milliseconds; only a restore asks).
    pub fn policy_ids(&self) -> Result<Vec<u16>, DatapathError> {
        let outer = lock(&self.policy);
        let mut ids = Vec::new();
        for id in 0..=u16::MAX {
            match outer.get(&u32::from(id), 0) {
                Ok(_) => ids.push(id),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_POLICY, e)),
            }
        }
        Ok(ids)
    }

    /// [`Self::set_policy`] under the endpoint's writer lock.
    fn write_policy(
        &self,
        endpoint_id: u16,
        entries: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<PolicyUpdate, DatapathError> {
        let spare = lock(&self.spare_policy).remove(&endpoint_id);
        if let Some((spare, spare_id)) = spare {
            // Unused until now: filled in place, no switch of maps.
            return self.fill_spare(endpoint_id, spare, spare_id, entries);
        }
        let active = self.active_policy_id(endpoint_id)?;
        let a_pin = self.policy_pin(endpoint_id, 'a');
        let a = Self::open_policy_map(&a_pin)?;
        let a_id = MapInfo::from_pin(&a_pin)
            .map_err(|e| DatapathError::map(MAP_POLICY, e))?
            .id();
        let (mut target, target_pin) = if active == Some(a_id) {
            let b_pin = self.policy_pin(endpoint_id, 'b');
            (Self::open_policy_map(&b_pin)?, b_pin)
        } else {
            (a, a_pin)
        };
        let current: BTreeMap<PolicyKey, PolicyValue> = target
            .iter()
            .map(|r| r.map(|(k, v)| (policy_from_lpm(&k), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| DatapathError::map(MAP_POLICY, e))?;
        let mut update = PolicyUpdate {
            added: 0,
            removed: 0,
        };
        for key in current.keys().filter(|k| !entries.contains_key(k)) {
            target
                .remove(&policy_to_lpm(key))
                .map_err(|e| DatapathError::map(MAP_POLICY, e))?;
            update.removed += 1;
        }
        for (key, value) in entries {
            if current.get(key) != Some(value) {
                target
                    .insert(&policy_to_lpm(key), *value, 0)
                    .map_err(|e| DatapathError::map(MAP_POLICY, e))?;
                update.added += 1;
            }
        }
        let inner =
            MapData::from_pin(&target_pin).map_err(|e| DatapathError::map(MAP_POLICY, e))?;
        lock(&self.policy)
            .set(u32::from(endpoint_id), &inner, 0)
            .map_err(|e| DatapathError::map(MAP_POLICY, e))?;
        Ok(update)
    }

    /// Writes an endpoint's first policy into its spare map (the active
    /// one, which no program uses yet) and pins it as the endpoint's map
    /// `a`. A spare that is no longer the active map (removed meanwhile)
    /// is dropped, and the write goes the usual way.
    fn fill_spare(
        &self,
        endpoint_id: u16,
        mut spare: PolicyMap,
        spare_id: u32,
        entries: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<PolicyUpdate, DatapathError> {
        let err = |e| DatapathError::map(MAP_POLICY, e);
        if self.active_policy_id(endpoint_id)? != Some(spare_id) {
            return self.write_policy(endpoint_id, entries);
        }
        let mut update = PolicyUpdate {
            added: 0,
            removed: 0,
        };
        for (key, value) in entries {
            spare.insert(&policy_to_lpm(key), *value, 0).map_err(err)?;
            update.added += 1;
        }
        // A pin left without a `cilia_policy` entry names no map in use.
        self.remove_policy_pins(endpoint_id)?;
        let a_pin = self.policy_pin(endpoint_id, 'a');
        spare.pin(&a_pin).map_err(|e| DatapathError::Pin {
            path: a_pin.clone(),
            reason: e.to_string(),
        })?;
        Ok(update)
    }

    /// The policy entries the datapath currently uses for an endpoint.
    pub fn get_policy(
        &self,
        endpoint_id: u16,
    ) -> Result<Option<BTreeMap<PolicyKey, PolicyValue>>, DatapathError> {
        let found = lock(&self.policy).get(&u32::from(endpoint_id), 0);
        let map = match found {
            Ok(map) => map,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(DatapathError::map(MAP_POLICY, e)),
        };
        let err = |e| DatapathError::map(MAP_POLICY, e);
        let trie = PolicyMap::try_from(Map::from_map_data(map).map_err(err)?).map_err(err)?;
        let entries = trie
            .iter()
            .map(|r| r.map(|(k, v)| (policy_from_lpm(&k), v)))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        Ok(Some(entries))
    }

    /// Removes the pins of an endpoint's two policy maps (absent is fine).
    fn remove_policy_pins(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        for slot in ['a', 'b'] {
            let pin = self.policy_pin(endpoint_id, slot);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DatapathError::io(format!("removing {}", pin.display()), e)),
            }
        }
        Ok(())
    }

    /// Withdraws an endpoint's policy and removes its policy maps.
    pub fn remove_policy(&self, endpoint_id: u16) -> Result<(), DatapathError> {
        let writer = self.policy_writer(endpoint_id);
        let _writing = lock(&writer);
        lock(&self.spare_policy).remove(&endpoint_id);
        match crate::inspect::clear_map_slot(&self.policy_fd, u32::from(endpoint_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DatapathError::map(
                    MAP_POLICY,
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_delete_elem",
                        io_error: e,
                    }),
                ))
            }
        }
        self.remove_policy_pins(endpoint_id)?;
        // The id's writer lock goes too unless another writer holds or
        // waits for it (each took a clone under the same map lock): an agent
        // that creates and deletes endpoints for ever keeps no lock per id
        // it ever used.
        let mut writers = lock(&self.policy_writers);
        if writers
            .get(&endpoint_id)
            .is_some_and(|w| Arc::ptr_eq(w, &writer) && Arc::strong_count(w) == 2)
        {
            writers.remove(&endpoint_id);
        }
        Ok(())
    }

    /// Bumps the global policy revision: established flows meet the policy
    /// again on their next forward packet, and conntrack entries' cached
    /// deliveries (`bpf/lib/fast.h`) stop being trusted. Called after every
    /// change of what decides a packet's fate or way: policy, the endpoints,
    /// the ipcache, nodes and services.
    pub fn bump_policy_revision(&self) -> Result<u32, DatapathError> {
        let err = |e| DatapathError::map(MAP_CONFIG, e);
        let mut config = lock(&self.config);
        let mut cfg = config.get(&0, 0).map_err(err)?;
        cfg.policy_rev = cfg.policy_rev.wrapping_add(1);
        config.set(0, cfg, 0).map_err(err)?;
        Ok(cfg.policy_rev)
    }

    /// After a write of a map the datapath reads to decide a packet's fate
    /// or way (`changed`: something was written): bumps the revision, so
    /// that no cached delivery outlives the change.
    pub(crate) fn revised(&self, changed: bool) -> Result<(), DatapathError> {
        if changed {
            self.bump_policy_revision()?;
        }
        Ok(())
    }

    /// Sets the monitor level (CILIA_MONITOR_*): which events the datapath
    /// emits. Off costs only a map lookup per event site.
    pub fn set_monitor_level(&self, level: u32) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_CONFIG, e);
        let mut config = lock(&self.config);
        let mut cfg = config.get(&0, 0).map_err(err)?;
        cfg.monitor_level = level;
        config.set(0, cfg, 0).map_err(err)
    }

    pub fn monitor_level(&self) -> Result<u32, DatapathError> {
        Ok(lock(&self.config)
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_CONFIG, e))?
            .monitor_level)
    }

    /// The event ring buffer, for its single reader (the agent's monitor).
    /// (`&mut`: taken at start-up, before the handle is shared; a shared
    /// handle hands it out through `Datapath::event_reader`.)
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// [`Self::take_events`] through a shared handle.
    pub(crate) fn take_events_shared(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }

    /// Reads the conntrack table back from the kernel.
    pub fn list_ct(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        let ct = lock(&self.ct);
        crate::batch::lookup_all(ct.map().fd().as_fd())
            .map_err(|e| DatapathError::map(MAP_CT, batch_error("bpf_map_lookup_batch", e)))
    }

    /// Writes one conntrack entry as the datapath would (fixtures use it to
    /// fill the table; it is not charged to any budget).
    pub fn insert_ct(&self, key: CtKey, value: CtValue) -> Result<(), DatapathError> {
        lock(&self.ct)
            .insert(key, value, 0)
            .map_err(|e| DatapathError::map(MAP_CT, e))
    }

    /// Deletes one conntrack entry. Absent is not an error.
    pub fn remove_ct(&self, key: CtKey) -> Result<(), DatapathError> {
        let found = lock(&self.ct).remove(&key);
        match found {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_CT, e)),
        }
    }

    /// Deletes these conntrack entries, a few thousand per system call;
    /// absent ones are skipped. Returns how many were deleted.
    pub fn remove_cts(&self, keys: &[CtKey]) -> Result<usize, DatapathError> {
        let ct = lock(&self.ct);
        crate::batch::delete_keys(ct.map().fd().as_fd(), keys)
            .map_err(|e| DatapathError::map(MAP_CT, batch_error("bpf_map_delete_batch", e)))
    }

    /// Deletes expired conntrack entries and recounts what each endpoint
    /// owns, which is what frees budget: the datapath only ever adds to
    /// the counts.
    ///
    /// An endpoint still holding three quarters of its budget after the
    /// expired entries are gone also loses the entries of its TCP
    /// connections that ended (`CILIA_CT_CLOSING`) and have been idle for
    /// [`CT_CLOSE_GRACE_NS`], before their close timeout: they are what an
    /// endpoint opening short connections at a high rate holds most of,
    /// and their close timeout only waits for stray retransmissions, which
    /// then meet policy as new packets (never more than policy allows).
    /// Linux's conntrack drops unassured entries early when its table is
    /// full in the same spirit; here it is the endpoint's own entries, near
    /// its own budget, so nobody else's flows are touched.
    ///
    /// Recounting (rather than decrementing per removal) keeps the counts
    /// self-correcting: a creation that races the walk is at worst left
    /// uncounted until the next run.
    pub fn gc_ct(&self) -> Result<CtGcReport, DatapathError> {
        let now = datapath_clock_ns();
        let threshold = pressure_threshold(self.ct_budget()?);
        let entries = self.list_ct()?;
        let mut owned = BTreeMap::<u16, u32>::new();
        for (_, value) in &entries {
            if value.expires > now {
                *owned.entry(value.owner).or_default() += 1;
            }
        }
        // A closing entry expires CILIA_CT_TCP_CLOSE after its last packet.
        let idle_since_grace =
            now + u64::from(CILIA_CT_TCP_CLOSE) * 1_000_000_000 - CT_CLOSE_GRACE_NS;
        let mut expired = Vec::new();
        let mut closed = Vec::new();
        for (key, value) in entries {
            if value.expires <= now {
                expired.push(key);
            } else if value.flags & CILIA_CT_CLOSING != 0
                && value.expires <= idle_since_grace
                && owned.get(&value.owner).is_some_and(|n| *n >= threshold)
            {
                closed.push((key, value.owner));
            }
        }
        let removed = self.remove_cts(&expired)?;
        let closed_early = if closed.is_empty() {
            0
        } else {
            for (_, owner) in &closed {
                if let Some(n) = owned.get_mut(owner) {
                    *n -= 1;
                }
            }
            let keys: Vec<CtKey> = closed.into_iter().map(|(k, _)| k).collect();
            self.remove_cts(&keys)?
        };
        owned.retain(|_, n| *n > 0);
        self.write_ct_counts(&owned)?;
        *lock(&self.ct_live) = Some(owned.values().map(|n| u64::from(*n)).sum());
        *lock(&self.ct_left) = owned;
        Ok(CtGcReport {
            expired: removed,
            closed_early,
        })
    }

    /// The per-endpoint conntrack budget the datapath applies.
    fn ct_budget(&self) -> Result<u32, DatapathError> {
        let cfg = lock(&self.config)
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_CONFIG, e))?;
        Ok(if cfg.ct_budget == 0 {
            CILIA_CT_BUDGET_DEFAULT
        } else {
            cfg.ct_budget
        })
    }

    /// Sets every endpoint's count to `owned` (absent: zero), touching only
    /// the slots that change. All 65,536 slots are read (in one walk), not
    /// only those of endpoints known to hold entries: an endpoint whose
    /// flows all came and expired between two runs has a count and no
    /// entry left to show it.
    fn write_ct_counts(&self, owned: &BTreeMap<u16, u32>) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_CT_COUNT, e);
        let mut counts = lock(&self.ct_count);
        let have: Vec<(u32, u32)> = crate::batch::lookup_all(counts.map().fd().as_fd())
            .map_err(|e| err(batch_error("bpf_map_lookup_batch", e)))?;
        for (id, have) in have {
            let want = u16::try_from(id)
                .ok()
                .and_then(|id| owned.get(&id).copied())
                .unwrap_or(0);
            if have != want {
                counts.set(id, want, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Whether a conntrack GC now may give an endpoint budget back before
    /// it runs out: an endpoint holds at least three quarters of its
    /// budget, and more than the last GC left it. Cheap (one walk of the
    /// endpoints map, then one read per endpoint), so the agent asks often
    /// and collects as soon as it says so, rather than only every GC
    /// interval: the entries of connections that ended stay counted until
    /// a GC removes them, so between two runs an endpoint opening
    /// connections at a steady rate holds the last close timeout's worth
    /// of them plus one interval's. Every local endpoint is asked (and
    /// slot 0, the flows node programs charge to no endpoint), not only
    /// those the last GC saw: a new one can reach its budget within an
    /// interval.
    pub fn ct_pressure(&self) -> Result<bool, DatapathError> {
        let used = self.ct_budget_use()?;
        let threshold = pressure_threshold(used.budget);
        let left = lock(&self.ct_left);
        Ok(used
            .held
            .iter()
            .any(|(id, n)| *n >= threshold && *n > left.get(id).copied().unwrap_or(0)))
    }

    /// The conntrack budget in force and what every local endpoint (and
    /// slot 0, the flows node programs charge to no endpoint) holds
    /// against it now, as the datapath counts it.
    pub fn ct_budget_use(&self) -> Result<CtBudgetUse, DatapathError> {
        let budget = self.ct_budget()?;
        let mut ids: BTreeSet<u16> = {
            let endpoints = lock(&self.endpoints);
            crate::batch::lookup_all::<EndpointKey, EndpointInfo>(endpoints.map().fd().as_fd())
                .map_err(|e| {
                    DatapathError::map(MAP_ENDPOINTS, batch_error("bpf_map_lookup_batch", e))
                })?
                .into_iter()
                .map(|(_, info)| info.endpoint_id)
                .collect()
        };
        ids.insert(0);
        let counts = lock(&self.ct_count);
        let mut held = BTreeMap::new();
        for id in ids {
            let n = counts
                .get(&u32::from(id), 0)
                .map_err(|e| DatapathError::map(MAP_CT_COUNT, e))?;
            if n > 0 {
                held.insert(id, n);
            }
        }
        Ok(CtBudgetUse { budget, held })
    }

    /// Removes every conntrack entry an endpoint created or that has one of
    /// its addresses at either end, and resets its budget: run when the
    /// endpoint is deleted or changes identity, so nothing it was allowed
    /// survives into a successor's flows. Returns how many were removed.
    pub fn purge_ct(&self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        let keys: Vec<[u8; 16]> = addrs
            .iter()
            .map(|ip| EndpointKey::from_ip(*ip).addr)
            .collect();
        let doomed: Vec<CtKey> = self
            .list_ct()?
            .into_iter()
            .filter(|(k, v)| {
                v.owner == endpoint_id || keys.contains(&k.saddr) || keys.contains(&k.daddr)
            })
            .map(|(k, _)| k)
            .collect();
        let removed = self.remove_cts(&doomed)?;
        lock(&self.ct_count)
            .set(u32::from(endpoint_id), 0, 0)
            .map_err(|e| DatapathError::map(MAP_CT_COUNT, e))?;
        Ok(removed)
    }

    /// Live conntrack entries counted by this handle's last [`Self::gc_ct`].
    pub fn ct_live(&self) -> Option<u64> {
        *lock(&self.ct_live)
    }

    /// Entries the conntrack table holds at most.
    pub fn ct_capacity(&self) -> u32 {
        self.ct_max
    }

    /// Conntrack entries an endpoint currently holds against its budget.
    pub fn ct_count(&self, endpoint_id: u16) -> Result<u32, DatapathError> {
        lock(&self.ct_count)
            .get(&u32::from(endpoint_id), 0)
            .map_err(|e| DatapathError::map(MAP_CT_COUNT, e))
    }

    /// Sets the per-endpoint conntrack budget (0: the built-in default).
    pub fn set_ct_budget(&self, budget: u32) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_CONFIG, e);
        let mut config = lock(&self.config);
        let mut cfg = config.get(&0, 0).map_err(err)?;
        cfg.ct_budget = budget;
        config.set(0, cfg, 0).map_err(err)
    }

    /// Loads a specialized endpoint program for `BPF_PROG_TEST_RUN`, sharing
    /// this datapath's maps but attached nowhere.
    pub fn test_program(&self, config: &EndpointConfig) -> Result<TestProgram, DatapathError> {
        Ok(TestProgram::new(
            self.load_specialized(config)?,
            PROG_FROM_CONTAINER,
        ))
    }

    /// Like [`Self::test_program`], for the to-container program.
    pub fn test_program_to_container(
        &self,
        config: &EndpointConfig,
    ) -> Result<TestProgram, DatapathError> {
        Ok(TestProgram::new(
            self.load_specialized(config)?,
            PROG_TO_CONTAINER,
        ))
    }
}

/// Locks one map handle. A panic while a guard was held cannot leave a
/// handle inconsistent (the map lives in the kernel; the handle is an fd),
/// so a poisoned lock is used as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a TCP connection that ended keeps its conntrack entry, from
/// its last packet, when its endpoint nears its budget (see
/// [`BpfDatapath::gc_ct`]) instead of the close timeout
/// (`CILIA_CT_TCP_CLOSE`, 10 s): long enough for the last ACK and a
/// retransmission or two of a FIN.
pub const CT_CLOSE_GRACE_NS: u64 = 1_000_000_000;

/// Three quarters of `budget`: an endpoint holding as many conntrack
/// entries is near its budget.
fn pressure_threshold(budget: u32) -> u32 {
    budget - budget / 4
}

/// A failed batch command (see [`crate::batch`]) as aya reports the
/// failures of its own commands.
fn batch_error(call: &'static str, io_error: std::io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// Whether a map error means "no such key" (typed wrappers report it as
/// `KeyNotFound`, some raw paths as the syscall's ENOENT).
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// The (kind, reason, direction) of slot `index` of the metrics array: the
/// inverse of `metrics_index` in bpf/lib/metrics.h.
fn metrics_key_of(index: u32) -> MetricsKey {
    MetricsKey {
        kind: (index >> cilia_abi::CILIA_METRICS_KIND_SHIFT) as u8 & 3,
        reason: (index >> cilia_abi::CILIA_METRICS_REASON_SHIFT) as u8,
        dir: index as u8 & 3,
        pad: 0,
    }
}

/// Gives the programs' clock (`cil_now()` in bpf/lib/maps.h) its
/// calibration (clock.rs); without one it reads the coarse clock, which is
/// correct but dearer per packet, and says so in the log.
fn set_clock(map: aya::maps::Map) -> Result<(), DatapathError> {
    let err = |e| DatapathError::map(MAP_CLOCK, e);
    let mut clock: Array<MapData, cilia_abi::ClockConfig> = Array::try_from(map).map_err(err)?;
    match crate::clock::calibration() {
        Ok(calibration) => {
            clock.set(0, calibration, 0).map_err(err)?;
            tracing::info!(
                hz = crate::clock::hz(&calibration),
                "datapath clock: jiffies, calibrated against CLOCK_MONOTONIC_COARSE"
            );
        }
        Err(reason) => {
            clock
                .set(0, cilia_abi::ClockConfig::default(), 0)
                .map_err(err)?;
            tracing::warn!(
                %reason,
                "datapath clock not calibrated: programs read the coarse clock (slower per packet)"
            );
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of the datapath's
/// deadlines (`cil_now()` in bpf/lib/maps.h: jiffies calibrated to this
/// clock, see clock.rs), which conntrack expiry is compared with.
pub fn datapath_clock_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which
/// stamps events.
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Attaches `prog` to `ifname` with TCX, or swaps it into the link pinned at
/// `pin` when there is one.
pub(crate) fn attach_pinned(
    prog: &mut SchedClassifier,
    name: &str,
    ifname: &str,
    attach: TcAttachType,
    pin: &Path,
) -> Result<(), DatapathError> {
    let prog_err = |e| DatapathError::program(name, e);
    let pin_err = |reason: String| DatapathError::Pin {
        path: pin.to_path_buf(),
        reason,
    };
    match PinnedLink::from_pin(pin) {
        Ok(old) => swap_into(prog, name, pin, old)?,
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            let id = prog
                .attach_with_options(
                    ifname,
                    attach,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(prog_err)?;
            let link = prog.take_link(id).map_err(prog_err)?;
            let fd_link: FdLink = link
                .try_into()
                .map_err(|e: LinkError| pin_err(e.to_string()))?;
            fd_link.pin(pin).map_err(|e| pin_err(e.to_string()))?;
        }
        Err(e) => return Err(pin_err(e.to_string())),
    }
    Ok(())
}

/// Swaps `prog` into the link pinned at `pin` (`BPF_LINK_UPDATE`).
pub(crate) fn swap_pinned(
    prog: &mut SchedClassifier,
    name: &str,
    pin: &Path,
) -> Result<(), DatapathError> {
    let link = PinnedLink::from_pin(pin).map_err(|e| DatapathError::Pin {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    })?;
    swap_into(prog, name, pin, link)
}

fn swap_into(
    prog: &mut SchedClassifier,
    name: &str,
    pin: &Path,
    link: PinnedLink,
) -> Result<(), DatapathError> {
    let link = FdLink::from(link)
        .try_into()
        .map_err(|e: LinkError| DatapathError::Pin {
            path: pin.to_path_buf(),
            reason: e.to_string(),
        })?;
    let id = prog
        .attach_to_link(link)
        .map_err(|e| DatapathError::program(name, e))?;
    // The pin keeps the link; the handle we hold may go.
    drop(
        prog.take_link(id)
            .map_err(|e| DatapathError::program(name, e))?,
    );
    Ok(())
}

/// Id and tag of a program `ebpf` has loaded.
pub(crate) fn program_identity(
    ebpf: &aya::Ebpf,
    name: &'static str,
) -> Result<(u32, [u8; 8]), DatapathError> {
    let prog: &SchedClassifier = ebpf
        .program(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|e| DatapathError::program(name, e))?;
    let info = prog.info().map_err(|e| DatapathError::program(name, e))?;
    Ok((info.id(), info.tag().to_be_bytes()))
}

/// Removes a pinned link (detaching its program). Absent is not an error.
pub(crate) fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            link.unpin().map_err(|e| DatapathError::Pin {
                path: pin.to_path_buf(),
                reason: e.to_string(),
            })?;
            Ok(())
        }
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(DatapathError::Pin {
            path: pin.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}
