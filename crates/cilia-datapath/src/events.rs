//! Async reading of the datapath's event ring buffer, so the agent gets
//! decoded [`Event`]s without touching aya.

use aya::maps::{MapData, RingBuf};
use cilia_abi::Event;
use tokio::io::unix::AsyncFd;

use crate::error::DatapathError;

/// Most events one `read` returns.
pub const MAX_BATCH: usize = 4096;

/// The single reader of `cilia_events`.
pub struct EventReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> Result<Self, DatapathError> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the RingBuf (now owned by the AsyncFd)
        // lives.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| DatapathError::io("polling the event ring buffer", e.into()))?;
        Ok(Self { fd })
    }

    /// Waits until events are available (or `timeout` passes) and appends
    /// at most `MAX_BATCH` of them to `out`; returns how many were added.
    /// The bound keeps a reader under a flood publishing as it goes instead
    /// of draining for as long as the flood lasts.
    pub async fn read(
        &mut self,
        out: &mut Vec<Event>,
        timeout: std::time::Duration,
    ) -> Result<usize, DatapathError> {
        let before = out.len();
        let mut guard = match tokio::time::timeout(timeout, self.fd.readable_mut()).await {
            Err(_) => return Ok(0),
            Ok(r) => r.map_err(|e| DatapathError::io("waiting for events", e))?,
        };
        let ring = guard.get_inner_mut();
        let mut drained = true;
        while out.len() - before < MAX_BATCH {
            match ring.next() {
                Some(item) => out.extend(Event::from_bytes(&item)),
                None => {
                    drained = false;
                    break;
                }
            }
        }
        // Only an empty ring may wait for the next wake-up; a full batch
        // comes straight back for more.
        if !drained {
            guard.clear_ready();
        }
        Ok(out.len() - before)
    }
}
