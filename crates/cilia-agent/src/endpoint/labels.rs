//! Learning the labels of containers whose runtime does not pass them to the
//! CNI plugin (podman 4 sends none). The endpoint is created with the
//! reserved `init` identity; this task asks the runtime for the labels after
//! the ADD has returned — asking during the ADD would wait on the container
//! lock the runtime holds for it — and then moves the endpoint to the
//! identity of its real labels.
//!
//! Labels are identity, so only the container's *own* labels count:
//! * podman's `Config.Labels` merges the image's labels into the ones given
//!   at `run`/`create`. A key whose value equals the image's label of that key
//!   is the image's, unless the container's create command set it explicitly
//!   (`--label k=v`, `-l k=v`); the image's author does not choose identity.
//!   Limit: a label from `--label-file`, or from a client that creates
//!   containers through podman's API (no create command recorded), with the
//!   same value as the image's is taken for the image's and dropped.
//! * Reserved keys and invalid labels are dropped and reported once.
//! * Labels are applied only to the endpoint (id and container id) they were
//!   learned for, and only while it still waits for them.
//! * A container whose labels cannot be applied (more than
//!   [`cilia_api::labels::MAX_LABELS`], say) is reported once and keeps the
//!   `init` identity; it is not retried until the agent restarts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use cilia_api::labels::{reserved_key_reason, validate_key, validate_value, MAX_LABELS};
use cilia_api::limits::excerpt;
use tracing::{debug, warn};

use crate::api::Shared;

/// How often pending endpoints are retried.
const INTERVAL: Duration = Duration::from_millis(500);
/// Limit of one `podman … inspect`.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After this long without labels, warn (and keep trying, less often).
const PATIENCE: Duration = Duration::from_secs(60);
/// How many refused labels one report names.
const REPORTED_LABELS: usize = 3;

/// The labels explicitly given in a podman create/run command line.
fn explicit_labels(create_command: &[String]) -> HashSet<(String, String)> {
    let mut out = HashSet::new();
    let mut args = create_command.iter();
    while let Some(arg) = args.next() {
        let given = match arg.as_str() {
            "--label" | "-l" => args.next().map(String::as_str),
            other => other
                .strip_prefix("--label=")
                .or_else(|| other.strip_prefix("-l=")),
        };
        if let Some(kv) = given {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            out.insert((k.to_string(), v.to_string()));
        }
    }
    out
}

/// A container's own labels: `merged` (podman's `Config.Labels`) without the
/// entries that come from the image, unless the create command set them.
pub fn own_labels(
    merged: &BTreeMap<String, String>,
    image: &BTreeMap<String, String>,
    create_command: &[String],
) -> BTreeMap<String, String> {
    let explicit = explicit_labels(create_command);
    merged
        .iter()
        .filter(|(k, v)| {
            image.get(*k) != Some(*v) || explicit.contains(&((*k).clone(), (*v).clone()))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Splits learned labels into those an endpoint may carry and a one-line
/// description of each refused one (reserved key or invalid syntax).
pub fn screen_labels(labels: BTreeMap<String, String>) -> (BTreeMap<String, String>, Vec<String>) {
    let mut usable = BTreeMap::new();
    let mut refused = Vec::new();
    for (k, v) in labels {
        let why = reserved_key_reason(&k)
            .or_else(|| validate_key(&k).err())
            .or_else(|| validate_value(&v).err());
        match why {
            Some(reason) => refused.push(format!("{}: {reason}", excerpt(&format!("{k}={v}")))),
            None => {
                usable.insert(k, v);
            }
        }
    }
    (usable, refused)
}

/// Runs `podman <args>` and parses its output as JSON.
async fn podman_json<T: serde::de::DeserializeOwned>(
    podman: &str,
    args: &[&str],
) -> Result<T, String> {
    let what = format!("{podman} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new(podman);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(INSPECT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{what}: timed out"))?
        .map_err(|e| format!("cannot run {podman}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{what}: {}", excerpt(stderr.trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| format!("{what}: unexpected output: {e}"))
}

/// What `podman container inspect` says about a container's labels.
#[derive(serde::Deserialize)]
struct ContainerLabels {
    labels: Option<BTreeMap<String, String>>,
    image: String,
    create_command: Option<Vec<String>>,
}

/// Asks podman (the binary `podman`) for a container's own labels (`{}`
/// when it has none); see the module docs for what counts as its own.
pub async fn podman_labels(
    podman: &str,
    container: &str,
) -> Result<BTreeMap<String, String>, String> {
    let c: ContainerLabels = podman_json(
        podman,
        &[
            "container",
            "inspect",
            "--format",
            r#"{"labels":{{json .Config.Labels}},"image":{{json .Image}},"create_command":{{json .Config.CreateCommand}}}"#,
            container,
        ],
    )
    .await?;
    let merged = c.labels.unwrap_or_default();
    // No labels, or no image to have brought any (`podman run --rootfs`).
    if merged.is_empty() || c.image.is_empty() {
        return Ok(merged);
    }
    let image: Option<BTreeMap<String, String>> = podman_json(
        podman,
        &["image", "inspect", "--format", "{{json .Labels}}", &c.image],
    )
    .await?;
    Ok(own_labels(
        &merged,
        &image.unwrap_or_default(),
        &c.create_command.unwrap_or_default(),
    ))
}

/// Keeps resolving pending labels until the agent stops.
pub async fn learn_labels(state: Shared) {
    let podman = std::env::var("CILIA_PODMAN").unwrap_or_else(|_| "podman".into());
    // Keyed by (endpoint id, container id): an id reused by another container
    // starts afresh.
    let mut first_try: HashMap<(u16, String), Instant> = HashMap::new();
    let mut warned: HashSet<(u16, String)> = HashSet::new();
    let mut given_up: HashSet<(u16, String)> = HashSet::new();
    loop {
        tokio::time::sleep(INTERVAL).await;
        let s = state.clone();
        let pending =
            match tokio::task::spawn_blocking(move || crate::endpoint::pending_labels(&s.store))
                .await
            {
                Ok(Ok(p)) => p,
                _ => continue,
            };
        let keys: HashSet<(u16, String)> =
            pending.iter().map(|(id, _, c)| (*id, c.clone())).collect();
        first_try.retain(|k, _| keys.contains(k));
        warned.retain(|k| keys.contains(k));
        given_up.retain(|k| keys.contains(k));
        for (id, source, container) in pending {
            let key = (id, container.clone());
            if given_up.contains(&key) {
                continue;
            }
            let started = *first_try.entry(key.clone()).or_insert_with(Instant::now);
            let result = match source.as_str() {
                "podman" => podman_labels(&podman, &container).await,
                other => Err(format!("unknown label source {other}")),
            };
            let labels = match result {
                Ok(labels) => labels,
                Err(e) if started.elapsed() > PATIENCE => {
                    if warned.insert(key) {
                        warn!(id, container = %container, error = %e, "labels still unknown; endpoint keeps the init identity");
                    }
                    continue;
                }
                Err(e) => {
                    debug!(id, error = %e, "labels not available yet");
                    continue;
                }
            };
            let (usable, refused) = screen_labels(labels);
            if !refused.is_empty() {
                let shown: Vec<&str> = refused
                    .iter()
                    .take(REPORTED_LABELS)
                    .map(String::as_str)
                    .collect();
                warn!(id, container = %container, refused = refused.len(), first = %shown.join("; "), "ignoring container labels an endpoint may not carry");
            }
            if usable.len() > MAX_LABELS {
                warn!(id, container = %container, labels = usable.len(), "container has more than {MAX_LABELS} labels (MAX_LABELS); endpoint keeps the init identity");
                given_up.insert(key);
                continue;
            }
            let s = state.clone();
            let c = container.clone();
            let done = tokio::task::spawn_blocking(move || {
                s.endpoints
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .set_learned_labels(id, &c, &usable)
            })
            .await;
            match done {
                Ok(Ok(Some(rec))) => debug!(id, identity = rec.identity, "labels learned"),
                Ok(Ok(None)) => {
                    debug!(id, container = %container, "endpoint changed meanwhile; labels not applied")
                }
                Ok(Err(e)) => {
                    warn!(id, container = %container, error = %e, "cannot apply learned labels; endpoint keeps the init identity");
                    given_up.insert(key);
                }
                Err(e) => warn!(id, error = %e, "label task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn image_labels_are_not_the_containers_own() {
        let merged = map(&[("app", "web"), ("maintainer", "someone"), ("role", "admin")]);
        let image = map(&[("maintainer", "someone"), ("role", "admin")]);
        let own = own_labels(&merged, &image, &argv("podman run -l app=web img"));
        assert_eq!(own, map(&[("app", "web")]));
    }

    #[test]
    fn a_label_set_at_run_overrides_the_image_value_and_counts() {
        let merged = map(&[("role", "user")]);
        let image = map(&[("role", "admin")]);
        assert_eq!(own_labels(&merged, &image, &[]), map(&[("role", "user")]));
    }

    #[test]
    fn a_label_set_explicitly_to_the_image_value_counts() {
        let merged = map(&[("tier", "img"), ("app", "web"), ("x", "")]);
        let image = map(&[("tier", "img"), ("app", "web"), ("x", "")]);
        for cmd in [
            "podman create --label tier=img --label=app=web -l x img",
            "podman run -l tier=img -l=app=web --label x img",
        ] {
            let own = own_labels(&merged, &image, &argv(cmd));
            assert_eq!(own, merged, "{cmd}");
        }
        // Another value on the command line does not make the image's value explicit.
        let own = own_labels(&merged, &image, &argv("podman run --label tier=other img"));
        assert!(own.is_empty(), "{own:?}");
    }

    #[test]
    fn reserved_and_invalid_learned_labels_are_dropped_with_a_short_reason() {
        let learned = map(&[
            ("app", "web"),
            ("io.kubernetes.pod.namespace", "kube-system"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            ("bad key", "x"),
            ("huge", &"v".repeat(65536)),
        ]);
        let (usable, refused) = screen_labels(learned);
        assert_eq!(usable, map(&[("app", "web")]));
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused.iter().all(|r| r.len() < 400 && !r.contains('\n')));
        assert!(refused.iter().any(|r| r.contains("reserved")));
    }

    /// A stand-in for podman that answers the two inspect calls.
    fn fake_podman(dir: &std::path::Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("podman");
        std::fs::write(
            &path,
            r#"#!/bin/sh
case "$1 $2" in
  "container inspect") echo '{"labels":{"app":"web","role":"admin","io.kubernetes.pod.namespace":"kube-system"},"image":"sha256abc","create_command":["podman","run","-l","app=web","img"]}' ;;
  "image inspect") [ "$5" = sha256abc ] && echo '{"role":"admin","io.kubernetes.pod.namespace":"kube-system"}' ;;
  *) exit 1 ;;
esac
"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[tokio::test]
    async fn podman_labels_are_the_containers_own_without_image_labels() {
        let dir = tempfile::tempdir().unwrap();
        let podman = fake_podman(dir.path());
        let labels = podman_labels(&podman, "c1").await.unwrap();
        assert_eq!(labels, map(&[("app", "web")]));
    }
}
