//! The generic endpoint program: a new endpoint enforces policy from its
//! first packet without waiting for the verifier.
//!
//! Verifying an endpoint's two specialized programs takes tens of
//! milliseconds of CPU, most of a CNI ADD, and a hundred ADDs at once queue
//! behind it. So the agent verifies one more build of the endpoint object
//! once (`lxc_generic.o`: the same code, reading its configuration from the
//! map `cilia_generic_config`, keyed by the host-side device, instead of
//! `.rodata`), and a new endpoint is attached to that program at once: a
//! map write and two TCX links. The specialized build is verified later,
//! off the ADD's path, and swapped in through the same pinned links
//! (`BPF_LINK_UPDATE`: each packet meets one program or the other, never
//! none); the endpoint's map entry goes with it.
//!
//! The generic program and its map are this handle's: not pinned. An
//! endpoint still on it when the agent stops keeps it alive through its
//! links (the program holds the map), and the next agent re-specializes it
//! at restore (its `.rodata` holds no configuration, so it never matches
//! an endpoint's record). A kernel that cannot verify the generic program
//! (it needs the lookup of a constant array key to be known non-NULL,
//! Linux ≥ 6.14) makes [`BpfDatapath::attach_endpoint_generic`] fail with
//! the verifier's reason, which the agent reports before falling back to
//! attaching the specialized build directly.

use std::collections::HashMap as StdHashMap;
use std::path::Path;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use aya::programs::SchedClassifier;
use aya::EbpfLoader;
use cilia_abi::EndpointConfig;

use crate::endpoint::lock;
use crate::error::DatapathError;
use crate::object::{
    LXC_GENERIC_OBJECT, MAP_GENERIC_CONFIG, PROG_FROM_CONTAINER, PROG_TO_CONTAINER,
};
use crate::BpfDatapath;

/// The loaded generic program and its configuration map.
pub(crate) struct GenericEndpoint {
    ebpf: aya::Ebpf,
    configs: HashMap<MapData, u32, EndpointConfig>,
    /// Endpoint id -> the device its entry in `configs` is for.
    devices: StdHashMap<u16, u32>,
}

/// [`BpfDatapath`]'s generic program: not loaded yet, loaded, or the
/// reason it cannot be (kept: a kernel that refused it once refuses it
/// again, and every ADD would pay for trying).
#[derive(Default)]
pub(crate) struct GenericSlot(Mutex<Option<Result<GenericEndpoint, String>>>);

fn load(maps_dir: &Path) -> Result<GenericEndpoint, DatapathError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(LXC_GENERIC_OBJECT)?;
    for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        crate::error::load_program(name, || prog.load())?;
    }
    let map = ebpf
        .take_map(MAP_GENERIC_CONFIG)
        .ok_or(DatapathError::MissingMap(MAP_GENERIC_CONFIG))?;
    let configs = HashMap::try_from(map).map_err(|e| DatapathError::map(MAP_GENERIC_CONFIG, e))?;
    Ok(GenericEndpoint {
        ebpf,
        configs,
        devices: StdHashMap::new(),
    })
}

impl BpfDatapath {
    /// Attaches the generic program to the endpoint's host-side device
    /// `host_ifname` (whose ifindex `config` names) through the endpoint's
    /// link pins, with `config` as its configuration: the endpoint is
    /// enforced from here on. Loads the generic program at the first call.
    /// [`DatapathError::GenericUnavailable`] when this kernel cannot verify
    /// it. Swap the specialized build in later with
    /// [`BpfDatapath::attach_loaded`] (or a reload).
    pub fn attach_endpoint_generic(
        &self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        if nix::net::if_::if_nametoindex(host_ifname).is_err() {
            return Err(DatapathError::NoSuchInterface(host_ifname.to_string()));
        }
        let mut slot = lock(&self.generic.0);
        let generic = self.generic_loaded(&mut slot)?;
        let key = config.ifindex;
        generic
            .configs
            .insert(key, *config, 0)
            .map_err(|e| DatapathError::map(MAP_GENERIC_CONFIG, e))?;
        if let Some(old) = generic.devices.insert(config.endpoint_id, key) {
            if old != key {
                let _ = generic.configs.remove(&old);
            }
        }
        self.attach_endpoint_programs(&mut generic.ebpf, config.endpoint_id, host_ifname)?;
        Ok(())
    }

    /// Loads the generic program now, ahead of the first endpoint that
    /// needs it; [`DatapathError::GenericUnavailable`] when this kernel
    /// cannot verify it (reported once, as a warning).
    pub fn prepare_generic(&self) -> Result<(), DatapathError> {
        let mut slot = lock(&self.generic.0);
        self.generic_loaded(&mut slot).map(|_| ())
    }

    fn generic_loaded<'a>(
        &self,
        slot: &'a mut Option<Result<GenericEndpoint, String>>,
    ) -> Result<&'a mut GenericEndpoint, DatapathError> {
        let generic = slot.get_or_insert_with(|| {
            load(&self.root().join("maps")).map_err(|e| {
                tracing::warn!(
                    error = %e,
                    "the generic endpoint program cannot be loaded: new endpoints wait for \
                     their specialized programs to be verified"
                );
                e.to_string()
            })
        });
        match generic {
            Ok(g) => Ok(g),
            Err(reason) => Err(DatapathError::GenericUnavailable(reason.clone())),
        }
    }

    /// Whether the generic program can be used: `Ok(false)` before its
    /// first use, `Err` with the reason the kernel refused it.
    pub fn generic_status(&self) -> Result<bool, String> {
        match &*lock(&self.generic.0) {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(reason)) => Err(reason.clone()),
        }
    }

    /// Endpoints whose configuration the generic program holds: attached
    /// to it and not yet specialized (or detached since).
    pub fn generic_endpoints(&self) -> Vec<u16> {
        match &*lock(&self.generic.0) {
            Some(Ok(g)) => g.devices.keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// Drops the endpoint's entry of the generic program's map: its
    /// specialized programs replaced the generic one, or it is gone.
    pub(crate) fn forget_generic(&self, endpoint_id: u16) {
        if let Some(Ok(g)) = &mut *lock(&self.generic.0) {
            if let Some(ifindex) = g.devices.remove(&endpoint_id) {
                if let Err(e) = g.configs.remove(&ifindex) {
                    tracing::warn!(endpoint_id, ifindex, error = %e,
                        "cannot remove the endpoint's generic configuration");
                }
            }
        }
    }
}

/// `skb->ifindex` under `BPF_PROG_TEST_RUN` without a device in the
/// context: the loopback device's.
const TEST_RUN_IFINDEX: u32 = 1;

impl BpfDatapath {
    /// A fresh copy of the generic program `name` (from- or to-container)
    /// configured with `config`, for `BPF_PROG_TEST_RUN` (which runs it as
    /// if on the loopback device; `None`: no configuration for it, as on a
    /// device the agent never configured).
    pub fn test_generic_program(
        &self,
        config: Option<&EndpointConfig>,
        name: &'static str,
    ) -> Result<crate::testrun::TestProgram, DatapathError> {
        let mut generic = load(&self.root().join("maps"))?;
        if let Some(config) = config {
            generic
                .configs
                .insert(TEST_RUN_IFINDEX, *config, 0)
                .map_err(|e| DatapathError::map(MAP_GENERIC_CONFIG, e))?;
        }
        // The program holds its map: the handle may go.
        Ok(crate::testrun::TestProgram::new(generic.ebpf, name))
    }
}
