//! A validated [`Service`] as the datapath's rows: its backends (every
//! state, so flows pinned to a terminating backend finish) and the service
//! row (slots = the backends that get new flows; the Maglev table of their
//! ids for a Maglev service).

use std::net::SocketAddr;

use cilia_abi::{LbAlgorithm, LbBackend, LbBackendState, LbFrontend, LbService};

use crate::maglev::{self, MaglevBackend};
use crate::model::{Algorithm, BackendState, LbError, Service};

fn state_row(state: BackendState) -> LbBackendState {
    match state {
        BackendState::Active => LbBackendState::Active,
        BackendState::Terminating => LbBackendState::Terminating,
        BackendState::Quarantined => LbBackendState::Quarantined,
    }
}

/// The frontend row of a service.
pub fn frontend_row(service: &Service) -> LbFrontend {
    LbFrontend {
        addr: service.frontend.addr.ip(),
        port: service.frontend.addr.port(),
        proto: service.frontend.proto.number(),
    }
}

/// The rows of `service`; `id_of` gives each backend address its backend
/// id (the agent's allocation); `maglev_size` is the configured table size.
pub fn datapath_rows(
    service: &Service,
    id_of: impl Fn(SocketAddr) -> Option<u32>,
    maglev_size: u32,
) -> Result<(Vec<LbBackend>, LbService), LbError> {
    let mut backends = Vec::with_capacity(service.backends.len());
    let mut slots = Vec::new();
    let mut weighted = Vec::new();
    for b in &service.backends {
        let id = id_of(b.addr)
            .filter(|id| *id != 0)
            .ok_or_else(|| LbError::Backend {
                input: b.addr.to_string(),
                reason: "has no backend id".into(),
            })?;
        backends.push(LbBackend {
            id,
            addr: b.addr,
            state: state_row(b.state),
        });
        if b.selectable() {
            slots.push(id);
            weighted.push(MaglevBackend {
                id,
                addr: b.addr,
                weight: u32::from(b.weight),
            });
        }
    }
    let maglev = match service.algorithm {
        Algorithm::Maglev => Some(maglev::table(&weighted, maglev_size)),
        Algorithm::Random => None,
    };
    let row = LbService {
        rev_nat: service.id,
        frontend: frontend_row(service),
        algorithm: match service.algorithm {
            Algorithm::Random => LbAlgorithm::Random,
            Algorithm::Maglev => LbAlgorithm::Maglev,
        },
        affinity_timeout: service.affinity_timeout,
        slots,
        maglev,
        flags: Default::default(),
    };
    Ok((backends, row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_backends;

    fn ids(addr: SocketAddr) -> Option<u32> {
        Some(u32::from(addr.port()))
    }

    fn service(algorithm: Algorithm) -> Service {
        Service {
            id: 42,
            frontend: "[2001:db8::10]:80/tcp".parse().expect("frontend"),
            backends: parse_backends("[2001:db8::1]:1,[2001:db8::2]:2,[2001:db8::3]:3")
                .expect("backends"),
            algorithm,
            affinity_timeout: Some(60),
            external_local: false,
        }
    }

    #[test]
    fn slots_hold_only_active_weighted_backends_and_the_map_holds_all() {
        let mut s = service(Algorithm::Random);
        s.backends[1].state = BackendState::Terminating;
        s.backends[2].weight = 0;
        let (backends, row) = datapath_rows(&s, ids, 1021).expect("rows");
        assert_eq!(backends.len(), 3);
        assert_eq!(backends[1].state, LbBackendState::Terminating);
        assert_eq!(row.slots, vec![1]);
        assert_eq!(row.rev_nat, 42);
        assert_eq!(row.frontend.port, 80);
        assert_eq!(row.frontend.proto, 6);
        assert_eq!(row.affinity_timeout, Some(60));
        assert_eq!(row.maglev, None);
    }

    #[test]
    fn a_maglev_service_carries_its_table_of_selectable_ids() {
        let mut s = service(Algorithm::Maglev);
        s.backends[0].state = BackendState::Quarantined;
        let (_, row) = datapath_rows(&s, ids, 1021).expect("rows");
        let table = row.maglev.expect("table");
        assert_eq!(table.len(), 1021);
        assert!(table.iter().all(|id| *id == 2 || *id == 3));
        assert_eq!(row.algorithm, LbAlgorithm::Maglev);
    }

    #[test]
    fn a_backend_without_id_is_an_error_naming_it() {
        let s = service(Algorithm::Random);
        let e = datapath_rows(&s, |a| (a.port() != 2).then_some(7), 1021)
            .expect_err("no id")
            .to_string();
        assert!(e.contains("[2001:db8::2]:2"), "{e}");
    }
}
