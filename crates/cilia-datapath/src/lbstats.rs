//! Per-service counters of the load balancer (`cilia_lb_stats`, a per-CPU
//! array indexed by rev-NAT id), read for metrics.
//!
//! Only the indexes of services in the rev-NAT map are read: the array has
//! 65536 slots, and a walk of all of them per scrape would cost 65536
//! syscalls. The maps are opened from their pins on each read, so this file
//! needs nothing from the datapath's open maps; before the first endpoint
//! program created the pins there are no services and nothing to read.

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use cilia_abi::{LbRevNatValue, LbStats};

use crate::endpoint::{is_not_found, BpfDatapath};
use crate::error::DatapathError;

/// Pinned name of the per-service counters.
const MAP_LB_STATS: &str = "cilia_lb_stats";
/// Pinned name of the rev-NAT map (rev-NAT id -> frontend).
const MAP_LB_REVNAT: &str = "cilia_lb_revnat";

fn open(dp: &BpfDatapath, name: &'static str) -> Result<Option<Map>, DatapathError> {
    let path = dp.root().join("maps").join(name);
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: aya::maps::MapError| DatapathError::map(name, e);
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map(Some).map_err(err)
}

/// The counters of every service in the rev-NAT map, summed over CPUs.
pub(crate) fn read(dp: &BpfDatapath) -> Result<Vec<(u16, LbStats)>, DatapathError> {
    let (Some(revnat), Some(stats)) = (open(dp, MAP_LB_REVNAT)?, open(dp, MAP_LB_STATS)?) else {
        return Ok(Vec::new());
    };
    let revnat: HashMap<MapData, u16, LbRevNatValue> =
        HashMap::try_from(revnat).map_err(|e| DatapathError::map(MAP_LB_REVNAT, e))?;
    let stats: PerCpuArray<MapData, LbStats> =
        PerCpuArray::try_from(stats).map_err(|e| DatapathError::map(MAP_LB_STATS, e))?;
    let mut ids = revnat
        .keys()
        .collect::<Result<Vec<u16>, _>>()
        .map_err(|e| DatapathError::map(MAP_LB_REVNAT, e))?;
    ids.sort_unstable();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let per_cpu = match stats.get(&u32::from(id), 0) {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(DatapathError::map(MAP_LB_STATS, e)),
        };
        let mut sum = LbStats::default();
        for v in per_cpu.iter() {
            sum.flows += v.flows;
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        out.push((id, sum));
    }
    Ok(out)
}
