//! The agent's Kubernetes source: the API server says which labels a pod's
//! endpoint carries, which labels a namespace gives its endpoints, and
//! which policies apply — instead of `podman inspect`, `cilia namespace
//! set` and `cilia policy import`. Nothing here is a second path into the
//! datapath: pods go through the endpoint relabel (conntrack purge, program
//! swap, policy regeneration), namespaces through the namespace labels,
//! policies through the policy repository's import and delete, so a change
//! from Kubernetes means what the same change from the CLI means.
//!
//! `cilia-k8s` owns the watching (list, watch, resume, relist, backoff) and
//! the translation; this module only starts it and applies what it yields.
//! A lost API server changes nothing here: the caches, the endpoints'
//! labels and the policies stay as they are until the watch resumes.
//!
//! The pod reconciliation is level-based: every endpoint naming a pod
//! (CNI ADD's `K8S_POD_*`) is compared with the pod cache on each pod
//! change and every [`RECONCILE`]; so an endpoint created before its pod
//! is known, or a pod known before its endpoint, meet either way.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cilia_k8s::config::K8sConfig;
use cilia_k8s::namespace::NamespaceLabels;
use cilia_k8s::pod::PodEndpoint;
use cilia_k8s::policy::{PolicyRefusal, PolicySource};
use cilia_k8s::status::Reported;
use cilia_k8s::watch::{Change, Phase, SyncStatus, WatchState};
use cilia_policy::PolicyKind;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::core::DynamicObject;
use kube::ResourceExt;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::api::AgentState;
use crate::store::EndpointRecord;

/// `label_source` of an endpoint whose labels come from its pod.
pub const LABEL_SOURCE: &str = "kubernetes";
/// How often endpoints naming a pod are compared with the pod cache.
const RECONCILE: Duration = Duration::from_millis(200);
/// Problems kept for `cilia status` (refused pods and policies, failed
/// status writes), newest last.
const KEPT_ERRORS: usize = 8;
/// The three policy kinds, in the order they are watched.
const POLICY_KINDS: [PolicyKind; 3] = [
    PolicyKind::NetworkPolicy,
    PolicyKind::CiliumNetworkPolicy,
    PolicyKind::CiliumClusterwideNetworkPolicy,
];

/// What `cilia status` shows of the Kubernetes connection.
pub struct K8sView {
    /// The API server's URL.
    pub server: String,
    /// This node's name (the pods' `spec.nodeName`).
    pub node: String,
    /// The server's `gitVersion`, once asked.
    version: watch::Receiver<Option<String>>,
    /// One per watched kind.
    kinds: Vec<watch::Receiver<SyncStatus>>,
    /// Refused objects and failed writes, newest last.
    errors: Mutex<VecDeque<String>>,
}

impl K8sView {
    fn note(&self, error: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.back() == Some(&error) {
            return;
        }
        errors.push_back(error);
        while errors.len() > KEPT_ERRORS {
            errors.pop_front();
        }
    }

    /// The sync status of every watched kind.
    pub fn kinds(&self) -> Vec<SyncStatus> {
        self.kinds.iter().map(|rx| rx.borrow().clone()).collect()
    }

    /// The `kubernetes` subsystem: ok when every kind has synced and is
    /// watching without error; the errors name the kind or the object.
    pub fn subsystem(&self) -> cilia_api::SubsystemStatus {
        let kinds = self.kinds();
        let version = self
            .version
            .borrow()
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let per_kind: Vec<String> = kinds
            .iter()
            .map(|k| {
                let phase = match k.phase {
                    Phase::Listing => "listing",
                    Phase::Watching => "watching",
                    Phase::Relisting => "relisting",
                    Phase::Backoff => "backoff",
                };
                let synced = if k.synced { "synced" } else { "not synced" };
                format!("{} {synced} {phase} {} objects", k.kind, k.objects)
            })
            .collect();
        let mut errors: Vec<String> = kinds
            .iter()
            .filter_map(|k| Some(format!("{}: {}", k.kind, k.last_error.as_ref()?)))
            .collect();
        let healthy =
            errors.is_empty() && kinds.iter().all(|k| k.synced && k.phase == Phase::Watching);
        errors.extend(
            self.errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        cilia_api::SubsystemStatus {
            name: "kubernetes".into(),
            status: if healthy { "ok" } else { "degraded" }.into(),
            detail: format!(
                "API server {} version {version}, node {}; {}",
                self.server,
                self.node,
                per_kind.join(", ")
            ),
            errors,
        }
    }
}

/// The changes of the five watches, for [`Watches::apply`].
struct Feeds {
    pods: mpsc::Receiver<Vec<Change<Pod>>>,
    namespaces: mpsc::Receiver<Vec<Change<Namespace>>>,
    policies: mpsc::Receiver<(PolicyKind, Vec<Change<DynamicObject>>)>,
}

/// The running watches: started before the agent serves, applied once its
/// state exists.
pub struct Watches {
    pub view: Arc<K8sView>,
    client: kube::Client,
    config: K8sConfig,
    feeds: Feeds,
}

fn status_channel(kind: &str) -> (watch::Sender<SyncStatus>, watch::Receiver<SyncStatus>) {
    watch::channel(WatchState::<Pod>::new(kind).status())
}

impl Watches {
    /// Builds the client and starts the five watches (no answer is waited
    /// for here: see [`Self::wait_synced`]).
    pub async fn start(config: &K8sConfig) -> anyhow::Result<Self> {
        let client_config = config.client_config().await?;
        let server = client_config.cluster_url.to_string();
        let client = kube::Client::try_from(client_config)
            .map_err(|e| cilia_k8s::K8sError::Client(e.to_string()))?;
        let mut kinds = Vec::new();

        let (pods_tx, pods) = mpsc::channel(16);
        let (tx, rx) = status_channel("pods");
        kinds.push(rx);
        tokio::spawn(cilia_k8s::client::run(
            Api::<Pod>::all(client.clone()),
            "pods",
            Some(format!("spec.nodeName={}", config.node_name)),
            pods_tx,
            tx,
        ));

        let (ns_tx, namespaces) = mpsc::channel(16);
        let (tx, rx) = status_channel("namespaces");
        kinds.push(rx);
        tokio::spawn(cilia_k8s::client::run(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            None,
            ns_tx,
            tx,
        ));

        let (policies_tx, policies) = mpsc::channel(16);
        for kind in POLICY_KINDS {
            let resource = cilia_k8s::policy::api_resource(kind);
            let (tx, rx) = status_channel(&resource.plural);
            kinds.push(rx);
            let (kind_tx, mut kind_rx) = mpsc::channel(16);
            tokio::spawn(cilia_k8s::client::run(
                Api::<DynamicObject>::all_with(client.clone(), &resource),
                plural(kind),
                None,
                kind_tx,
                tx,
            ));
            // One feed for the three kinds, each batch tagged with its kind.
            let all = policies_tx.clone();
            tokio::spawn(async move {
                while let Some(batch) = kind_rx.recv().await {
                    if all.send((kind, batch)).await.is_err() {
                        return;
                    }
                }
            });
        }

        let (version_tx, version) = watch::channel(None);
        let c = client.clone();
        tokio::spawn(async move {
            // Asked until answered: the version is shown, never needed.
            let mut delay = Duration::from_millis(200);
            loop {
                match c.apiserver_version().await {
                    Ok(info) => {
                        version_tx.send_replace(Some(info.git_version));
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "asking the API server's version"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        });
        info!(server = %server, node = %config.node_name, "watching Kubernetes");
        Ok(Self {
            view: Arc::new(K8sView {
                server,
                node: config.node_name.clone(),
                version,
                kinds,
                errors: Mutex::new(VecDeque::new()),
            }),
            client,
            config: config.clone(),
            feeds: Feeds {
                pods,
                namespaces,
                policies,
            },
        })
    }

    /// Starts applying the watches' changes to the agent, then waits until
    /// every kind has listed once and that list is applied (policies
    /// enforced, namespaces and pods known), up to the sync timeout; the
    /// error names each kind missing and its last error.
    pub async fn apply(self, state: Arc<AgentState>) -> anyhow::Result<()> {
        let timeout = self.config.sync_timeout;
        let started = tokio::time::Instant::now();
        let (applied_tx, mut applied) = watch::channel(false);
        let view = self.view.clone();
        let applier = Applier {
            state,
            view: self.view.clone(),
            client: self.client,
            config: self.config,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            policies: BTreeMap::new(),
            reported: Reported::default(),
            pod_failures: BTreeMap::new(),
        };
        tokio::spawn(applier.run(self.feeds, applied_tx));
        cilia_k8s::client::wait_synced(&view.kinds, timeout).await?;
        let rest = timeout.saturating_sub(started.elapsed());
        let done = tokio::time::timeout(rest, applied.wait_for(|a| *a)).await;
        if !matches!(done, Ok(Ok(_))) {
            anyhow::bail!(
                "Kubernetes: listed every kind but could not apply the lists within {}s",
                timeout.as_secs()
            );
        }
        info!("Kubernetes lists synced and applied");
        Ok(())
    }
}

/// The applier's own state: what it has applied, to tell changes apart.
struct Applier {
    state: Arc<AgentState>,
    view: Arc<K8sView>,
    client: kube::Client,
    config: K8sConfig,
    /// This node's pods by `namespace/name`.
    pods: BTreeMap<String, Result<PodEndpoint, String>>,
    /// Namespace labels as last applied.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Object uid → the key and document of the policy stored for it.
    policies: BTreeMap<String, (String, String)>,
    /// NetworkPolicy refusals already sent as Events.
    reported: Reported,
    /// Endpoint id → (pod resourceVersion, error) of a relabel that failed:
    /// not retried until the pod changes.
    pod_failures: BTreeMap<u16, (Option<String>, String)>,
}

impl Applier {
    async fn run(mut self, mut feeds: Feeds, applied: watch::Sender<bool>) {
        let mut tick = tokio::time::interval(RECONCILE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Synced on one tick, applied on the next: the lists' batches are
        // sent after the status says synced.
        let mut synced_seen = false;
        loop {
            tokio::select! {
                biased;
                Some(batch) = feeds.namespaces.recv() => self.namespaces_changed(batch).await,
                Some((kind, batch)) = feeds.policies.recv() => self.policies_changed(kind, batch).await,
                Some(batch) = feeds.pods.recv() => {
                    self.pods_changed(batch);
                    self.reconcile_pods().await;
                }
                _ = tick.tick() => {
                    self.reconcile_pods().await;
                    if !*applied.borrow() {
                        let all_synced = self.view.kinds().iter().all(|k| k.synced);
                        let drained = feeds.pods.is_empty()
                            && feeds.namespaces.is_empty()
                            && feeds.policies.is_empty();
                        if all_synced && drained && synced_seen {
                            self.prune_policies().await;
                            applied.send_replace(true);
                        }
                        synced_seen = all_synced;
                    }
                }
                else => return,
            }
        }
    }

    fn pods_changed(&mut self, batch: Vec<Change<Pod>>) {
        for change in batch {
            match change {
                Change::Upserted(pod) => {
                    let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                    let read = PodEndpoint::from_pod(&pod).map_err(|e| e.to_string());
                    if let Err(e) = &read {
                        warn!(error = %e, "pod refused: its endpoint keeps the init identity");
                        self.view.note(e.clone());
                    }
                    self.pods.insert(key, read);
                }
                Change::Deleted(pod) => {
                    let key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                    // Its endpoint keeps its labels until CNI DEL removes it.
                    self.pods.remove(&key);
                }
            }
        }
    }

    /// Gives every endpoint naming a known pod that pod's labels and port
    /// names, where they differ.
    async fn reconcile_pods(&mut self) {
        let store = self.state.store.clone();
        let records = match tokio::task::spawn_blocking(move || store.endpoints()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "reading the endpoints for the pod labels");
                return;
            }
            Err(_) => return,
        };
        let known: BTreeSet<u16> = records.iter().map(|r| r.id).collect();
        self.pod_failures.retain(|id, _| known.contains(id));
        for rec in records {
            let Some(pod_ref) = &rec.k8s_pod else {
                continue;
            };
            if rec.state != cilia_api::EndpointState::Ready {
                continue;
            }
            let Some(Ok(pod)) = self.pods.get(&pod_ref.to_string()) else {
                continue;
            };
            if !self.needs_labels(&rec, pod) {
                continue;
            }
            if let Some((rv, _)) = self.pod_failures.get(&rec.id) {
                if rv == &pod.resource_version {
                    continue;
                }
            }
            let own = pod.labels.clone();
            let all = pod.endpoint_labels(&self.config.cluster_name);
            let agent: BTreeMap<String, String> = all
                .into_iter()
                .filter(|(k, _)| !own.contains_key(k))
                .collect();
            let ports = pod.named_ports.clone();
            let id = rec.id;
            let state = self.state.clone();
            let done = tokio::task::spawn_blocking(move || {
                state
                    .endpoints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_pod_labels(id, &own, &agent, &ports)
            })
            .await;
            match done {
                Ok(Ok(r)) => {
                    self.pod_failures.remove(&id);
                    info!(id, pod = %pod_ref, identity = r.identity, "endpoint labels from its pod");
                }
                Ok(Err(e)) => {
                    let msg = format!("pod {pod_ref}: endpoint {id}: {e}");
                    warn!("{msg}");
                    self.view.note(msg.clone());
                    self.pod_failures
                        .insert(id, (pod.resource_version.clone(), msg));
                }
                Err(e) => warn!(error = %e, "pod label task failed"),
            }
        }
    }

    /// Whether `rec` lacks its pod's labels or port names.
    fn needs_labels(&self, rec: &EndpointRecord, pod: &PodEndpoint) -> bool {
        if rec.label_source.is_some() {
            return true;
        }
        if rec.labels != pod.endpoint_labels(&self.config.cluster_name) {
            return true;
        }
        match crate::policy::checked_named_ports(&pod.named_ports) {
            Ok(ports) => ports != rec.named_ports,
            Err(_) => false,
        }
    }

    async fn namespaces_changed(&mut self, batch: Vec<Change<Namespace>>) {
        for change in batch {
            let (name, labels) = match change {
                Change::Upserted(ns) => match NamespaceLabels::from_namespace(&ns) {
                    Ok(n) => (n.name, n.labels),
                    Err(e) => {
                        warn!(error = %e, "namespace refused: its labels are not applied");
                        self.view.note(e.to_string());
                        continue;
                    }
                },
                Change::Deleted(ns) => (ns.name_any(), BTreeMap::new()),
            };
            let before = self.namespaces.get(&name).cloned().unwrap_or_default();
            if before == labels {
                continue;
            }
            let state = self.state.clone();
            let (n, l) = (name.clone(), labels.clone());
            let done = tokio::task::spawn_blocking(move || {
                state
                    .endpoints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_namespace(&n, &l)
            })
            .await;
            match done {
                Ok(Ok(moved)) => {
                    info!(namespace = %name, endpoints = moved, "namespace labels from Kubernetes");
                    self.namespaces.insert(name, labels);
                }
                Ok(Err(e)) => {
                    let msg = format!("namespace {name}: {e}");
                    warn!("{msg}");
                    self.view.note(msg);
                }
                Err(e) => warn!(error = %e, "namespace task failed"),
            }
        }
    }

    async fn policies_changed(&mut self, kind: PolicyKind, batch: Vec<Change<DynamicObject>>) {
        for change in batch {
            match change {
                Change::Upserted(obj) => self.policy_upserted(kind, obj).await,
                Change::Deleted(obj) => {
                    let uid = obj.uid().unwrap_or_default();
                    self.reported.forget(&uid);
                    if let Some((key, _)) = self.policies.remove(&uid) {
                        self.delete_policies(vec![key]).await;
                    }
                }
            }
        }
    }

    async fn policy_upserted(&mut self, kind: PolicyKind, obj: DynamicObject) {
        let translated = cilia_k8s::policy::translate(kind, &obj);
        let outcome = match translated {
            Err(refusal) => Err(refusal),
            Ok(p) => {
                let key = format!(
                    "{}/{}/{}",
                    crate::policy::kind_name(p.policy.kind),
                    p.policy.namespace.as_deref().unwrap_or(""),
                    p.policy.name
                );
                let unchanged = self
                    .policies
                    .get(&p.source.uid)
                    .is_some_and(|(k, y)| k == &key && y == &p.yaml);
                if unchanged {
                    // A status write or a relist: nothing to re-resolve.
                    self.report(kind, &obj, None).await;
                    return;
                }
                let state = self.state.clone();
                let (what, yaml) = (p.source.describe(), p.yaml.clone());
                let done = tokio::task::spawn_blocking(move || {
                    state
                        .policy
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .import_policies_from(&what, &yaml, Some(LABEL_SOURCE))
                })
                .await;
                match done {
                    Ok(Ok(change)) => {
                        info!(policy = %p.source.describe(), revision = change.revision, "policy from Kubernetes");
                        self.policies
                            .insert(p.source.uid.clone(), (key, p.yaml.clone()));
                        Ok(())
                    }
                    // Refused by the repository (a limit, a conflict): the
                    // object is told why, as for a parse error.
                    Ok(Err(e)) => Err(PolicyRefusal {
                        object: Box::new(p.source.clone()),
                        field: String::new(),
                        reason: e.to_string(),
                    }),
                    Err(e) => {
                        warn!(error = %e, "policy task failed");
                        return;
                    }
                }
            }
        };
        if let Err(refusal) = &outcome {
            // The previous version of the object, if one was accepted,
            // stays in force: the refusal concerns the new spec only.
            let msg = format!("refused: {}", refusal.detail());
            warn!("{msg}");
            self.view.note(msg);
        }
        self.report(kind, &obj, outcome.as_ref().err()).await;
    }

    /// Writes the verdict back: a `Valid` condition on a CRD's status, an
    /// Event for a refused NetworkPolicy (once per generation).
    async fn report(
        &mut self,
        kind: PolicyKind,
        obj: &DynamicObject,
        refusal: Option<&PolicyRefusal>,
    ) {
        let written = match kind {
            PolicyKind::NetworkPolicy => match refusal {
                Some(r) if self.reported.first_time(&r.object) => {
                    cilia_k8s::client::report_event(&self.client, r, &self.config.node_name).await
                }
                _ => Ok(()),
            },
            _ => {
                let resource = cilia_k8s::policy::api_resource(kind);
                let api: Api<DynamicObject> = match obj.namespace() {
                    Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &resource),
                    None => Api::all_with(self.client.clone(), &resource),
                };
                let outcome = match refusal {
                    Some(r) => Err(r),
                    None => Ok(()),
                };
                cilia_k8s::client::report_crd_status(&api, obj, outcome).await
            }
        };
        if let Err(e) = written {
            let msg = format!("{}: reporting the verdict: {e}", describe(kind, obj));
            warn!("{msg}");
            self.view.note(msg);
        }
    }

    async fn delete_policies(&mut self, keys: Vec<String>) {
        let state = self.state.clone();
        let done = tokio::task::spawn_blocking(move || {
            state
                .policy
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .delete_policy_keys(&keys)
        })
        .await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let msg = format!("deleting a policy of a deleted object: {e}");
                warn!("{msg}");
                self.view.note(msg);
            }
            Err(e) => warn!(error = %e, "policy task failed"),
        }
    }

    /// After the first lists: policies stored from Kubernetes whose object
    /// is gone (deleted while the agent was down) are deleted.
    async fn prune_policies(&mut self) {
        let state = self.state.clone();
        let stored = tokio::task::spawn_blocking(move || {
            state
                .policy
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .policy_keys_of_origin(LABEL_SOURCE)
        })
        .await
        .unwrap_or_default();
        let live: BTreeSet<&String> = self.policies.values().map(|(k, _)| k).collect();
        let gone: Vec<String> = stored.into_iter().filter(|k| !live.contains(k)).collect();
        if !gone.is_empty() {
            info!(policies = ?gone, "removing policies whose Kubernetes objects are gone");
            self.delete_policies(gone).await;
        }
    }
}

fn describe(kind: PolicyKind, obj: &DynamicObject) -> String {
    let source: PolicySource = cilia_k8s::policy::source_of(kind, obj);
    source.describe()
}

/// The Kubernetes settings from the flags: `None` when neither a
/// kubeconfig nor in-cluster is asked for.
pub fn config_from_flags(
    kubeconfig: Option<std::path::PathBuf>,
    in_cluster: bool,
    node_name: &str,
    sync_timeout: Duration,
) -> anyhow::Result<Option<K8sConfig>> {
    let source = match (kubeconfig, in_cluster) {
        (None, false) => return Ok(None),
        (Some(_), true) => {
            anyhow::bail!("--k8s-kubeconfig and --k8s-in-cluster: give one of them")
        }
        (Some(path), false) => cilia_k8s::config::Source::Kubeconfig(path),
        (None, true) => cilia_k8s::config::Source::InCluster,
    };
    if node_name.is_empty() || node_name.len() > 253 {
        anyhow::bail!("--node-name {node_name:?}: Kubernetes node names have 1-253 characters");
    }
    Ok(Some(K8sConfig {
        source,
        node_name: node_name.to_string(),
        cluster_name: cilia_k8s::labels::DEFAULT_CLUSTER.into(),
        sync_timeout,
    }))
}

/// The resource name of a policy kind (what `cilia status` calls it).
fn plural(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::NetworkPolicy => "networkpolicies",
        PolicyKind::CiliumNetworkPolicy => "ciliumnetworkpolicies",
        PolicyKind::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
    }
}
