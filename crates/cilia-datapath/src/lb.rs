//! The load balancer's maps (services, backends, rev-NAT, Maglev tables):
//! the [`BpfDatapath`] side of the `Datapath` LB methods.
//!
//! ```text
//! <root>/maps/cilia_lb_services   frontend -> master (slot 0) + slots of generation 1|2
//! <root>/maps/cilia_lb_filter     one bit per hash of an address: some frontend has it
//! <root>/maps/cilia_lb_backends   backend id -> address, state
//! <root>/maps/cilia_lb_revnat     rev-NAT id -> frontend (source of replies)
//! <root>/maps/cilia_lb_maglev     rev-NAT id -> that service's Maglev table (ARRAY)
//! ```
//!
//! Invariant: a packet sees one complete version of a service, never a mix.
//! An update writes the rev-NAT entry, then a fresh Maglev table swapped in
//! with one update of `cilia_lb_maglev`, then the slots of the generation
//! the master does not use, then the master (one update: the flip), then
//! deletes the old generation's slots. Service writes are serialized by one
//! lock (the generation is a read-modify-write of the master). Encoding is
//! `cilia_abi::rows`' alone.
//!
//! The frontends' address filter (`crate::filter`) lets an endpoint
//! program skip the services lookup for a destination no frontend has. The
//! writer lock serializes its updates with the masters' writes; it is
//! rebuilt from the services map when the maps are opened (a restart, or
//! pins of an agent that kept no filter).

use std::collections::{HashMap as StdHashMap, HashSet};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, HashOfMaps, Map, MapData, PerCpuArray};
use cilia_abi::{
    lb_other_generation, GlobalConfig, LbBackend, LbBackendValue, LbFrontend, LbMaster,
    LbRevNatValue, LbService, LbServiceFlags, LbServiceKey, LbServiceValue, LbStats,
    CILIA_LB_MAGLEV_SIZE_DEFAULT, CILIA_LB_SLOTS_MAX,
};

use crate::endpoint::{is_not_found, lock, BpfDatapath};
use crate::error::DatapathError;
use crate::filter::AddrFilter;
use crate::object::{
    MAP_CONFIG, MAP_LB_BACKENDS, MAP_LB_FILTER, MAP_LB_MAGLEV, MAP_LB_REVNAT, MAP_LB_SERVICES,
    MAP_LB_STATS,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

type MaglevTable = Array<MapData, u32>;

/// `BPF_F_INNER_MAP` (linux/bpf.h): an inner map whose max_entries may
/// differ from its map-in-map's template (arrays only compare the rest).
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Handles on the LB maps, each behind its own lock like the others'.
pub(crate) struct LbMaps {
    services: Mutex<HashMap<MapData, LbServiceKey, LbServiceValue>>,
    backends: Mutex<HashMap<MapData, u32, LbBackendValue>>,
    revnat: Mutex<HashMap<MapData, u16, LbRevNatValue>>,
    maglev: Mutex<HashOfMaps<MapData, u32, MaglevTable>>,
    stats: Mutex<PerCpuArray<MapData, LbStats>>,
    /// The frontends' addresses (`cilia_lb_filter`).
    filter: AddrFilter,
    /// Held across a whole service update or removal.
    writer: Mutex<()>,
}

impl LbMaps {
    /// Takes the LB maps out of the loaded endpoint object.
    pub(crate) fn take(
        mut take: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let services = take(MAP_LB_SERVICES)?;
        let backends = take(MAP_LB_BACKENDS)?;
        let revnat = take(MAP_LB_REVNAT)?;
        let maglev = take(MAP_LB_MAGLEV)?;
        let stats = take(MAP_LB_STATS)?;
        let filter = take(MAP_LB_FILTER)?;
        let maps = Self {
            services: Mutex::new(
                HashMap::try_from(services).map_err(|e| DatapathError::map(MAP_LB_SERVICES, e))?,
            ),
            backends: Mutex::new(
                HashMap::try_from(backends).map_err(|e| DatapathError::map(MAP_LB_BACKENDS, e))?,
            ),
            revnat: Mutex::new(
                HashMap::try_from(revnat).map_err(|e| DatapathError::map(MAP_LB_REVNAT, e))?,
            ),
            maglev: Mutex::new(
                HashOfMaps::try_from(maglev).map_err(|e| DatapathError::map(MAP_LB_MAGLEV, e))?,
            ),
            stats: Mutex::new(
                PerCpuArray::try_from(stats).map_err(|e| DatapathError::map(MAP_LB_STATS, e))?,
            ),
            filter: AddrFilter::new(MAP_LB_FILTER, filter)?,
            writer: Mutex::new(()),
        };
        maps.rebuild_filter()?;
        Ok(maps)
    }

    /// Counts the frontends (masters) of the services map into the filter.
    fn rebuild_filter(&self) -> Result<(), DatapathError> {
        let _writing = lock(&self.writer);
        let mut addrs = Vec::new();
        for key in lock(&self.services).keys() {
            let key = key.map_err(|e| DatapathError::map(MAP_LB_SERVICES, e))?;
            if key.slot != 0 {
                continue;
            }
            if let Some(frontend) = LbFrontend::decode(&key) {
                addrs.push(frontend.addr);
            }
        }
        self.filter.rebuild(addrs)
    }
}

fn invalid(object: impl Into<String>, reason: impl Into<String>) -> DatapathError {
    DatapathError::InvalidLb {
        object: object.into(),
        reason: reason.into(),
    }
}

fn service_name(s: &LbService) -> String {
    let f = &s.frontend;
    let proto = match f.proto {
        IPPROTO_TCP => "tcp".to_string(),
        IPPROTO_UDP => "udp".to_string(),
        p => format!("proto {p}"),
    };
    format!(
        "service {} ({}/{proto})",
        s.rev_nat,
        std::net::SocketAddr::new(f.addr, f.port)
    )
}

impl BpfDatapath {
    /// The Maglev table size the datapath uses (`global_config.maglev_size`,
    /// 0 meaning the default).
    pub fn maglev_size(&self) -> Result<u32, DatapathError> {
        let cfg: GlobalConfig = lock(&self.config)
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_CONFIG, e))?;
        Ok(match cfg.maglev_size {
            0 => CILIA_LB_MAGLEV_SIZE_DEFAULT,
            n => n,
        })
    }

    /// Sets the Maglev table size every table must have (0: the default;
    /// the agent validates it: a prime in its documented range). The agent
    /// sets it at start, before any service: a table of another size would
    /// be read modulo the new size (entries past its end: no backend).
    pub fn set_maglev_size(&self, size: u32) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_CONFIG, e);
        let mut config = lock(&self.config);
        let mut cfg = config.get(&0, 0).map_err(err)?;
        cfg.maglev_size = size;
        config.set(0, cfg, 0).map_err(err)
    }

    /// Adds or replaces backends by id.
    pub fn upsert_lb_backends(&self, backends: &[LbBackend]) -> Result<(), DatapathError> {
        if let Some(b) = backends.iter().find(|b| b.id == 0) {
            return Err(invalid(format!("backend {}", b.addr), "id 0 is reserved"));
        }
        let mut map = lock(&self.lb.backends);
        for b in backends {
            map.insert(b.id, b.value(), 0)
                .map_err(|e| DatapathError::map(MAP_LB_BACKENDS, e))?;
        }
        Ok(())
    }

    /// Removes backends; absent ids are not an error. Flows pinned to a
    /// removed backend are re-selected on their next packet.
    pub fn remove_lb_backends(&self, ids: &[u32]) -> Result<(), DatapathError> {
        let mut map = lock(&self.lb.backends);
        for id in ids {
            match map.remove(id) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_LB_BACKENDS, e)),
            }
        }
        Ok(())
    }

    /// The backends map.
    pub fn lb_backends(&self) -> Result<Vec<LbBackend>, DatapathError> {
        let map = lock(&self.lb.backends);
        let mut out = Vec::new();
        for entry in map.iter() {
            let (id, value) = entry.map_err(|e| DatapathError::map(MAP_LB_BACKENDS, e))?;
            match LbBackend::decode(id, &value) {
                Some(b) => out.push(b),
                None => tracing::warn!(id, "backend entry with unknown family or state: skipped"),
            }
        }
        out.sort_by_key(|b| b.id);
        Ok(out)
    }

    fn master(&self, frontend: &LbFrontend) -> Result<Option<LbServiceValue>, DatapathError> {
        let found = lock(&self.lb.services).get(&frontend.master_key(), 0);
        match found {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_LB_SERVICES, e)),
        }
    }

    /// Checks a service against itself and the backends map: TCP or UDP,
    /// a rev-NAT id, slots naming known backends of the frontend's family,
    /// a Maglev table of the configured size exactly when the algorithm is
    /// Maglev, naming only known backends.
    fn check_service(&self, service: &LbService) -> Result<(), DatapathError> {
        let name = service_name(service);
        if service.rev_nat == 0 {
            return Err(invalid(name, "rev-NAT id 0 is reserved"));
        }
        if !matches!(service.frontend.proto, IPPROTO_TCP | IPPROTO_UDP) {
            return Err(invalid(name, "protocol must be TCP or UDP"));
        }
        if service.flags != LbServiceFlags::default() && !service.is_nodeport() {
            return Err(invalid(
                name,
                "externalTrafficPolicy=Local and DSR are for NodePort services only",
            ));
        }
        if service.slots.len() > CILIA_LB_SLOTS_MAX as usize {
            return Err(invalid(
                name,
                format!(
                    "{} active backends, at most {CILIA_LB_SLOTS_MAX}",
                    service.slots.len()
                ),
            ));
        }
        // One lookup per slot, not a dump of the backends map: a service
        // update costs O(its backends), not O(all backends).
        let mut known: StdHashMap<u32, Option<LbBackend>> = StdHashMap::new();
        {
            let map = lock(&self.lb.backends);
            for id in &service.slots {
                if known.contains_key(id) {
                    continue;
                }
                let backend = match map.get(id, 0) {
                    Ok(value) => LbBackend::decode(*id, &value),
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => return Err(DatapathError::map(MAP_LB_BACKENDS, e)),
                };
                known.insert(*id, backend);
            }
        }
        let v6 = service.frontend.addr.is_ipv6();
        for id in &service.slots {
            match known.get(id).and_then(Option::as_ref) {
                None => {
                    return Err(invalid(
                        name,
                        format!("backend {id} is not in the backends map"),
                    ))
                }
                Some(b) if b.addr.is_ipv6() != v6 => {
                    return Err(invalid(
                        name,
                        format!("backend {id} ({}) is not of the frontend's family", b.addr),
                    ))
                }
                Some(_) => {}
            }
        }
        match (&service.maglev, service.algorithm) {
            (Some(table), cilia_abi::LbAlgorithm::Maglev) => {
                let size = self.maglev_size()?;
                if table.len() != size as usize {
                    return Err(invalid(
                        name,
                        format!(
                            "Maglev table of {} entries, the datapath's size is {size}",
                            table.len()
                        ),
                    ));
                }
                let slots: HashSet<u32> = service.slots.iter().copied().collect();
                if let Some(id) = table.iter().find(|id| !slots.contains(id)) {
                    return Err(invalid(
                        name,
                        format!("Maglev table names backend {id}, which is not an active slot"),
                    ));
                }
            }
            (None, cilia_abi::LbAlgorithm::Maglev) if !service.slots.is_empty() => {
                return Err(invalid(name, "Maglev service without a Maglev table"))
            }
            (Some(_), cilia_abi::LbAlgorithm::Random) => {
                return Err(invalid(name, "Maglev table given for a random service"))
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes a fresh Maglev table and swaps it in with one update.
    fn install_maglev(&self, rev_nat: u16, table: &[u32]) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_LB_MAGLEV, e);
        // The kernel compares an inner map's flags with the template's:
        // both carry BPF_F_INNER_MAP, which is what lets their sizes differ.
        let mut inner = MaglevTable::create(table.len() as u32, BPF_F_INNER_MAP).map_err(err)?;
        for (i, id) in table.iter().enumerate() {
            inner.set(i as u32, id, 0).map_err(err)?;
        }
        lock(&self.lb.maglev)
            .insert(u32::from(rev_nat), &inner, 0)
            .map_err(err)
    }

    fn remove_maglev(&self, rev_nat: u16) -> Result<(), DatapathError> {
        let found = lock(&self.lb.maglev).remove(&u32::from(rev_nat));
        match found {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_LB_MAGLEV, e)),
        }
    }

    fn remove_slots(
        &self,
        frontend: &LbFrontend,
        gen: u8,
        count: u16,
    ) -> Result<(), DatapathError> {
        let mut map = lock(&self.lb.services);
        for slot in 1..=count {
            match map.remove(&frontend.key(slot, gen)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_LB_SERVICES, e)),
            }
        }
        Ok(())
    }

    /// Adds or replaces a service (by frontend), atomically for packets
    /// (see the module's invariant).
    pub fn upsert_lb_service(&self, service: &LbService) -> Result<(), DatapathError> {
        self.check_service(service)?;
        let _writing = lock(&self.lb.writer);
        let frontend = &service.frontend;
        let old = self.master(frontend)?;
        if old.is_none() {
            self.lb.filter.before_add(frontend.addr)?;
        }
        lock(&self.lb.revnat)
            .insert(service.rev_nat, frontend.revnat_value(), 0)
            .map_err(|e| DatapathError::map(MAP_LB_REVNAT, e))?;
        if let Some(table) = &service.maglev {
            self.install_maglev(service.rev_nat, table)?;
        }
        let gen = lb_other_generation(old.map(|m| m.gen).unwrap_or(0));
        {
            let mut map = lock(&self.lb.services);
            for (k, v) in service.slot_entries(gen) {
                map.insert(k, v, 0)
                    .map_err(|e| DatapathError::map(MAP_LB_SERVICES, e))?;
            }
            map.insert(frontend.master_key(), service.master_value(gen), 0)
                .map_err(|e| DatapathError::map(MAP_LB_SERVICES, e))?;
        }
        if old.is_none() {
            self.lb.filter.added(frontend.addr);
        }
        if let Some(old) = old {
            self.remove_slots(frontend, old.gen, old.count)?;
            if old.rev_nat != service.rev_nat {
                // The frontend changed its id: the old id's table is unused.
                // Its rev-NAT entry stays for the replies of flows still
                // open; removing the old service by its id deletes it.
                self.remove_maglev(old.rev_nat)?;
            }
        }
        if service.maglev.is_none() {
            self.remove_maglev(service.rev_nat)?;
        }
        Ok(())
    }

    /// Removes a service: master first (new packets are no longer
    /// translated), then both generations' slots, its Maglev table and its
    /// rev-NAT entry. Absent is not an error.
    pub fn remove_lb_service(
        &self,
        frontend: &LbFrontend,
        rev_nat: u16,
    ) -> Result<(), DatapathError> {
        let _writing = lock(&self.lb.writer);
        if let Some(old) = self.master(frontend)? {
            let found = lock(&self.lb.services).remove(&frontend.master_key());
            match found {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_LB_SERVICES, e)),
            }
            self.lb.filter.removed(frontend.addr)?;
            self.remove_slots(frontend, 1, old.count)?;
            self.remove_slots(frontend, 2, old.count)?;
        }
        self.remove_maglev(rev_nat)?;
        let found = lock(&self.lb.revnat).remove(&rev_nat);
        match found {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(DatapathError::map(MAP_LB_REVNAT, e)),
        }
        self.reset_lb_stats(rev_nat)
    }

    /// The set bits of the frontends' address filter, in order (what
    /// `lb_maybe_frontend` in the datapath reads).
    pub fn lb_filter_bits(&self) -> Result<Vec<u32>, DatapathError> {
        self.lb.filter.bits()
    }

    /// Zeroes a service's counters, so an id used again counts from 0.
    fn reset_lb_stats(&self, rev_nat: u16) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(MAP_LB_STATS, e);
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| {
            DatapathError::io(format!("{MAP_LB_STATS}: counting CPUs ({what})"), e)
        })?;
        let zero = aya::maps::PerCpuValues::try_from(vec![LbStats::default(); cpus])
            .map_err(|e| DatapathError::io(format!("{MAP_LB_STATS}: per-CPU values"), e))?;
        lock(&self.lb.stats)
            .set(u32::from(rev_nat), zero, 0)
            .map_err(err)
    }

    /// The services as the kernel holds them: each master with its
    /// generation's slots and its Maglev table, sorted by rev-NAT id.
    pub fn lb_services(&self) -> Result<Vec<LbService>, DatapathError> {
        let err = |e| DatapathError::map(MAP_LB_SERVICES, e);
        let masters: Vec<LbMaster> = {
            let map = lock(&self.lb.services);
            let mut masters = Vec::new();
            for entry in map.iter() {
                let (k, v) = entry.map_err(err)?;
                if k.slot == 0 {
                    match LbMaster::decode(&k, &v) {
                        Some(m) => masters.push(m),
                        None => {
                            tracing::warn!("service master entry that does not decode: skipped")
                        }
                    }
                }
            }
            masters
        };
        let mut out = Vec::with_capacity(masters.len());
        for m in masters {
            let mut slots = Vec::with_capacity(usize::from(m.count));
            {
                let map = lock(&self.lb.services);
                for slot in 1..=m.count {
                    match map.get(&m.frontend.key(slot, m.gen), 0) {
                        Ok(v) => slots.push(v.backend_id),
                        // Replaced meanwhile: read what the master says now.
                        Err(e) if is_not_found(&e) => slots.push(0),
                        Err(e) => return Err(err(e)),
                    }
                }
            }
            let found = lock(&self.lb.maglev).get(&u32::from(m.rev_nat), 0);
            let maglev = match found {
                Ok(table) => Some(
                    table
                        .iter()
                        .collect::<Result<Vec<u32>, _>>()
                        .map_err(|e| DatapathError::map(MAP_LB_MAGLEV, e))?,
                ),
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(DatapathError::map(MAP_LB_MAGLEV, e)),
            };
            out.push(LbService::from_master(&m, slots, maglev));
        }
        out.sort_by_key(|s| s.rev_nat);
        Ok(out)
    }

    /// The rev-NAT ids in `cilia_lb_revnat` (one per service), sorted.
    pub(crate) fn lb_revnat_ids(&self) -> Result<Vec<u16>, DatapathError> {
        let mut ids = lock(&self.lb.revnat)
            .keys()
            .collect::<Result<Vec<u16>, _>>()
            .map_err(|e| DatapathError::map(MAP_LB_REVNAT, e))?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// A service's counters (`cilia_lb_stats`, summed over CPUs): new
    /// flows given a backend, packets and bytes translated, since the
    /// service was created (removing it zeroes them).
    pub fn lb_stats(&self, rev_nat: u16) -> Result<LbStats, DatapathError> {
        let per_cpu = lock(&self.lb.stats)
            .get(&u32::from(rev_nat), 0)
            .map_err(|e| DatapathError::map(MAP_LB_STATS, e))?;
        Ok(per_cpu.iter().fold(LbStats::default(), |sum, s| LbStats {
            flows: sum.flows + s.flows,
            packets: sum.packets + s.packets,
            bytes: sum.bytes + s.bytes,
        }))
    }
}
