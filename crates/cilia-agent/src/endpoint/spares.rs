//! Spare policy maps: an endpoint's policy map must be in `cilia_policy`
//! before its program is attached, and putting a map into a map-in-map
//! makes the kernel wait for an RCU grace period (~10-18 ms here), on the
//! CNI ADD's critical path. The ids the next creates will get are known
//! (ids are handed out in increasing order), so a background thread puts an
//! empty map in place for each of them beforehand; the create's first
//! policy write then fills that map in place and waits for nothing.
//!
//! A spare is only ever made for an id that has no map (see
//! `cilia_datapath::BpfDatapath::spare_policy`): a create that got the id
//! meanwhile either wrote its map first (the spare is then not made) or
//! finds the spare and fills it. A spare map is empty and no program or
//! `cilia_endpoints` entry names its id, so it lets nothing through.
//! Restore removes the maps of ids without an endpoint, keeping as spares
//! the empty ones of ids the next creates will get.

use std::sync::{mpsc, Arc};

use tracing::{debug, warn};

use super::DatapathHandle;
use crate::store::Store;

/// How many ids ahead are kept ready: sequential creates use one each, and
/// a burst of concurrent creates uses them up and goes on without.
pub const SPARES_AHEAD: usize = 8;

/// The handle creates wake the worker through.
#[derive(Clone)]
pub struct PolicySpares {
    tx: mpsc::Sender<()>,
}

impl PolicySpares {
    /// Starts the worker thread; it ends when every handle is dropped. It
    /// reads the next ids from the store itself, off the creates' path.
    pub fn start(datapath: DatapathHandle, store: Arc<Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("policy-spares".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // One round serves every wake-up queued meanwhile.
                    while rx.try_recv().is_ok() {}
                    let ids = match store.next_endpoint_ids(SPARES_AHEAD) {
                        Ok(ids) => ids,
                        Err(e) => {
                            warn!(error = %e, "cannot read the next endpoint ids for spare policy maps");
                            continue;
                        }
                    };
                    for id in ids {
                        match datapath.spare_endpoint_policy(id) {
                            Ok(true) => debug!(id, "spare policy map ready"),
                            Ok(false) => {}
                            Err(e) => {
                                warn!(id, error = %e, "cannot prepare a spare policy map; creates write their maps themselves");
                                break;
                            }
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Asks for spares for the ids the next creates will get.
    pub fn top_up(&self) {
        // The worker is gone only when the agent stops.
        let _ = self.tx.send(());
    }
}
