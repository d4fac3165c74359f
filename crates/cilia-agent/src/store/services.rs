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

use cilia_kvstore::Revision;

use super::{decode, key_number, Change, Store, StoreError};

const SERVICES: &str = "cilia/services/";
const LB_BACKENDS: &str = "cilia/lb-backends/";
const LB_BACKEND_NEXT: &str = "cilia/meta/lb-backend-next";
/// Written by every service change: its `mod_revision` names the version
/// of the services a cache holds.
const SERVICES_REV: &str = "cilia/meta/services-rev";
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

/// What a committed [`Store::change_services`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesChange {
    /// For each put, in order, the service it replaced.
    pub previous: Vec<Option<Service>>,
    /// The services deleted.
    pub deleted: Vec<Service>,
    /// Backend ids after the change (every stored service's addresses).
    pub backend_ids: BTreeMap<SocketAddr, u32>,
    /// Ids no service uses any more, ascending.
    pub released: Vec<u32>,
}

/// The decoded services at `revision` (the `mod_revision` of
/// [`SERVICES_REV`], which every service change writes), with how many
/// services use each backend address and the ids taken.
#[derive(Debug, Clone)]
pub struct ServicesCache {
    revision: Revision,
    stored: StoredServices,
    uses: BTreeMap<SocketAddr, usize>,
    taken: BTreeSet<u32>,
}

impl ServicesCache {
    fn new(revision: Revision, stored: StoredServices) -> Self {
        let mut uses: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for b in stored.services.values().flat_map(|s| &s.backends) {
            *uses.entry(b.addr).or_default() += 1;
        }
        let taken = stored.backend_ids.values().copied().collect();
        Self {
            revision,
            stored,
            uses,
            taken,
        }
    }
}

impl Store {
    /// The revision of the services: the `mod_revision` of
    /// [`SERVICES_REV`] (0 before the first service change).
    fn services_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.kv.get(SERVICES_REV)?.map_or(0, |kv| kv.mod_revision))
    }

    /// The stored services and backend ids, decoded from the store.
    fn read_services(&self) -> Result<StoredServices, StoreError> {
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

    /// Runs `f` on the stored services: on the cache when it holds the
    /// current revision (and no change holds it), else on a fresh read.
    pub fn with_services<T>(&self, f: impl FnOnce(&StoredServices) -> T) -> Result<T, StoreError> {
        // The revision first: a cache at it was filled from that revision.
        let revision = self.services_revision()?;
        if let Ok(cache) = self.services_cache.try_lock() {
            if let Some(c) = cache.as_ref().filter(|c| c.revision == revision) {
                return Ok(f(&c.stored));
            }
        }
        Ok(f(&self.read_services()?))
    }

    /// The stored services and backend ids.
    pub fn services(&self) -> Result<StoredServices, StoreError> {
        self.with_services(Clone::clone)
    }

    /// Adds or replaces the service with `service.id` (validated by the
    /// caller), giving its new backend addresses ids and releasing the ids
    /// of addresses no service uses any more.
    pub fn put_service(&self, service: &Service) -> Result<ServiceChange, StoreError> {
        let mut batch = self.change_services(std::slice::from_ref(service), &[])?;
        Ok(ServiceChange {
            previous: batch.previous.pop().flatten(),
            backend_ids: batch.backend_ids,
            released: batch.released,
        })
    }

    /// Deletes a service; `None` when there is none with this id.
    pub fn delete_service(&self, id: u16) -> Result<Option<ServiceChange>, StoreError> {
        let mut batch = self.change_services(&[], &[id])?;
        Ok(batch.deleted.pop().map(|previous| ServiceChange {
            previous: Some(previous),
            backend_ids: batch.backend_ids,
            released: batch.released,
        }))
    }

    /// Adds or replaces `puts` (validated by the caller, distinct ids and
    /// frontends) and deletes `deletes` (absent ids are skipped), all in one
    /// transaction: one commit however many services change. Costs
    /// O(changed services' backends × log n) once the cache is filled.
    pub fn change_services(
        &self,
        puts: &[Service],
        deletes: &[u16],
    ) -> Result<ServicesChange, StoreError> {
        // Held across the change: the cache is only ever the committed
        // state of one revision. (Readers try_lock it and read the store
        // when it is held.)
        let mut slot = self
            .services_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Taken out: if the change fails, no cache is left (refilled next).
        let cached = slot.take();
        let (change, cache, revision) = {
            let mut cache = None;
            let (change, revision) = self.change_at(|c| {
                let revision = self.services_revision()?;
                let (mut working, fresh) = match cached {
                    Some(cache) if cache.revision == revision => (cache, false),
                    _ => (ServicesCache::new(revision, self.read_services()?), true),
                };
                let change = self.apply_services(c, &mut working, puts, deletes, fresh)?;
                c.put(SERVICES_REV.into(), &())?;
                cache = Some(working);
                Ok(change)
            })?;
            (change, cache, revision)
        };
        if let Some(mut cache) = cache {
            cache.revision = revision;
            *slot = Some(cache);
        }
        Ok(change)
    }

    /// Applies puts and deletes to `cache` and writes them to `c`: backend
    /// ids for addresses no service used, released ids for addresses no
    /// service uses any more. `fresh`: the cache was just read, also
    /// release any stored id of an address no service uses.
    fn apply_services(
        &self,
        c: &mut Change,
        cache: &mut ServicesCache,
        puts: &[Service],
        deletes: &[u16],
        fresh: bool,
    ) -> Result<ServicesChange, StoreError> {
        let mut touched: BTreeSet<SocketAddr> = BTreeSet::new();
        if fresh {
            touched.extend(
                cache
                    .stored
                    .backend_ids
                    .keys()
                    .filter(|a| !cache.uses.contains_key(a)),
            );
        }
        let unuse = |uses: &mut BTreeMap<SocketAddr, usize>, s: &Service| {
            for b in &s.backends {
                if let Some(n) = uses.get_mut(&b.addr) {
                    *n -= 1;
                    if *n == 0 {
                        uses.remove(&b.addr);
                    }
                }
            }
        };
        let mut previous = Vec::with_capacity(puts.len());
        for service in puts {
            let old = cache.stored.services.insert(service.id, service.clone());
            if let Some(old) = &old {
                unuse(&mut cache.uses, old);
                touched.extend(old.backends.iter().map(|b| b.addr));
            }
            for b in &service.backends {
                *cache.uses.entry(b.addr).or_default() += 1;
                touched.insert(b.addr);
            }
            previous.push(old);
            c.put(service_key(service.id), service)?;
        }
        let mut deleted = Vec::new();
        for id in deletes {
            if let Some(gone) = cache.stored.services.remove(id) {
                unuse(&mut cache.uses, &gone);
                touched.extend(gone.backends.iter().map(|b| b.addr));
                c.delete(service_key(*id));
                deleted.push(gone);
            }
        }
        if cache.uses.len() > BACKENDS_MAX {
            return Err(StoreError::LbBackendsFull {
                wanted: cache.uses.len(),
                max: BACKENDS_MAX,
            });
        }
        let ids = &mut cache.stored.backend_ids;
        let mut released = BTreeSet::new();
        for addr in &touched {
            if !cache.uses.contains_key(addr) {
                if let Some(id) = ids.remove(addr) {
                    released.insert(id);
                    cache.taken.remove(&id);
                    c.delete(backend_key(*addr));
                }
            }
        }
        let mut next: u32 = match self.kv.get(LB_BACKEND_NEXT)? {
            Some(kv) => decode(LB_BACKEND_NEXT, &kv.value)?,
            None => 1,
        };
        let mut allocated = false;
        for addr in &touched {
            if !cache.uses.contains_key(addr) || ids.contains_key(addr) {
                continue;
            }
            // At most BACKENDS_MAX ids are taken: a free one is near.
            while next == 0 || cache.taken.contains(&next) || released.contains(&next) {
                next = next.wrapping_add(1);
            }
            ids.insert(*addr, next);
            cache.taken.insert(next);
            c.put(backend_key(*addr), &next)?;
            next = next.wrapping_add(1);
            allocated = true;
        }
        if allocated {
            c.put(LB_BACKEND_NEXT.into(), &next)?;
        }
        Ok(ServicesChange {
            previous,
            deleted,
            backend_ids: ids.clone(),
            released: released.into_iter().collect(),
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
    fn the_cache_after_changes_is_what_a_fresh_read_finds() {
        let (_d, store) = store();
        store
            .put_service(&service(1, "192.0.2.10:80/tcp", "10.0.0.1:80,10.0.0.2:80"))
            .expect("put");
        store
            .change_services(
                &[
                    service(2, "192.0.2.11:80/tcp", "10.0.0.2:80,10.0.0.3:80"),
                    service(3, "192.0.2.12:80/tcp", "10.0.0.4:80"),
                ],
                &[],
            )
            .expect("batch");
        let change = store
            .change_services(&[service(1, "192.0.2.10:80/tcp", "10.0.0.3:80")], &[3])
            .expect("batch");
        assert_eq!(change.deleted.len(), 1);
        assert_eq!(change.released.len(), 2, "10.0.0.1 and 10.0.0.4");
        // A change made by another Store on the same file would bump the
        // services revision; a fresh read and the cached view agree.
        let cached = store.services().expect("cached");
        let fresh = store.read_services().expect("fresh");
        assert_eq!(cached, fresh);
        assert_eq!(
            fresh.backend_ids.keys().copied().collect::<Vec<_>>(),
            vec![addr("10.0.0.2:80"), addr("10.0.0.3:80")]
        );
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
