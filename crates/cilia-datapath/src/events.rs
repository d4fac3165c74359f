//! Async reading of the datapath's event ring buffer, so the agent gets
//! decoded [`Event`]s without touching aya.

use aya::maps::{MapData, RingBuf};
use cilia_abi::Event;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::DatapathError;

/// Most events one `read` returns.
pub const MAX_BATCH: usize = 4096;

/// The single reader of `cilia_events` (or of the events a
/// [`crate::fake::FakeDatapath`] is sent).
pub struct EventReader {
    source: Source,
}

enum Source {
    Ring(Box<AsyncFd<RingBuf<MapData>>>),
    Channel(UnboundedReceiver<Event>),
}

impl EventReader {
    /// Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> Result<Self, DatapathError> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the RingBuf (now owned by the AsyncFd)
        // lives.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| DatapathError::io("polling the event ring buffer", e.into()))?;
        Ok(Self {
            source: Source::Ring(Box::new(fd)),
        })
    }

    /// A reader of the events sent on a channel: what the fake datapath
    /// hands out.
    pub fn from_channel(events: UnboundedReceiver<Event>) -> Self {
        Self {
            source: Source::Channel(events),
        }
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
        match &mut self.source {
            Source::Ring(fd) => read_ring(fd, out, timeout).await,
            Source::Channel(rx) => {
                let before = out.len();
                if let Ok(Some(first)) = tokio::time::timeout(timeout, rx.recv()).await {
                    out.push(first);
                    while out.len() - before < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(event) => out.push(event),
                            Err(_) => break,
                        }
                    }
                }
                Ok(out.len() - before)
            }
        }
    }
}

async fn read_ring(
    fd: &mut AsyncFd<RingBuf<MapData>>,
    out: &mut Vec<Event>,
    timeout: std::time::Duration,
) -> Result<usize, DatapathError> {
    let before = out.len();
    let mut guard = match tokio::time::timeout(timeout, fd.readable_mut()).await {
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
