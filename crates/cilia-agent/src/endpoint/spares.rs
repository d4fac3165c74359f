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

use std::sync::mpsc;

use tracing::{debug, warn};

use super::DatapathHandle;

/// How many ids ahead are kept ready: sequential creates use one each, and
/// a burst of concurrent creates uses them up and goes on without.
pub const SPARES_AHEAD: usize = 8;

/// The handle creates queue the next ids through.
#[derive(Clone)]
pub struct PolicySpares {
    tx: mpsc::Sender<Vec<u16>>,
}

impl PolicySpares {
    /// Starts the worker thread; it ends when every handle is dropped.
    pub fn start(datapath: DatapathHandle) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<u16>>();
        std::thread::Builder::new()
            .name("policy-spares".into())
            .spawn(move || {
                while let Ok(mut ids) = rx.recv() {
                    // Only the latest request matters: older ones name ids
                    // that creates have taken since.
                    while let Ok(newer) = rx.try_recv() {
                        ids = newer;
                    }
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

    /// Asks for spares for `ids` (the ids the next creates will get).
    pub fn queue(&self, ids: Vec<u16>) {
        // The worker is gone only when the agent stops.
        let _ = self.tx.send(ids);
    }
}
