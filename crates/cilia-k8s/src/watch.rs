//! The list/watch state of one kind, free of the network.
//!
//! Kubernetes' protocol: list (the objects and the collection's
//! resourceVersion), then watch from that version; events carry objects
//! (`ADDED`, `MODIFIED`, `DELETED`), `BOOKMARK`s carry only a newer version,
//! and a version the server no longer has is refused with `410 Gone`, as an
//! `ERROR` event or as the watch request's answer. A lost connection resumes
//! the watch from the last version seen; an expired one needs a relist.
//!
//! [`WatchState`] is that protocol as a state machine: [`WatchState::apply`]
//! takes one [`Input`] (a list, an event, a failure, the end of a stream)
//! and returns the [`Change`]s to the local cache, and
//! [`WatchState::next_request`] says what to ask the server next. The client
//! ([`crate::client`]) only carries inputs in and requests out, so every
//! transition is tested here with recorded events.
//!
//! Invariants:
//! * The cache holds, keyed by uid, exactly the objects of the last list
//!   and the events applied since; every object that leaves it is reported
//!   by a [`Change::Deleted`] — including those that vanished while the
//!   watch was down, found by diffing a relist against the cache.
//! * Within one `apply`, deletions come before upserts: after a relist an
//!   object deleted and re-created under the same name (a new uid) is
//!   removed and then added, never the other way round.
//! * An event whose object has the resourceVersion already cached changes
//!   nothing (a resumed watch may repeat the last event).
//! * The resourceVersion only moves forward through events and lists; an
//!   expired one is forgotten, so the next request is a list.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::core::WatchEvent;
use kube::{Resource, ResourceExt};
use serde::Serialize;

/// HTTP status of an expired resourceVersion.
pub const GONE: u16 = 410;

/// One thing that happened on the way from the API server.
#[derive(Debug)]
pub enum Input<K> {
    /// A complete list (the first one or a relist) and its resourceVersion.
    Listed {
        /// Every object of the kind (within the watch's selector).
        items: Vec<K>,
        /// `metadata.resourceVersion` of the list.
        resource_version: String,
    },
    /// The server accepted a watch (its answer's headers came back): the
    /// connection is back, even if no event follows for a long time.
    WatchOpened,
    /// One event of a watch stream.
    Event(WatchEvent<K>),
    /// The watch stream ended without an error (the server's watch timeout).
    StreamEnded,
    /// A request failed: `code` is the HTTP status when the server
    /// answered (410 for an expired version), `None` for a transport error.
    Failed {
        /// HTTP status, if any.
        code: Option<u16>,
        /// The server's or the transport's message.
        message: String,
    },
}

/// A change of the cache, for the consumer to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<K> {
    /// A new object, or a new version of a cached one.
    Upserted(K),
    /// An object that left the cache: its last known state.
    Deleted(K),
}

/// What to ask the server next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A full list.
    List,
    /// A watch from this resourceVersion.
    Watch {
        /// Where to resume.
        resource_version: String,
    },
}

/// Where the state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No list has succeeded yet.
    Listing,
    /// Listed, watching.
    Watching,
    /// The resourceVersion expired: listing again (the cache is still served).
    Relisting,
    /// A request failed: retrying after a backoff (the cache is still served).
    Backoff,
}

/// What `cilia status` shows of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// The resource (`pods`, `namespaces`, `networkpolicies`, …).
    pub kind: String,
    /// Whether a list has completed once (the initial sync).
    pub synced: bool,
    /// The current phase.
    pub phase: Phase,
    /// Objects in the cache.
    pub objects: usize,
    /// The last resourceVersion seen, if it is still valid.
    pub resource_version: Option<String>,
    /// Lists done (the first and every relist).
    pub lists: u64,
    /// The latest failure, until a list or watch succeeds again.
    pub last_error: Option<String>,
}

/// Backoff between failed requests: doubling from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`], back to the start after a success.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The list/watch state of one kind (see the module docs).
#[derive(Debug)]
pub struct WatchState<K> {
    kind: String,
    cache: BTreeMap<String, K>,
    resource_version: Option<String>,
    phase: Phase,
    synced: bool,
    lists: u64,
    last_error: Option<String>,
    failures: u32,
}

fn uid_of<K: Resource>(obj: &K) -> Option<String> {
    obj.meta().uid.clone()
}

impl<K: Resource + Clone> WatchState<K> {
    /// A state that has seen nothing yet; `kind` names it in status and errors.
    pub fn new(kind: impl Into<String>) -> Self {
        WatchState {
            kind: kind.into(),
            cache: BTreeMap::new(),
            resource_version: None,
            phase: Phase::Listing,
            synced: false,
            lists: 0,
            last_error: None,
            failures: 0,
        }
    }

    /// The request to make next.
    pub fn next_request(&self) -> Request {
        match (&self.phase, &self.resource_version) {
            (Phase::Listing | Phase::Relisting, _) | (_, None) => Request::List,
            (_, Some(rv)) => Request::Watch {
                resource_version: rv.clone(),
            },
        }
    }

    /// How long to wait before [`Self::next_request`]: zero unless the last
    /// input was a failure.
    pub fn delay(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (self.failures - 1).min(16);
        BACKOFF_MIN.saturating_mul(factor).min(BACKOFF_MAX)
    }

    /// The cached objects, by uid.
    pub fn cache(&self) -> &BTreeMap<String, K> {
        &self.cache
    }

    /// What `cilia status` shows.
    pub fn status(&self) -> SyncStatus {
        SyncStatus {
            kind: self.kind.clone(),
            synced: self.synced,
            phase: self.phase,
            objects: self.cache.len(),
            resource_version: self.resource_version.clone(),
            lists: self.lists,
            last_error: self.last_error.clone(),
        }
    }

    /// Applies one input; returns the changes of the cache, deletions first.
    pub fn apply(&mut self, input: Input<K>) -> Vec<Change<K>> {
        match input {
            Input::Listed {
                items,
                resource_version,
            } => self.listed(items, resource_version),
            Input::Event(event) => self.event(event),
            Input::WatchOpened => {
                // Not a reset of the backoff: a server that accepts watches
                // and fails them at once must not be asked in a tight loop;
                // the first event or bookmark resets it.
                self.last_error = None;
                if self.synced && self.phase == Phase::Backoff {
                    self.phase = Phase::Watching;
                }
                Vec::new()
            }
            Input::StreamEnded => {
                // A normal end (the server closes watches after a while):
                // resume from where we are, at once.
                Vec::new()
            }
            Input::Failed { code, message } => {
                self.failed(code, message);
                Vec::new()
            }
        }
    }

    fn ok(&mut self) {
        self.failures = 0;
        self.last_error = None;
    }

    fn failed(&mut self, code: Option<u16>, message: String) {
        let what = match code {
            Some(c) => format!("{}: HTTP {c}: {message}", self.kind),
            None => format!("{}: {message}", self.kind),
        };
        if code == Some(GONE) {
            // The version is gone for good: list again, without waiting
            // (expiry is not the server being unwell).
            self.resource_version = None;
            self.phase = Phase::Relisting;
            self.last_error = Some(format!("{what} (resource version expired: relisting)"));
            return;
        }
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(what);
        self.phase = if self.synced {
            Phase::Backoff
        } else {
            Phase::Listing
        };
    }

    fn listed(&mut self, items: Vec<K>, resource_version: String) -> Vec<Change<K>> {
        let mut fresh: BTreeMap<String, K> = BTreeMap::new();
        for item in items {
            // An object without a uid is no object of the API server.
            if let Some(uid) = uid_of(&item) {
                fresh.insert(uid, item);
            }
        }
        let mut deleted = Vec::new();
        let mut upserted = Vec::new();
        for (uid, old) in &self.cache {
            if !fresh.contains_key(uid) {
                deleted.push(Change::Deleted(old.clone()));
            }
        }
        for (uid, new) in &fresh {
            let same = self
                .cache
                .get(uid)
                .is_some_and(|old| old.resource_version() == new.resource_version());
            if !same {
                upserted.push(Change::Upserted(new.clone()));
            }
        }
        self.cache = fresh;
        self.resource_version = Some(resource_version);
        self.phase = Phase::Watching;
        self.synced = true;
        self.lists += 1;
        self.ok();
        deleted.extend(upserted);
        deleted
    }

    fn event(&mut self, event: WatchEvent<K>) -> Vec<Change<K>> {
        match event {
            WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                self.ok();
                self.phase = Phase::Watching;
                self.advance(obj.resource_version());
                let Some(uid) = uid_of(&obj) else {
                    return Vec::new();
                };
                let same = self
                    .cache
                    .get(&uid)
                    .is_some_and(|old| old.resource_version() == obj.resource_version());
                if same {
                    return Vec::new();
                }
                self.cache.insert(uid, obj.clone());
                vec![Change::Upserted(obj)]
            }
            WatchEvent::Deleted(obj) => {
                self.ok();
                self.phase = Phase::Watching;
                self.advance(obj.resource_version());
                let Some(uid) = uid_of(&obj) else {
                    return Vec::new();
                };
                match self.cache.remove(&uid) {
                    Some(_) => vec![Change::Deleted(obj)],
                    None => Vec::new(),
                }
            }
            WatchEvent::Bookmark(b) => {
                self.ok();
                self.phase = Phase::Watching;
                self.advance(Some(b.metadata.resource_version));
                Vec::new()
            }
            WatchEvent::Error(status) => {
                let message = if status.message.is_empty() {
                    status.reason.clone()
                } else {
                    status.message.clone()
                };
                self.failed(Some(status.code), message);
                Vec::new()
            }
        }
    }

    fn advance(&mut self, rv: Option<String>) {
        if let Some(rv) = rv.filter(|v| !v.is_empty()) {
            self.resource_version = Some(rv);
        }
    }
}

/// Why the initial sync did not complete, naming each kind still missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Kubernetes: not synced after {}s: {}", .waited.as_secs(), describe_missing(.missing))]
pub struct NotSynced {
    /// How long start-up waited.
    pub waited: Duration,
    /// The kinds without a completed list.
    pub missing: Vec<SyncStatus>,
}

fn describe_missing(missing: &[SyncStatus]) -> String {
    missing
        .iter()
        .map(|s| match &s.last_error {
            Some(e) => format!("{} (last error: {e})", s.kind),
            None => format!("{} (no answer yet)", s.kind),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether every kind has completed its first list; the error names those
/// that have not, with their last error.
pub fn check_synced(statuses: &[SyncStatus], waited: Duration) -> Result<(), NotSynced> {
    let missing: Vec<SyncStatus> = statuses.iter().filter(|s| !s.synced).cloned().collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NotSynced { waited, missing })
    }
}
