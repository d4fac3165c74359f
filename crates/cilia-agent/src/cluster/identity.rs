//! The cluster-wide identity allocator, as compare-and-swap transactions on
//! the kvstore (no lock, no leader): a label set's identity is the id its
//! `identities/labels/` key names; a node using it holds a ref key under
//! its lease. Every claim re-puts the id key ("touches" it, bumping its
//! `mod_revision`) in the same transaction as the ref, and the GC deletes
//! an unreferenced id only by a transaction comparing the `mod_revision` it
//! saw when it found the id unreferenced: a claim racing the GC makes the
//! GC's transaction fail, never the reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cilia_kvstore::{Compare, KeyValue, KvError, KvStore, LeaseId, Op, Revision};

use super::keys;
use crate::store::{FIRST_ENDPOINT_IDENTITY, LAST_ENDPOINT_IDENTITY};

/// How often a claim is retried after losing a race before it gives up.
pub const MAX_ATTEMPTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The cluster maps the id or the labels elsewhere.
    #[error("{0}")]
    Conflict(String),
    #[error(
        "all cluster identities ({FIRST_ENDPOINT_IDENTITY}-{LAST_ENDPOINT_IDENTITY}) are in use"
    )]
    Exhausted,
    #[error("lost the race for an identity {MAX_ATTEMPTS} times in a row")]
    Contended,
}

fn parse_id(kv: &KeyValue) -> Result<u32, KvError> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| KvError::Corrupt {
            key: kv.key.clone(),
            reason: "not an identity number".into(),
        })
}

/// Claims `id` for `labels_json` if the cluster agrees (or does not know
/// either yet): `Ok(false)` when a concurrent change was seen (retry).
fn claim(
    kv: &dyn KvStore,
    lease: LeaseId,
    node: &str,
    id: u32,
    labels_json: &[u8],
    labels_kv: Option<&KeyValue>,
) -> Result<bool, ClaimError> {
    let labels_key = keys::identity_labels(labels_json);
    let id_key = keys::identity_id(id);
    if let Some(l) = labels_kv {
        let other = parse_id(l)?;
        if other != id {
            return Err(ClaimError::Conflict(format!(
                "cluster-wide, these labels have identity {other}"
            )));
        }
    }
    let id_kv = kv.get(&id_key)?;
    if let Some(i) = &id_kv {
        if i.value != labels_json {
            return Err(ClaimError::Conflict(format!(
                "cluster-wide, identity {id} has labels {}",
                String::from_utf8_lossy(&i.value)
            )));
        }
    }
    let mut ops = vec![
        Op::put(id_key.clone(), labels_json),
        Op::put_with_lease(keys::identity_ref(id, node), Vec::new(), lease),
    ];
    if labels_kv.is_none() {
        ops.push(Op::put(labels_key.clone(), id.to_string()));
    }
    let done = kv.txn(
        &[
            Compare::mod_revision(labels_key, labels_kv.map_or(0, |l| l.mod_revision)),
            Compare::mod_revision(id_key, id_kv.map_or(0, |i| i.mod_revision)),
        ],
        &ops,
    )?;
    Ok(done.succeeded)
}

/// The identity of `labels_json` cluster-wide: the existing one, or the
/// lowest free id; a ref of `node` is held on it under `lease`.
pub(crate) fn allocate(
    kv: &dyn KvStore,
    lease: LeaseId,
    node: &str,
    labels_json: &[u8],
) -> Result<u32, ClaimError> {
    let labels_key = keys::identity_labels(labels_json);
    for _ in 0..MAX_ATTEMPTS {
        let id = match kv.get(&labels_key)? {
            Some(l) => {
                let id = parse_id(&l)?;
                match claim(kv, lease, node, id, labels_json, Some(&l)) {
                    Ok(true) => return Ok(id),
                    Ok(false) => continue,
                    // The id key changed labels under us: a GC and a new
                    // allocation happened in between; read again.
                    Err(ClaimError::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
            None => {
                let used: BTreeSet<u32> = kv
                    .list_prefix(keys::IDENTITY_IDS)?
                    .kvs
                    .iter()
                    .filter_map(|kv| keys::id_of_id_key(&kv.key))
                    .collect();
                (FIRST_ENDPOINT_IDENTITY..=LAST_ENDPOINT_IDENTITY)
                    .find(|id| !used.contains(id))
                    .ok_or(ClaimError::Exhausted)?
            }
        };
        match claim(kv, lease, node, id, labels_json, None) {
            Ok(true) => return Ok(id),
            Ok(false) | Err(ClaimError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ClaimError::Contended)
}

/// Makes the cluster agree that `id` is `labels_json` and that `node` uses
/// it (a node's existing local identity at join, or a ref re-put after a
/// lost lease). `Err(Conflict)` when the cluster maps either elsewhere.
pub(crate) fn adopt(
    kv: &dyn KvStore,
    lease: LeaseId,
    node: &str,
    id: u32,
    labels_json: &[u8],
) -> Result<(), ClaimError> {
    let labels_key = keys::identity_labels(labels_json);
    for _ in 0..MAX_ATTEMPTS {
        let l = kv.get(&labels_key)?;
        if claim(kv, lease, node, id, labels_json, l.as_ref())? {
            return Ok(());
        }
    }
    Err(ClaimError::Contended)
}

/// Drops `node`'s ref on `id`.
pub(crate) fn release(kv: &dyn KvStore, node: &str, id: u32) -> Result<(), KvError> {
    kv.delete(&keys::identity_ref(id, node))?;
    Ok(())
}

/// The identity GC's memory between rounds: ids found unreferenced, with
/// the `mod_revision` of their id key then and since when.
#[derive(Debug, Default)]
pub(crate) struct Gc {
    unreferenced: BTreeMap<u32, (Revision, Instant)>,
}

impl Gc {
    /// One round: deletes ids unreferenced (with an unchanged id key) for at
    /// least `grace`; returns how many it deleted.
    pub fn round(
        &mut self,
        kv: &dyn KvStore,
        grace: Duration,
        now: Instant,
    ) -> Result<usize, KvError> {
        // Ids first, refs second: a claim after the ids were read changes
        // the id key (the compare below fails); one before shows its ref.
        let ids = kv.list_prefix(keys::IDENTITY_IDS)?;
        let referenced: BTreeSet<u32> = kv
            .list_prefix(keys::IDENTITY_REFS)?
            .kvs
            .iter()
            .filter_map(|kv| keys::id_of_ref_key(&kv.key))
            .collect();
        let mut next = BTreeMap::new();
        let mut deleted = 0;
        for id_kv in &ids.kvs {
            let Some(id) = keys::id_of_id_key(&id_kv.key) else {
                continue;
            };
            if referenced.contains(&id) {
                continue;
            }
            let since = match self.unreferenced.get(&id) {
                Some((rev, since)) if *rev == id_kv.mod_revision => *since,
                _ => now,
            };
            if now.duration_since(since) < grace {
                next.insert(id, (id_kv.mod_revision, since));
                continue;
            }
            let done = kv.txn(
                &[Compare::mod_revision(id_kv.key.clone(), id_kv.mod_revision)],
                &[
                    Op::delete(id_kv.key.clone()),
                    Op::delete(keys::identity_labels(&id_kv.value)),
                ],
            )?;
            if done.succeeded {
                deleted += 1;
                tracing::info!(identity = id, "cluster identity unused: deleted");
            }
        }
        self.unreferenced = next;
        Ok(deleted)
    }
}
