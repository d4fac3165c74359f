//! NodePort services: the [`BpfDatapath`] side of external traffic at the
//! underlay device (`cil_from_netdev`, `bpf/lib/nodeport.h`).
//!
//! ```text
//! <root>/maps/cilia_lb_nat   NodePort translations (LRU): SNAT out/in, a local backend's frontend
//! ```
//!
//! A NodePort service is an ordinary service (same maps, same atomic
//! update) whose frontend address is unspecified (`0.0.0.0` / `::`) and
//! whose master entry carries `CILIA_LB_FLAG_NODEPORT` (set by the row
//! encoding), plus `CILIA_LB_FLAG_LOCAL` for externalTrafficPolicy=Local.
//! The NAT map is written by the datapath only; the agent reads it.

use aya::maps::{HashMap, Map, MapData, MapError};
use cilia_abi::{LbNatKey, LbNatValue, LbService, LbServiceFlags};

use crate::endpoint::BpfDatapath;
use crate::error::DatapathError;
use crate::object::MAP_LB_NAT;

/// How a NodePort service treats external traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePortOptions {
    /// externalTrafficPolicy=Local: the slots hold only this node's
    /// backends, and external traffic never goes to another node
    /// (`CILIA_LB_FLAG_LOCAL`).
    pub external_local: bool,
    /// `--lb-mode dsr`: a remote backend gets the client's packets
    /// unSNATed, with the frontend in an IP option, and its node answers
    /// the client directly (`CILIA_LB_FLAG_DSR`); else SNAT.
    pub dsr: bool,
}

impl NodePortOptions {
    /// The master entry's `CILIA_LB_FLAG_*` bits these options add.
    pub fn flags(self) -> u8 {
        self.service_flags().bits()
    }

    /// The options as the service's flags.
    pub fn service_flags(self) -> LbServiceFlags {
        LbServiceFlags {
            local: self.external_local,
            dsr: self.dsr,
        }
    }

    /// `service` with these options as its flags (what
    /// `upsert_nodeport_service` writes).
    pub fn apply(self, service: &LbService) -> LbService {
        LbService {
            flags: self.service_flags(),
            ..service.clone()
        }
    }
}

impl BpfDatapath {
    /// Adds or replaces a NodePort service (see the module doc). The
    /// frontend address must be unspecified; with `external_local` the
    /// caller writes only this node's backends into the slots, and the
    /// datapath refuses to send external traffic to another node; with
    /// `dsr` remote backends answer the client directly.
    pub fn upsert_nodeport_service(
        &self,
        service: &LbService,
        options: NodePortOptions,
    ) -> Result<(), DatapathError> {
        if !service.frontend.addr.is_unspecified() {
            return Err(DatapathError::InvalidLb {
                object: format!("nodeport service {}", service.rev_nat),
                reason: format!(
                    "frontend address {} is not 0.0.0.0 or ::",
                    service.frontend.addr
                ),
            });
        }
        self.upsert_lb_service(&options.apply(service))
    }

    /// The NodePort translations the datapath holds (`cilia_lb_nat`).
    pub fn lb_nat(&self) -> Result<Vec<(LbNatKey, LbNatValue)>, DatapathError> {
        let err = |e: MapError| DatapathError::map(MAP_LB_NAT, e);
        let path = self.root().join("maps").join(MAP_LB_NAT);
        let data = MapData::from_pin(&path).map_err(err)?;
        let map: HashMap<MapData, LbNatKey, LbNatValue> =
            HashMap::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)?;
        map.iter().collect::<Result<Vec<_>, _>>().map_err(err)
    }
}
