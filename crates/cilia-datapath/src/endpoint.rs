//! Shared maps and per-endpoint programs, pinned under one bpffs root:
//!
//! ```text
//! <root>/maps/cilia_endpoints   shared by every endpoint program
//! <root>/maps/cilia_metrics
//! <root>/links/ep<ID>           TCX link of endpoint ID's from-container program
//! ```
//!
//! Invariants: a pinned link is the only thing keeping an endpoint's program
//! attached, so the agent may die at any time without cutting traffic; and a
//! pinned map is reused only after its key/value sizes were checked against
//! this build's ABI.

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapError, MapInfo, PerCpuHashMap};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;
use cilia_abi::{EndpointConfig, EndpointInfo, EndpointKey, MetricsKey, MetricsValue};

use crate::error::DatapathError;
use crate::object::{
    GLOBAL_CONFIG, LXC_OBJECT, MAP_ENDPOINTS, MAP_METRICS, PROG_FROM_CONTAINER, SHARED_MAPS,
};
use crate::testrun::TestProgram;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Handle on the pinned datapath of one agent.
pub struct BpfDatapath {
    root: PathBuf,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    metrics: PerCpuHashMap<MapData, MetricsKey, MetricsValue>,
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

/// Rejects pins whose layout differs from this build's ABI.
fn validate_pins(maps_dir: &Path) -> Result<(), DatapathError> {
    for spec in SHARED_MAPS {
        let path = maps_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::map(spec.name, e))?;
        if info.key_size() != spec.key_size || info.value_size() != spec.value_size {
            return Err(DatapathError::IncompatiblePin {
                path,
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key: spec.key_size,
                want_value: spec.value_size,
            });
        }
    }
    Ok(())
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
        ensure_bpffs(root)?;
        let maps_dir = root.join("maps");
        mkdir(&maps_dir)?;
        mkdir(&root.join("links"))?;
        validate_pins(&maps_dir)?;
        // Loading the object creates (or reuses) and pins the shared maps;
        // its program is never loaded here.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(LXC_OBJECT)?;
        let endpoints = ebpf
            .take_map(MAP_ENDPOINTS)
            .ok_or(DatapathError::MissingMap(MAP_ENDPOINTS))?;
        let metrics = ebpf
            .take_map(MAP_METRICS)
            .ok_or(DatapathError::MissingMap(MAP_METRICS))?;
        Ok(Self {
            root: root.to_path_buf(),
            endpoints: HashMap::try_from(endpoints)
                .map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))?,
            metrics: PerCpuHashMap::try_from(metrics)
                .map_err(|e| DatapathError::map(MAP_METRICS, e))?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Pin path of an endpoint's TCX link.
    pub fn link_pin(&self, endpoint_id: u16) -> PathBuf {
        self.root.join("links").join(format!("ep{endpoint_id}"))
    }

    fn load_specialized(&self, config: &EndpointConfig) -> Result<aya::Ebpf, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.maps_dir())
            .override_global(GLOBAL_CONFIG, config, true)
            .load(LXC_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_FROM_CONTAINER)
            .ok_or(DatapathError::MissingProgram(PROG_FROM_CONTAINER))?
            .try_into()
            .map_err(|e| DatapathError::program(PROG_FROM_CONTAINER, e))?;
        prog.load()
            .map_err(|e| DatapathError::program(PROG_FROM_CONTAINER, e))?;
        Ok(ebpf)
    }

    /// Loads the endpoint's specialized program and attaches it to the
    /// ingress of `host_ifname` with TCX. If the endpoint already has a
    /// pinned link, the program is swapped atomically through that link
    /// (no packet sees a missing program); otherwise a new link is created
    /// and pinned.
    pub fn attach_endpoint(
        &mut self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        let mut ebpf = self.load_specialized(config)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_FROM_CONTAINER)
            .ok_or(DatapathError::MissingProgram(PROG_FROM_CONTAINER))?
            .try_into()
            .map_err(|e| DatapathError::program(PROG_FROM_CONTAINER, e))?;
        let pin = self.link_pin(config.endpoint_id);
        let prog_err = |e| DatapathError::program(PROG_FROM_CONTAINER, e);
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link =
                    FdLink::from(old)
                        .try_into()
                        .map_err(|e: LinkError| DatapathError::Pin {
                            path: pin.clone(),
                            reason: e.to_string(),
                        })?;
                let id = prog.attach_to_link(link).map_err(prog_err)?;
                // The pin keeps the link; the handle we hold may go.
                drop(prog.take_link(id).map_err(prog_err)?);
            }
            Err(LinkError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                if nix::net::if_::if_nametoindex(host_ifname).is_err() {
                    return Err(DatapathError::NoSuchInterface(host_ifname.to_string()));
                }
                let id = prog
                    .attach_with_options(
                        host_ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(prog_err)?;
                let link = prog.take_link(id).map_err(prog_err)?;
                let fd_link: FdLink =
                    link.try_into().map_err(|e: LinkError| DatapathError::Pin {
                        path: pin.clone(),
                        reason: e.to_string(),
                    })?;
                fd_link.pin(&pin).map_err(|e| DatapathError::Pin {
                    path: pin.clone(),
                    reason: e.to_string(),
                })?;
            }
            Err(e) => {
                return Err(DatapathError::Pin {
                    path: pin,
                    reason: e.to_string(),
                })
            }
        }
        Ok(())
    }

    /// Removes the endpoint's pinned link, which detaches its program.
    /// Succeeds when there is nothing to remove.
    pub fn detach_endpoint(&mut self, endpoint_id: u16) -> Result<(), DatapathError> {
        let pin = self.link_pin(endpoint_id);
        match PinnedLink::from_pin(&pin) {
            Ok(link) => {
                link.unpin().map_err(|e| DatapathError::Pin {
                    path: pin.clone(),
                    reason: e.to_string(),
                })?;
                Ok(())
            }
            Err(LinkError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(DatapathError::Pin {
                path: pin,
                reason: e.to_string(),
            }),
        }
    }

    /// Whether the endpoint's program is attached through its pinned link.
    pub fn endpoint_attached(&self, endpoint_id: u16) -> bool {
        self.link_pin(endpoint_id).exists()
    }

    /// Publishes a local endpoint address in the endpoints map.
    pub fn upsert_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError> {
        self.endpoints
            .insert(EndpointKey::from_ip(ip), info, 0)
            .map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))
    }

    /// Withdraws a local endpoint address. Absent entries are not an error.
    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        match self.endpoints.remove(&EndpointKey::from_ip(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_ENDPOINTS, e)),
        }
    }

    /// Reads the endpoints map back from the kernel.
    pub fn list_endpoints(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, DatapathError> {
        self.endpoints
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(MAP_ENDPOINTS, e))
    }

    /// Packet counters summed over all CPUs.
    pub fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        let mut out = Vec::new();
        for entry in self.metrics.iter() {
            let (key, per_cpu) = entry.map_err(|e| DatapathError::map(MAP_METRICS, e))?;
            let mut sum = MetricsValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push((key, sum));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Loads a specialized endpoint program for `BPF_PROG_TEST_RUN`, sharing
    /// this datapath's maps but attached nowhere.
    pub fn test_program(&self, config: &EndpointConfig) -> Result<TestProgram, DatapathError> {
        Ok(TestProgram::new(
            self.load_specialized(config)?,
            PROG_FROM_CONTAINER,
        ))
    }
}
