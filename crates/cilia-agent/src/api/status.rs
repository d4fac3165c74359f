//! What an operator or a probe asks first: is the agent serving, and how
//! are its endpoints, policy, monitor, conntrack and maps doing (`/v1/status`,
//! `/v1/healthz`). Reads only: the store, a metrics scrape and the published
//! policy summary, never a subsystem's lock.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cilia_api::{EndpointState, IpamStatus, KernelFeature, PoolStatus, Status};

use super::{with_store, AppError, Shared};
use crate::ipam::Pool;
use crate::policy::repository::PolicySummary;
use crate::store::EndpointRecord;

/// How new endpoints get their programs (fast attach, see
/// `endpoint::specialize`).
fn programs_subsystem(
    spec: Option<&crate::endpoint::specialize::Specializer>,
) -> cilia_api::SubsystemStatus {
    let (status, detail, errors) = match spec.map(|s| s.status()) {
        None => (
            "ok",
            "fast attach off: creates wait for their specialized programs".to_string(),
            Vec::new(),
        ),
        Some(st) => {
            let errors: Vec<String> = st
                .failed
                .iter()
                .map(|(id, e)| format!("endpoint {id} stays on the generic program: {e}"))
                .collect();
            match &st.generic_unavailable {
                Some(reason) => (
                    "degraded",
                    format!(
                        "fast attach unavailable ({reason}): creates wait for their \
                         specialized programs"
                    ),
                    errors,
                ),
                None => (
                    if errors.is_empty() { "ok" } else { "degraded" },
                    format!(
                        "fast attach: generic program first, {} endpoint(s) awaiting \
                         specialization",
                        st.pending
                    ),
                    errors,
                ),
            }
        }
    };
    cilia_api::SubsystemStatus {
        name: "endpoint-programs".into(),
        status: status.into(),
        detail,
        errors,
    }
}

fn pool_status(pool: &Pool, used: &std::collections::BTreeSet<std::net::IpAddr>) -> PoolStatus {
    PoolStatus {
        range: pool.range().to_string(),
        router: pool.router().to_string(),
        used: pool.used(used),
        capacity: pool.capacity(),
    }
}

#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = Status)))]
pub(super) async fn status(State(state): State<Shared>) -> Result<Json<Status>, AppError> {
    let features = state.features.clone();
    let (state_dir, bpf_root) = (state.state_dir.clone(), state.bpf_root.clone());
    let monitor_level = state.monitor.wanted_level();
    let flows = (state.monitor.buffered(), state.monitor.aggregated());
    let s = state.clone();
    let snap =
        tokio::task::spawn_blocking(move || crate::metrics::scrape(&s.store, s.datapath.as_ref()))
            .await
            .map_err(|e| {
                AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
    let summary = state.policy_summary.borrow().clone();
    let pools = state.pools.clone();
    let ct_runs = (
        state.metrics.ct_gc_runs.get(),
        state.metrics.ct_gc_early.get(),
        state.metrics.ct_gc_closed_early.get(),
    );
    let ct_gc_error = state
        .metrics
        .ct_gc_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let s = state.clone();
    let ct_use = tokio::task::spawn_blocking(move || s.datapath.ct_budget_use())
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let proxy = state.proxy.borrow().describe(state.proxy_port);
    // Map and link reads block: off the async workers, like the scrape.
    let s = state.clone();
    let socket_lb = tokio::task::spawn_blocking(move || {
        let (links, served) = match &s.socket_lb {
            crate::socklb::SocketLbState::On { .. } => (
                s.datapath.socket_lb_links().ok().flatten(),
                s.datapath.lb_netns().ok().map(|n| n.len()),
            ),
            _ => (None, None),
        };
        s.socket_lb.subsystem(links, served)
    })
    .await
    .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let prefilter = state.prefilter.clone();
    let programs = programs_subsystem(state.specializer.get());
    let endpoints_generic = state
        .specializer
        .get()
        .map(|s| {
            let st = s.status();
            st.pending + st.failed.len()
        })
        .unwrap_or(0);
    let lb_acceleration = state.lb_acceleration.subsystem();
    let kubernetes = match &state.k8s {
        Some(view) => view.subsystem(),
        None => cilia_api::SubsystemStatus {
            name: "kubernetes".into(),
            status: "off".into(),
            detail: "not configured (--k8s-kubeconfig, --k8s-in-cluster)".into(),
            errors: Vec::new(),
        },
    };
    let cluster_subs = match &state.multinode {
        Some(link) => link.subsystems(),
        None => vec![cilia_api::SubsystemStatus {
            name: "kvstore".into(),
            status: "ok".into(),
            detail: "embedded (one node)".into(),
            errors: Vec::new(),
        }],
    };
    with_store(&state, move |store| {
        // A store read: on the blocking pool, like the others here.
        let prefilter_sub = {
            let (ok, detail) = prefilter.status();
            cilia_api::SubsystemStatus {
                name: "prefilter".into(),
                status: if ok { "ok" } else { "degraded" }.into(),
                detail,
                errors: Vec::new(),
            }
        };
        let endpoints = store.endpoints()?;
        let used = store.allocated()?;
        let not_ready = endpoints
            .iter()
            // One being deleted is going, not failing.
            .filter(|e| !matches!(e.state, EndpointState::Ready | EndpointState::Deleting))
            .count();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            health: if not_ready == 0 { "ok" } else { "degraded" }.into(),
            kernel: features.kernel.clone(),
            features: features
                .features
                .iter()
                .map(|f| KernelFeature {
                    name: f.name.into(),
                    present: f.present,
                    required: f.required,
                    detail: f.detail.clone(),
                })
                .collect(),
            endpoints: endpoints.len(),
            endpoints_not_ready: not_ready,
            endpoints_generic,
            ipam: IpamStatus {
                ipv6: pool_status(&pools.v6, &used),
                ipv4: pools.v4.as_ref().map(|p| pool_status(p, &used)),
            },
            state_dir,
            bpf_root,
            policy_revision: store.policy_revision()?,
            policies: summary.documents,
            policy_errors: summary.errors.clone(),
            subsystems: cluster_subs
                .into_iter()
                .chain([
                    socket_lb,
                    prefilter_sub,
                    programs,
                    lb_acceleration,
                    kubernetes,
                ])
                .fold(
                    subsystems(
                        &summary,
                        conntrack_subsystem(ct_runs, ct_use, ct_gc_error, snap.conntrack_entries),
                        &endpoints,
                        &snap,
                        monitor_level,
                        flows,
                        proxy,
                    ),
                    |mut v, extra| {
                        v.push(extra);
                        v
                    },
                ),
            maps: snap
                .map_fill
                .iter()
                .map(|(map, entries, capacity)| cilia_api::MapPressure {
                    map: map.clone(),
                    entries: *entries,
                    capacity: *capacity,
                })
                .collect(),
        })
    })
    .await
    .map(Json)
}

/// The `conntrack` subsystem: the GC's work, and the endpoints near or at
/// their budget by the datapath's counts now (at the budget, an
/// endpoint's new flows are dropped: degraded). `runs`: GC runs, early
/// ones, ended connections' entries collected early.
fn conntrack_subsystem(
    (runs, early, closed_early): (u64, u64, u64),
    used: Result<cilia_datapath::CtBudgetUse, cilia_datapath::DatapathError>,
    gc_error: Option<String>,
    live: u64,
) -> cilia_api::SubsystemStatus {
    let mut detail = format!(
        "{live} live entries at the last GC; {runs} GC runs ({early} early, near an \
         endpoint's budget; {closed_early} entries of ended connections collected early)"
    );
    let mut errors = Vec::new();
    if let Some(e) = gc_error {
        errors.push(format!(
            "the last conntrack GC failed ({e}): expired entries stay and budgets are not \
             given back until one succeeds"
        ));
    }
    match used {
        Ok(used) => {
            let who = |id: u16| {
                if id == 0 {
                    "flows charged to no endpoint".to_string()
                } else {
                    format!("endpoint {id}")
                }
            };
            let near: Vec<String> = used
                .held
                .iter()
                .filter(|(_, n)| **n < used.budget && **n >= used.budget - used.budget / 4)
                .map(|(id, n)| format!("{} ({n})", who(*id)))
                .collect();
            detail.push_str(&format!("; budget {} entries per endpoint", used.budget));
            if !near.is_empty() {
                detail.push_str(&format!("; past three quarters of it: {}", near.join(", ")));
            }
            errors.extend(
                used.held
                    .iter()
                    .filter(|(_, n)| **n >= used.budget)
                    .map(|(id, n)| {
                        format!(
                            "{} holds {n} conntrack entries, its whole budget: its new flows are \
                             dropped (Endpoint conntrack budget exhausted) until some end \
                             (--ct-budget)",
                            who(*id)
                        )
                    }),
            );
        }
        Err(e) => errors.push(format!("reading the conntrack budget counts: {e}")),
    }
    cilia_api::SubsystemStatus {
        name: "conntrack".into(),
        status: if errors.is_empty() { "ok" } else { "degraded" }.into(),
        detail,
        errors,
    }
}

fn subsystems(
    policy: &PolicySummary,
    conntrack: cilia_api::SubsystemStatus,
    endpoints: &[EndpointRecord],
    snap: &crate::metrics::Snapshot,
    monitor_level: u32,
    (flows, aggregated): (usize, u64),
    proxy: (bool, String),
) -> Vec<cilia_api::SubsystemStatus> {
    let sub =
        |name: &str, ok: bool, detail: String, errors: Vec<String>| cilia_api::SubsystemStatus {
            name: name.into(),
            status: if ok { "ok" } else { "degraded" }.into(),
            detail,
            errors,
        };
    let not_ready: Vec<String> = endpoints
        .iter()
        // One being deleted is going, not failing.
        .filter(|e| !matches!(e.state, EndpointState::Ready | EndpointState::Deleting))
        .map(|e| {
            format!(
                "endpoint {}: {}",
                e.id,
                e.reason.as_deref().unwrap_or("not ready")
            )
        })
        .collect();
    let pending = endpoints
        .iter()
        .filter(|e| e.label_source.is_some())
        .count();
    let lost: u64 = snap
        .datapath
        .iter()
        .filter(|(kind, ..)| *kind == cilia_abi::CILIA_METRIC_LOST)
        .map(|(_, _, _, packets, _)| packets)
        .sum();
    let full: Vec<String> = snap
        .map_fill
        .iter()
        .filter(|(_, e, c)| *c > 0 && *e * 10 >= *c * 9)
        .map(|(m, e, c)| format!("map {m} is {e}/{c} full"))
        .collect();
    let level = match monitor_level {
        cilia_abi::CILIA_MONITOR_OFF => "off",
        cilia_abi::CILIA_MONITOR_DROPS => "drops and policy verdicts",
        _ => "drops, policy verdicts and traces",
    };
    vec![
        sub(
            "endpoints",
            not_ready.is_empty(),
            format!(
                "{} endpoints, {} not ready",
                endpoints.len(),
                not_ready.len()
            ),
            not_ready,
        ),
        sub(
            "policy",
            policy.errors.is_empty(),
            format!(
                "{} policies, revision {}",
                policy.documents, snap.policy_revision
            ),
            policy.errors.clone(),
        ),
        sub(
            "labels",
            true,
            format!("{pending} endpoints waiting for runtime labels (init identity)"),
            vec![],
        ),
        sub(
            "monitor",
            lost == 0,
            format!(
                "events: {level}; {flows} flows buffered; {lost} events lost; \
                 {aggregated} events aggregated into summary flows"
            ),
            vec![],
        ),
        conntrack,
        sub(
            "bpf-maps",
            full.is_empty(),
            format!("{} maps", snap.map_fill.len()),
            full,
        ),
        sub("l7-proxy", proxy.0, proxy.1, vec![]),
    ]
}

#[utoipa::path(get, path = "/v1/healthz", responses((status = 200, description = "agent is serving")))]
pub(super) async fn healthz() -> &'static str {
    "ok"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_use(held: &[(u16, u32)]) -> cilia_datapath::CtBudgetUse {
        cilia_datapath::CtBudgetUse {
            budget: 32768,
            held: held.iter().copied().collect(),
        }
    }

    #[test]
    fn conntrack_names_endpoints_near_their_budget_and_degrades_at_it() {
        let ok = conntrack_subsystem((7, 2, 900), Ok(budget_use(&[(3, 100)])), None, 40);
        assert_eq!(ok.status, "ok");
        assert!(ok.errors.is_empty());
        assert!(ok.detail.contains("7 GC runs (2 early"), "{}", ok.detail);
        assert!(ok.detail.contains("900 entries of ended"), "{}", ok.detail);
        assert!(!ok.detail.contains("three quarters"), "{}", ok.detail);

        let near = conntrack_subsystem(
            (7, 2, 0),
            Ok(budget_use(&[(0, 24576), (3, 24575), (4, 30000)])),
            None,
            0,
        );
        assert_eq!(near.status, "ok");
        assert!(
            near.detail.contains(
                "past three quarters of it: flows charged to no endpoint (24576), endpoint 4 (30000)"
            ),
            "{}",
            near.detail
        );

        let full = conntrack_subsystem((7, 2, 0), Ok(budget_use(&[(4, 32768), (5, 1)])), None, 0);
        assert_eq!(full.status, "degraded");
        assert_eq!(full.errors.len(), 1);
        assert!(
            full.errors[0].starts_with("endpoint 4 holds 32768"),
            "{:?}",
            full.errors
        );

        let unread = conntrack_subsystem(
            (7, 2, 0),
            Err(cilia_datapath::DatapathError::NotAttached {
                endpoint_id: 1,
                pin: "/x".into(),
            }),
            None,
            0,
        );
        assert_eq!(unread.status, "degraded");

        let failing = conntrack_subsystem(
            (7, 2, 0),
            Ok(budget_use(&[])),
            Some("map cilia_ct: bpf_map_lookup_batch failed".into()),
            0,
        );
        assert_eq!(failing.status, "degraded");
        assert!(
            failing.errors[0].starts_with("the last conntrack GC failed (map cilia_ct"),
            "{:?}",
            failing.errors
        );
    }
}
