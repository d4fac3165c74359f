//! Background specialization: a new endpoint is attached to the generic
//! program at once (see `cilia_datapath`'s `generic` module) and enforced
//! from its first packet; its specialized programs, which run only the code
//! it needs and are faster per packet, are verified here afterwards, one at
//! a time and at a lower CPU priority than the ADDs, and swapped into its
//! links. The CNI ADD never waits for the verifier.
//!
//! The worker checks twice that the endpoint is still the one it loaded
//! for: before loading (ready, still on another program) and, under the
//! endpoints' lock, before swapping (same record, same configuration). A
//! relabel or a delete meanwhile wins: the relabel attached a specialized
//! build of its own; a deleted endpoint has nothing to swap into. A
//! specialized build the verifier rejects leaves the endpoint on the
//! generic program, which enforces the same policy; it is logged and shown
//! by `cilia status`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};

use cilia_api::EndpointState;
use tracing::{debug, warn};

use super::{config_of, EndpointManager};

/// The handle new endpoints are queued through.
#[derive(Clone)]
pub struct Specializer {
    tx: mpsc::Sender<u16>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Queued or in progress.
    pending: AtomicUsize,
    /// Endpoints left on the generic program, with the reason.
    failed: Mutex<BTreeMap<u16, String>>,
    /// Why the generic program is not used (`None`: it is, or not yet known).
    unavailable: Mutex<Option<String>>,
}

/// What `cilia status` shows of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecializerStatus {
    pub pending: usize,
    pub failed: BTreeMap<u16, String>,
    pub generic_unavailable: Option<String>,
}

impl Specializer {
    /// Queues endpoint `id`, just attached to the generic program.
    pub fn queue(&self, id: u16) {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(id).is_err() {
            // The worker is gone (agent shutting down): the next agent's
            // restore specializes it.
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn status(&self) -> SpecializerStatus {
        SpecializerStatus {
            pending: self.shared.pending.load(Ordering::SeqCst),
            failed: lock(&self.shared.failed).clone(),
            generic_unavailable: lock(&self.shared.unavailable).clone(),
        }
    }

    /// Records that the generic program cannot be used (creates then load
    /// the specialized build themselves).
    pub(crate) fn set_unavailable(&self, reason: String) {
        *lock(&self.shared.unavailable) = Some(reason);
    }

    pub(crate) fn generic_usable(&self) -> bool {
        lock(&self.shared.unavailable).is_none()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the worker for the endpoints `endpoints(owner)` holds; it ends
/// when `owner` is dropped. It first loads the generic program, so that
/// the first create does not pay for its verification.
pub fn start<S: Send + Sync + 'static>(
    owner: Weak<S>,
    endpoints: fn(&S) -> &Mutex<EndpointManager>,
) -> Specializer {
    let (tx, rx) = mpsc::channel::<u16>();
    let spec = Specializer {
        tx,
        shared: Arc::new(Shared::default()),
    };
    let worker = spec.clone();
    let spawned = std::thread::Builder::new()
        .name("specialize".into())
        .spawn(move || {
            lower_priority();
            if let Some(owner) = owner.upgrade() {
                let dp = lock(endpoints(&owner)).datapath.clone();
                if let Err(e) = dp.prepare_generic() {
                    worker.set_unavailable(e.to_string());
                }
                // The generic load's ELF, the kernel's BTF and the
                // relocation buffers are freed: the last of start-up's
                // transient memory, handed back now rather than at the
                // first GC tick (an idle agent's RSS, 2 MiB here).
                crate::trim_allocator();
            }
            while let Ok(id) = rx.recv() {
                let Some(owner) = owner.upgrade() else { break };
                specialize(endpoints(&owner), id, &worker);
                if worker.shared.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    // The queue drained: each load's ELF, BTF and
                    // relocation buffers are freed by now.
                    crate::trim_allocator();
                }
            }
        });
    if let Err(e) = spawned {
        spec.set_unavailable(format!("cannot start the specializing thread: {e}"));
    }
    spec
}

/// Nice 10 for this thread: the verifier's CPU goes to ADDs first.
fn lower_priority() {
    // SAFETY: setpriority on this thread's own id, no memory involved.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        debug!(error = %std::io::Error::last_os_error(), "cannot lower the specializing thread's priority");
    }
}

fn specialize(endpoints: &Mutex<EndpointManager>, id: u16, spec: &Specializer) {
    let (config, ifname, dp, loads) = {
        let m = lock(endpoints);
        let Ok(rec) = m.get(id) else { return };
        if rec.state != EndpointState::Ready {
            return;
        }
        let Some(ifindex) = m.netdev.ifindex(&rec.host_ifname) else {
            return;
        };
        (
            config_of(&rec, ifindex),
            rec.host_ifname.clone(),
            m.datapath.clone(),
            m.loads.clone(),
        )
    };
    // Outside the endpoints' lock: the first check after the agent starts
    // verifies a build to learn its program tags (~1 s here), and every ADD
    // would wait for it. A change meanwhile is caught by the check under
    // the lock below.
    match dp.check_links(&config) {
        // Detached, or already specialized (a relabel did it).
        Ok(None) => return,
        Ok(Some(links)) if all_specialized(&links) => return,
        _ => {}
    }
    let loaded = {
        let _slot = loads.acquire();
        dp.load_endpoint(&config)
    };
    let m = lock(endpoints);
    match m.get(id) {
        Ok(rec)
            if rec.state == EndpointState::Ready && config_of(&rec, config.ifindex) == config => {}
        _ => return,
    }
    // A reload or a relabel may have specialized it meanwhile: then its
    // programs stay as they are.
    if specialized(&m, &config) {
        return;
    }
    match loaded.and_then(|l| dp.attach_endpoint(l, &ifname)) {
        Ok(()) => {
            lock(&spec.shared.failed).remove(&id);
            debug!(id, "endpoint specialized");
        }
        Err(e) => {
            warn!(id, error = %e, "cannot specialize the endpoint's programs; it stays on the generic program");
            lock(&spec.shared.failed).insert(id, e.to_string());
        }
    }
}

/// Whether the endpoint's links already hold this build's programs
/// specialized for `config`.
fn specialized(m: &EndpointManager, config: &cilia_abi::EndpointConfig) -> bool {
    matches!(m.dp().check_links(config), Ok(Some(links)) if all_specialized(&links))
}

fn all_specialized(links: &[cilia_datapath::LinkCheck]) -> bool {
    links.iter().all(|l| l.config_matches && l.build_matches)
}
