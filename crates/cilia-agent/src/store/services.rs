//! Services and their backend ids in the store.
//!
//! Invariants (each change is one transaction):
//! * every backend address of a stored service has exactly one backend id
//!   (`cilia/lb-backends/<address:port>`), never 0, shared by the services
//!   that use the address;
//! * an id whose address no service uses any more is released in the same
//!   transaction that stops the last use;
//! * a new id is searched from where the previous search stopped
//!   (`cilia/meta/lb-backend-next`), so a released id is not given to
//!   another address soon after: conntrack entries still naming it would
//!   otherwise reach the new address instead of being re-selected.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use cilia_lb::{Frontend, Service};

use super::{decode, key_number, Change, Store, StoreError};

const SERVICES: &str = "cilia/services/";
const LB_BACKENDS: &str = "cilia/lb-backends/";
const LB_BACKEND_NEXT: &str = "cilia/meta/lb-backend-next";
/// Entries of the datapath's backends map.
const BACKENDS_MAX: usize = cilia_abi::CILIA_LB_BACKENDS_MAX as usize;

fn service_key(id: u16) -> String {
    format!("{SERVICES}{id:05}")
}

fn backend_key(addr: SocketAddr) -> String {
    format!("{LB_BACKENDS}{addr}")
}

/// The stored services and backend ids, read in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredServices {
    pub services: BTreeMap<u16, Service>,
    pub backend_ids: BTreeMap<SocketAddr, u32>,
}

impl StoredServices {
    /// The service of a frontend.
    pub fn by_frontend(&self, frontend: &Frontend) -> Option<&Service> {
        self.services.values().find(|s| s.frontend == *frontend)
    }
}

/// What a committed service change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChange {
    /// The service the change replaced or deleted.
    pub previous: Option<Service>,
    /// Backend ids after the change (every stored service's addresses).
    pub backend_ids: BTreeMap<SocketAddr, u32>,
    /// Ids no service uses any more (their addresses were released).
    pub released: Vec<u32>,
}

impl Store {
    /// The stored services and backend ids.
    pub fn services(&self) -> Result<StoredServices, StoreError> {
        let mut out = StoredServices::default();
        for (key, value) in self.list(SERVICES)? {
            let id: u16 = key_number(SERVICES, &key)?;
            out.services.insert(id, decode(&key, &value)?);
        }
        for (key, value) in self.list(LB_BACKENDS)? {
            let addr: SocketAddr = key_number(LB_BACKENDS, &key)?;
            out.backend_ids.insert(addr, decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Adds or replaces the service with `service.id` (validated by the
    /// caller), giving its new backend addresses ids and releasing the ids
    /// of addresses no service uses any more.
    pub fn put_service(&self, service: &Service) -> Result<ServiceChange, StoreError> {
        self.change(|c| {
            let mut stored = self.services()?;
            let previous = stored.services.insert(service.id, service.clone());
            c.put(service_key(service.id), service)?;
            self.settle_backends(c, stored, previous)
        })
    }

    /// Deletes a service; `None` when there is none with this id.
    pub fn delete_service(&self, id: u16) -> Result<Option<ServiceChange>, StoreError> {
        self.change(|c| {
            let mut stored = self.services()?;
            let Some(previous) = stored.services.remove(&id) else {
                return Ok(None);
            };
            c.delete(service_key(id));
            self.settle_backends(c, stored, Some(previous)).map(Some)
        })
    }

    /// Makes the backend ids of `stored` match its services' addresses.
    fn settle_backends(
        &self,
        c: &mut Change,
        stored: StoredServices,
        previous: Option<Service>,
    ) -> Result<ServiceChange, StoreError> {
        let used: BTreeSet<SocketAddr> = stored
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .collect();
        if used.len() > BACKENDS_MAX {
            return Err(StoreError::LbBackendsFull {
                wanted: used.len(),
                max: BACKENDS_MAX,
            });
        }
        let mut ids = stored.backend_ids;
        let mut released = Vec::new();
        ids.retain(|addr, id| {
            let keep = used.contains(addr);
            if !keep {
                released.push(*id);
                c.delete(backend_key(*addr));
            }
            keep
        });
        let mut taken: BTreeSet<u32> = ids.values().copied().collect();
        let mut next: u32 = match self.kv.get(LB_BACKEND_NEXT)? {
            Some(kv) => decode(LB_BACKEND_NEXT, &kv.value)?,
            None => 1,
        };
        let mut allocated = false;
        for addr in used {
            if ids.contains_key(&addr) {
                continue;
            }
            // At most BACKENDS_MAX ids are taken: a free one is near.
            while next == 0 || taken.contains(&next) || released.contains(&next) {
                next = next.wrapping_add(1);
            }
            ids.insert(addr, next);
            taken.insert(next);
            c.put(backend_key(addr), &next)?;
            next = next.wrapping_add(1);
            allocated = true;
        }
        if allocated {
            c.put(LB_BACKEND_NEXT.into(), &next)?;
        }
        released.sort_unstable();
        Ok(ServiceChange {
            previous,
            backend_ids: ids,
            released,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilia_lb::model::parse_backends;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state.redb")).expect("open");
        (dir, store)
    }

    fn service(id: u16, frontend: &str, backends: &str) -> Service {
        Service {
            id,
            frontend: frontend.parse().expect("frontend"),
            backends: parse_backends(backends).expect("backends"),
            algorithm: Default::default(),
            affinity_timeout: None,
            external_local: false,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn a_backend_shared_by_two_services_has_one_id() {
        let (_d, store) = store();
        let a = store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.1:80,10.0.0.2:80"))
            .expect("put");
        let b = store
            .put_service(&service(2, "192.0.2.11:80/tcp", "10.0.0.2:80,10.0.0.3:80"))
            .expect("put");
        assert_eq!(
            a.backend_ids[&addr("10.0.0.2:80")],
            b.backend_ids[&addr("10.0.0.2:80")]
        );
        let ids: BTreeSet<u32> = b.backend_ids.values().copied().collect();
        assert_eq!(ids.len(), 3);
        assert!(!ids.contains(&0));
        assert_eq!(store.services().expect("read").backend_ids, b.backend_ids);
    }

    #[test]
    fn an_id_is_released_when_its_last_service_stops_using_it() {
        let (_d, store) = store();
        store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.1:80,10.0.0.2:80"))
            .expect("put");
        store
            .put_service(&service(2, "192.0.2.11:80/tcp", "10.0.0.2:80"))
            .expect("put");
        let before = store.services().expect("read").backend_ids;
        let change = store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.2:80"))
            .expect("replace");
        assert_eq!(change.released, vec![before[&addr("10.0.0.1:80")]]);
        assert_eq!(change.previous.expect("previous").backends.len(), 2);
        let change = store.delete_service(1).expect("delete").expect("existed");
        assert!(change.released.is_empty(), "still used by service 2");
        let change = store.delete_service(2).expect("delete").expect("existed");
        assert_eq!(change.released, vec![before[&addr("10.0.0.2:80")]]);
        assert_eq!(store.services().expect("read"), StoredServices::default());
        assert_eq!(store.delete_service(2).expect("delete"), None);
    }

    #[test]
    fn a_released_id_is_not_given_to_the_next_address() {
        let (_d, store) = store();
        let first = store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.1:80"))
            .expect("put");
        let old = first.backend_ids[&addr("10.0.0.1:80")];
        let next = store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.9:80"))
            .expect("replace");
        assert_ne!(next.backend_ids[&addr("10.0.0.9:80")], old);
    }

    #[test]
    fn services_and_ids_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let want = {
            let store = Store::open(&path).expect("open");
            store
                .put_service(&service(7, "[2001:db8::10]:53/udp", "[2001:db8::1]:53"))
                .expect("put");
            store.services().expect("read")
        };
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.services().expect("read"), want);
        assert_eq!(
            want.services[&7].frontend.to_string(),
            "[2001:db8::10]:53/udp"
        );
    }
}
