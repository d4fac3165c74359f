//! Async reading of the datapath's event ring buffer, so the agent gets
//! decoded [`Event`]s without touching aya.

use aya::maps::{MapData, RingBuf};
use cilia_abi::Event;
use tokio::io::unix::AsyncFd;

use crate::error::DatapathError;

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
    /// them to `out`; returns how many were added.
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
        while let Some(item) = ring.next() {
            out.extend(Event::from_bytes(&item));
        }
        guard.clear_ready();
        Ok(out.len() - before)
    }
}
