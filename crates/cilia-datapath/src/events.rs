//! Async reading of the datapath's event ring buffer, so the agent gets
//! decoded [`Event`]s without touching aya.

use aya::maps::{MapData, RingBuf};
use cilia_abi::Event;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::DatapathError;

/// Most events one `read` returns.
pub const MAX_BATCH: usize = 4096;

/// How long a reader woken by the first event of a batch lets more gather
/// before it drains them. Events then cost the agent one wake-up per batch
/// instead of one per event (a context switch per new connection on the
/// CPUs the traffic runs on), for at most this much delay to a listener.
pub const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// The single reader of `cilia_events` (or of the events a
/// [`crate::fake::FakeDatapath`] is sent).
pub struct EventReader {
    source: Source,
}

struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
    /// The last drain stopped at `MAX_BATCH` with events left.
    backlog: bool,
}

enum Source {
    Ring(Box<RingReader>),
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
            source: Source::Ring(Box::new(RingReader { fd, backlog: false })),
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
            Source::Ring(ring) => read_ring(ring, out, timeout).await,
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
    ring: &mut RingReader,
    out: &mut Vec<Event>,
    timeout: std::time::Duration,
) -> Result<usize, DatapathError> {
    let before = out.len();
    if !ring.backlog {
        // The producer wakes the poll only when it writes into an empty
        // ring (the kernel's default for `bpf_ringbuf_submit(.., 0)`): once
        // per batch, not per event, because the reader waits BATCH_DELAY
        // before draining and so leaves the ring non-empty meanwhile.
        let mut guard = match tokio::time::timeout(timeout, ring.fd.readable_mut()).await {
            Err(_) => return Ok(0),
            Ok(r) => r.map_err(|e| DatapathError::io("waiting for events", e))?,
        };
        tokio::time::sleep(BATCH_DELAY).await;
        // Cleared before draining: a wake-up after the drain is kept.
        guard.clear_ready();
    }
    let rb = ring.fd.get_mut();
    while out.len() - before < MAX_BATCH {
        match rb.next() {
            Some(item) => out.extend(Event::from_bytes(&item)),
            None => break,
        }
    }
    // A full batch comes straight back for more, without waiting.
    ring.backlog = out.len() - before == MAX_BATCH;
    Ok(out.len() - before)
}
