//! Per-service counters of the load balancer for metrics: `cilia_lb_stats`
//! (a per-CPU array indexed by rev-NAT id) read at the services' ids only.
//!
//! The array has 65536 slots: a walk of all of them per scrape would cost
//! 65536 syscalls, so only the ids of the rev-NAT map (one per service) are
//! read.

use cilia_abi::LbStats;

use crate::endpoint::BpfDatapath;
use crate::error::DatapathError;

/// The counters of every service in the rev-NAT map, summed over CPUs.
pub(crate) fn read(dp: &BpfDatapath) -> Result<Vec<(u16, LbStats)>, DatapathError> {
    dp.lb_revnat_ids()?
        .into_iter()
        .map(|id| Ok((id, dp.lb_stats(id)?)))
        .collect()
}
