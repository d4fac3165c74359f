//! Learning the labels of containers whose runtime does not pass them to the
//! CNI plugin (podman 4 sends none). The endpoint is created with the
//! reserved `init` identity; this task asks the runtime for the labels after
//! the ADD has returned — asking during the ADD would wait on the container
//! lock the runtime holds for it — and then moves the endpoint to the
//! identity of its real labels.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::api::Shared;

/// How often pending endpoints are retried.
const INTERVAL: Duration = Duration::from_millis(500);
/// Limit of one `podman container inspect`.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After this long without labels, warn (and keep trying, less often).
const PATIENCE: Duration = Duration::from_secs(60);

/// Asks podman for a container's labels (`{}` when it has none).
pub async fn podman_labels(container: &str) -> Result<BTreeMap<String, String>, String> {
    let podman = std::env::var("CILIA_PODMAN").unwrap_or_else(|_| "podman".into());
    let mut cmd = tokio::process::Command::new(&podman);
    cmd.args([
        "container",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        container,
    ])
    .kill_on_drop(true);
    let out = tokio::time::timeout(INSPECT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{podman} container inspect {container}: timed out"))?
        .map_err(|e| format!("cannot run {podman}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{podman} container inspect {container}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let labels: Option<BTreeMap<String, String>> = serde_json::from_str(text.trim())
        .map_err(|e| format!("{podman} container inspect {container}: unexpected output: {e}"))?;
    Ok(labels.unwrap_or_default())
}

/// Keeps resolving pending labels until the agent stops.
pub async fn learn_labels(state: Shared) {
    let mut first_try: HashMap<u16, Instant> = HashMap::new();
    let mut warned: HashMap<u16, bool> = HashMap::new();
    loop {
        tokio::time::sleep(INTERVAL).await;
        let s = state.clone();
        let pending = match tokio::task::spawn_blocking(move || {
            s.manager
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pending_labels()
        })
        .await
        {
            Ok(Ok(p)) => p,
            _ => continue,
        };
        first_try.retain(|id, _| pending.iter().any(|(p, _, _)| p == id));
        for (id, source, container) in pending {
            let started = *first_try.entry(id).or_insert_with(Instant::now);
            let result = match source.as_str() {
                "podman" => podman_labels(&container).await,
                other => Err(format!("unknown label source {other}")),
            };
            match result {
                Ok(labels) => {
                    let s = state.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        s.manager
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .set_labels(id, &labels)
                    })
                    .await;
                    match done {
                        Ok(Ok(rec)) => debug!(id, identity = rec.identity, "labels learned"),
                        Ok(Err(e)) => warn!(id, error = %e, "cannot apply learned labels"),
                        Err(e) => warn!(id, error = %e, "label task failed"),
                    }
                }
                Err(e) if started.elapsed() > PATIENCE => {
                    if !warned.insert(id, true).unwrap_or(false) {
                        warn!(id, error = %e, "labels still unknown; endpoint keeps the init identity");
                    }
                }
                Err(e) => debug!(id, error = %e, "labels not available yet"),
            }
        }
    }
}
