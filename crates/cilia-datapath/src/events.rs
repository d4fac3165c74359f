//! Async reading of the datapath's event ring buffer, so the agent gets
//! decoded [`Event`]s without touching aya.
//!
//! The kernel wakes a ring's reader when an event lands in an empty ring:
//! an irq_work whose self-IPI runs on the CPU that carries the packet (a
//! VM exit on a virtual machine), then the reader's own wake-up, once per
//! drained batch. Under a steady stream of new connections that was 0.35 µs
//! of every connection's BPF time (docs/benchmarks.md, "The event ring's
//! wake-up off the packet path"). So the reader has two modes: while events
//! flow it *polls*, draining every [`BATCH_DELAY`], and tells the datapath
//! that no event need wake it (`event_wakeup` 0 in the config map); once a
//! poll finds the ring empty it asks for wake-ups again, looks once more
//! (an event submitted before the datapath saw the request woke nobody)
//! and sleeps until woken. An idle agent thus wakes for nothing, and a busy
//! one costs the packet path no wake-up at all.

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

/// Turns the datapath's wake-ups of the reader on (`true`) or off.
pub type WakeupSwitch = Box<dyn Fn(bool) -> Result<(), DatapathError> + Send + Sync>;

/// The single reader of `cilia_events` (or of the events a
/// [`crate::fake::FakeDatapath`] is sent).
pub struct EventReader {
    source: Source,
}

struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
    /// The last drain stopped at `MAX_BATCH` with events left.
    backlog: bool,
    /// Polling: the last poll found events, and the datapath wakes nobody.
    polling: bool,
    wakeup: WakeupSwitch,
}

enum Source {
    Ring(Box<RingReader>),
    Channel(UnboundedReceiver<Event>),
}

impl EventReader {
    /// Must be called inside a tokio runtime. `wakeup` switches the
    /// datapath's wake-ups of this reader; they start on.
    pub fn new(ring: RingBuf<MapData>, wakeup: WakeupSwitch) -> Result<Self, DatapathError> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the RingBuf (now owned by the AsyncFd)
        // lives.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| DatapathError::io("polling the event ring buffer", e.into()))?;
        wakeup(true)?;
        Ok(Self {
            source: Source::Ring(Box::new(RingReader {
                fd,
                backlog: false,
                polling: false,
                wakeup,
            })),
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
    if ring.backlog {
        // A full batch comes straight back for more, without waiting.
    } else if ring.polling {
        tokio::time::sleep(BATCH_DELAY).await;
    } else {
        // No wake-up within `timeout`: the ring is looked at anyway (below).
        // An event submitted by a program that read the switch just before
        // it turned on woke nobody, and in a ring that is no longer empty
        // no later event wakes anyone either.
        if let Ok(guard) = tokio::time::timeout(timeout, ring.fd.readable_mut()).await {
            // Woken by the first event in an empty ring: poll from now on,
            // and let a batch gather before draining.
            let mut guard = guard.map_err(|e| DatapathError::io("waiting for events", e))?;
            // (The guard holds `fd`: the other fields one by one.)
            (ring.wakeup)(false)?;
            ring.polling = true;
            tokio::time::sleep(BATCH_DELAY).await;
            // Cleared before draining: a wake-up after the drain is kept.
            guard.clear_ready();
        }
    }
    drain(ring.fd.get_mut(), out, before);
    let found = out.len() - before;
    if found > 0 && !ring.polling {
        ring.set_polling(true)?;
    } else if found == 0 && ring.polling {
        // A poll found nothing: wake-ups on before sleeping, then a last
        // look for an event submitted while they were off.
        ring.set_polling(false)?;
        drain(ring.fd.get_mut(), out, before);
    }
    ring.backlog = out.len() - before == MAX_BATCH;
    Ok(out.len() - before)
}

impl RingReader {
    /// Polling: the datapath wakes nobody. Not polling: an event in an
    /// empty ring wakes the reader.
    fn set_polling(&mut self, polling: bool) -> Result<(), DatapathError> {
        (self.wakeup)(!polling)?;
        self.polling = polling;
        Ok(())
    }
}

/// Appends what the ring holds to `out`, up to `MAX_BATCH` past `before`.
fn drain(rb: &mut RingBuf<MapData>, out: &mut Vec<Event>, before: usize) {
    while out.len() - before < MAX_BATCH {
        match rb.next() {
            Some(item) => out.extend(Event::from_bytes(&item)),
            None => break,
        }
    }
}
