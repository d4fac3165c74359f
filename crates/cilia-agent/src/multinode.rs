//! Joins the agent to a cluster (`--kvstore etcd`): prepares the node's
//! datapath for other nodes (the VXLAN device and its programs, or the
//! native-routing program on the underlay device), starts the cluster
//! client, and applies what it reports — other nodes, their pods, policies,
//! identities — to the datapath, the routes and the policy subsystem.
//!
//! Why the events are applied from one blocking thread, in batches: the
//! client reports on a std channel, and a resync after a reconnect can
//! report thousands of entries at once; each batch is folded into
//! [`Mesh`] and written to the datapath as one difference (and the routes
//! as one sync), so a resync costs one pass, not one per entry.
//!
//! What survives a lost kvstore: everything already written. Nothing is
//! withdrawn on a disconnect; only the client's relist after the reconnect
//! (which reports deletions of what vanished meanwhile) removes entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cilia_abi::{IpcacheEntry, NodeConfig, TunnelMode as DpTunnel};
use ipnet::IpNet;
use tracing::{info, warn};

use crate::cluster::{ClusterClient, ClusterEvent, ClusterNode};
use crate::endpoint::DatapathHandle;
use crate::mesh::{Mesh, RemoteEntry, RemoteNode, RemotePod};
use crate::nodenet::{self, Underlay};
use crate::policy::repository::PolicyState;
use crate::store::StoredPolicy;
use crate::{ClusterOptions, TunnelMode};

/// What the node's datapath was set up with for the cluster.
#[derive(Debug, Clone)]
pub struct NodeDatapath {
    pub underlay: Underlay,
    /// The VXLAN device (overlay mode).
    pub vxlan_ifindex: Option<u32>,
    /// The MTU of endpoints' devices.
    pub endpoint_mtu: u32,
    /// Whether the kernel can make Geneve devices (reported, not used).
    pub geneve: Result<bool, String>,
}

/// Sets up the node's devices and node programs for `options.tunnel`
/// (blocking; at start, before endpoints are restored so that they meet a
/// datapath that can reach other nodes).
pub fn prepare_datapath(
    options: &ClusterOptions,
    datapath: &DatapathHandle,
) -> anyhow::Result<NodeDatapath> {
    let node_ip = options
        .node_ip
        .context("--kvstore etcd needs the node's underlay address: pass --node-ip")?;
    let underlay = nodenet::find_underlay(node_ip)?;
    let geneve = nodenet::geneve_available();
    let (vxlan_ifindex, endpoint_mtu, config) = match options.tunnel {
        TunnelMode::Vxlan => {
            let mtu = underlay.vxlan_mtu();
            let ifindex = nodenet::ensure_vxlan(options.tunnel_port, mtu)?;
            // Attaching swaps inside the pinned links: the device never runs
            // without its program. The other mode's program (an agent
            // restarted with another --tunnel) goes.
            datapath
                .attach_overlay(nodenet::VXLAN_DEVICE)
                .context("attaching the overlay programs")?;
            // The underlay device's program serves NodePort services in
            // every mode; in VXLAN mode it leaves everything else alone.
            datapath
                .attach_netdev(&underlay.ifname)
                .with_context(|| format!("attaching the netdev program to {}", underlay.ifname))?;
            (
                Some(ifindex),
                mtu,
                NodeConfig {
                    tunnel_mode: DpTunnel::Vxlan,
                    tunnel_ifindex: ifindex,
                    underlay_ifindex: underlay.ifindex,
                    tunnel_port: options.tunnel_port,
                },
            )
        }
        TunnelMode::Disabled => {
            datapath
                .detach_overlay()
                .context("detaching the overlay programs")?;
            nodenet::remove_vxlan()?;
            datapath.attach_netdev(&underlay.ifname).with_context(|| {
                format!(
                    "attaching the native-routing program to {}",
                    underlay.ifname
                )
            })?;
            (
                None,
                underlay.mtu,
                NodeConfig {
                    tunnel_mode: DpTunnel::Native,
                    tunnel_ifindex: 0,
                    underlay_ifindex: underlay.ifindex,
                    tunnel_port: 0,
                },
            )
        }
    };
    datapath
        .set_node_config(&config)
        .context("writing the node configuration map")?;
    info!(
        tunnel = options.tunnel.as_str(),
        underlay = %underlay.ifname,
        node_ip = %underlay.ip,
        endpoint_mtu,
        "node datapath ready for the cluster"
    );
    Ok(NodeDatapath {
        underlay,
        vxlan_ifindex,
        endpoint_mtu,
        geneve,
    })
}

/// The underlay addresses a node announces: `--node-ip` first (its tunnel
/// endpoint), then the device's other global addresses, so native routing
/// has a next hop of each family.
pub fn node_ips(underlay: &Underlay) -> Vec<IpAddr> {
    let mut out = vec![underlay.ip];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs.filter(|a| a.interface_name == underlay.ifname) {
            let Some(sa) = a.address else { continue };
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let global = match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
            };
            if global && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// What is written for the cluster, to write only differences.
#[derive(Debug, Default)]
struct Applied {
    peers: BTreeSet<IpAddr>,
    routes: BTreeMap<IpNet, nodenet::RouteVia>,
}

/// The cluster link's own state, for status and the node list.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    pub connected: bool,
    pub synced: bool,
    pub last_error: Option<String>,
    /// Identities of this node the cluster maps to other labels.
    pub identity_conflicts: Vec<String>,
}

/// The running cluster link.
pub struct MultiNode {
    pub client: ClusterClient,
    pub options: ClusterOptions,
    pub node: NodeDatapath,
    mesh: Mutex<Mesh>,
    applied: Mutex<Applied>,
    pub status: Mutex<LinkStatus>,
}

impl MultiNode {
    pub fn new(client: ClusterClient, options: ClusterOptions, node: NodeDatapath) -> Arc<Self> {
        let mesh = Mesh::new(
            options.tunnel,
            options.native_routes,
            options.node_name.clone(),
        );
        Arc::new(Self {
            client,
            options,
            node,
            mesh: Mutex::new(mesh),
            applied: Mutex::new(Applied::default()),
            status: Mutex::new(LinkStatus::default()),
        })
    }

    /// Records an identity the cluster maps to other labels (for status).
    pub fn note_conflict(link: &Arc<Self>, what: String) {
        Self::lock(&link.status).identity_conflicts.push(what);
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the client's events until it stops (run on a thread of its
    /// own: the receiver blocks).
    pub fn run_events(
        self: Arc<Self>,
        events: mpsc::Receiver<ClusterEvent>,
        policy: Arc<Mutex<PolicyState>>,
        datapath: DatapathHandle,
    ) {
        while let Ok(first) = events.recv() {
            let mut batch = vec![first];
            // What else is already queued, bounded: a resync is applied in
            // a few passes, never one per entry.
            while batch.len() < 4096 {
                match events.recv_timeout(Duration::from_millis(20)) {
                    Ok(ev) => batch.push(ev),
                    Err(_) => break,
                }
            }
            self.apply(batch, &policy, &datapath);
        }
        info!("cluster client stopped; the datapath keeps what it has");
    }

    fn apply(
        &self,
        batch: Vec<ClusterEvent>,
        policy: &Arc<Mutex<PolicyState>>,
        datapath: &DatapathHandle,
    ) {
        let mut mesh_changed = false;
        let mut put: BTreeMap<String, StoredPolicy> = BTreeMap::new();
        let mut deleted: BTreeSet<String> = BTreeSet::new();
        let mut identities: Vec<(u32, Option<BTreeMap<String, String>>)> = Vec::new();
        let mut synced = false;
        {
            let mut mesh = Self::lock(&self.mesh);
            for ev in batch {
                match ev {
                    ClusterEvent::Connected => {
                        let mut s = Self::lock(&self.status);
                        s.connected = true;
                        s.last_error = None;
                        info!("kvstore connected");
                    }
                    ClusterEvent::Disconnected { reason } => {
                        let mut s = Self::lock(&self.status);
                        s.connected = false;
                        s.synced = false;
                        warn!(%reason, "kvstore disconnected; keeping the last known cluster state");
                        s.last_error = Some(reason);
                    }
                    ClusterEvent::Synced => synced = true,
                    ClusterEvent::NodeUpsert(n) => {
                        mesh_changed |= mesh.upsert_node(remote_node(&n));
                    }
                    ClusterEvent::NodeDelete(name) => {
                        info!(node = %name, "node left the cluster");
                        mesh_changed |= mesh.remove_node(&name);
                    }
                    ClusterEvent::IpcacheUpsert(r) => {
                        mesh_changed |= mesh.upsert_pod(
                            r.ip,
                            r.node,
                            RemotePod {
                                identity: r.identity,
                                tunnel_endpoint: r.tunnel_endpoint,
                            },
                        );
                    }
                    ClusterEvent::IpcacheDelete(ip) => mesh_changed |= mesh.remove_pod(ip),
                    ClusterEvent::PolicyUpsert(p) => {
                        deleted.remove(&p.key());
                        put.insert(p.key(), p);
                    }
                    ClusterEvent::PolicyDelete(key) => {
                        put.remove(&key);
                        deleted.insert(key);
                    }
                    ClusterEvent::IdentityUpsert(id, labels) => identities.push((id, Some(labels))),
                    ClusterEvent::IdentityDelete(id) => identities.push((id, None)),
                }
            }
        }
        if !identities.is_empty()
            || mesh_changed
            || !put.is_empty()
            || !deleted.is_empty()
            || synced
        {
            let mut p = policy.lock().unwrap_or_else(|e| e.into_inner());
            if !identities.is_empty() {
                p.change_remote_identities(identities);
            }
            if mesh_changed {
                let desired = Self::lock(&self.mesh).ipcache();
                if let Err(e) = p.set_remote_ipcache(to_entries(&desired)) {
                    warn!(error = %e, "writing other nodes' ipcache entries failed; retried on the next change");
                }
            }
            let put: Vec<StoredPolicy> = put.into_values().collect();
            let deleted: Vec<String> = deleted.into_iter().collect();
            if let Err(e) = p.apply_cluster_policies(&put, &deleted, synced) {
                warn!(error = %e, "applying the cluster's policies failed");
            }
        }
        if synced {
            let mut s = Self::lock(&self.status);
            s.synced = true;
            info!("cluster state synced");
        }
        if mesh_changed {
            self.sync_peers_and_routes(datapath);
        }
    }

    /// Writes the tunnel peers and the routes that differ from what was
    /// written.
    fn sync_peers_and_routes(&self, datapath: &DatapathHandle) {
        let (peers, routes) = {
            let mesh = Self::lock(&self.mesh);
            (
                mesh.peers(),
                mesh.routes(self.node.vxlan_ifindex, self.node.underlay.ifindex),
            )
        };
        let mut applied = Self::lock(&self.applied);
        let add: Vec<IpAddr> = peers.difference(&applied.peers).copied().collect();
        let gone: Vec<IpAddr> = applied.peers.difference(&peers).copied().collect();
        match datapath
            .publish_nodes(&add)
            .and_then(|()| datapath.withdraw_nodes(&gone))
        {
            Ok(()) => applied.peers = peers,
            Err(e) => warn!(error = %e, "writing the tunnel peers failed"),
        }
        if routes != applied.routes {
            match nodenet::sync_routes(&routes) {
                Ok(_) => applied.routes = routes,
                Err(e) => warn!(error = %e, "programming routes to other nodes failed"),
            }
        }
    }

    /// Publishes this node's endpoint addresses whenever they change: the
    /// policy subsystem republishes its L7 summary after every endpoint
    /// change, which is the signal; a create signals before its record is
    /// final, so the store is also read again every second (a read
    /// transaction; the client writes only differences).
    pub async fn publish_local_ips(
        self: Arc<Self>,
        store: Arc<crate::store::Store>,
        mut changes: tokio::sync::watch::Receiver<Arc<crate::proxy::L7Summary>>,
    ) {
        let mut last: Option<Vec<(IpAddr, u32)>> = None;
        loop {
            let s = store.clone();
            let ips = tokio::task::spawn_blocking(move || {
                s.endpoints().map(|recs| {
                    let mut v: Vec<(IpAddr, u32)> = recs
                        .iter()
                        // Every endpoint with an identity: a pod being
                        // created is announced as early as it can be reached.
                        .filter(|r| r.identity != 0)
                        .flat_map(|r| r.ips().into_iter().map(move |ip| (ip, r.identity)))
                        .collect();
                    v.sort();
                    v
                })
            })
            .await;
            match ips {
                Ok(Ok(ips)) if last.as_ref() != Some(&ips) => {
                    // The client calls the kvstore (blocking): never from
                    // an async task.
                    let (client, publish) = (self.client.clone(), ips.clone());
                    if let Err(e) =
                        tokio::task::spawn_blocking(move || client.set_local_ips(publish)).await
                    {
                        warn!(error = %e, "publishing the node's endpoint addresses failed");
                    }
                    last = Some(ips);
                }
                Ok(Err(e)) => warn!(error = %e, "reading endpoints to publish failed"),
                _ => {}
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return;
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn remote_node(n: &ClusterNode) -> RemoteNode {
    let mut ranges: Vec<IpNet> = vec![IpNet::V6(n.ipv6_range)];
    ranges.extend(n.ipv4_range.map(IpNet::V4));
    RemoteNode {
        name: n.name.clone(),
        node_ips: n.node_ips.clone(),
        ranges,
    }
}

fn to_entries(desired: &BTreeMap<IpNet, RemoteEntry>) -> BTreeMap<IpNet, IpcacheEntry> {
    desired
        .iter()
        .map(|(prefix, (identity, tunnel))| {
            (
                *prefix,
                IpcacheEntry {
                    prefix: *prefix,
                    identity: *identity,
                    tunnel: *tunnel,
                },
            )
        })
        .collect()
}

impl MultiNode {
    /// Every node as the API shows it (this one `local`).
    pub fn api_nodes(&self) -> Vec<cilia_api::Node> {
        self.client
            .nodes()
            .into_iter()
            .map(|n| cilia_api::Node {
                local: n.name == self.options.node_name,
                addresses: n.node_ips.clone(),
                ipv6_range: n.ipv6_range.to_string(),
                ipv4_range: n.ipv4_range.map(|r| r.to_string()),
                health_addresses: n.health_ips.clone(),
                peer_api: n.peer_api.map(|a| a.to_string()),
                tunnel: n.tunnel.clone(),
                last_heartbeat: Some(
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(n.heartbeat_ms),
                    )
                    .to_string(),
                ),
                name: n.name,
                ..Default::default()
            })
            .collect()
    }

    /// The other nodes' health endpoints, for the prober.
    pub fn health_targets(&self) -> Vec<crate::health::HealthTarget> {
        self.client
            .nodes()
            .into_iter()
            .filter(|n| n.name != self.options.node_name && !n.health_ips.is_empty())
            .map(|n| crate::health::HealthTarget {
                node: n.name,
                addresses: n.health_ips,
            })
            .collect()
    }

    /// Keeps the API's node list (heartbeats included) and the prober's
    /// targets current: the client's cache is read every second (a lock, no
    /// kvstore call).
    pub async fn refresh(
        self: Arc<Self>,
        nodes: tokio::sync::watch::Sender<Vec<cilia_api::Node>>,
        targets: tokio::sync::watch::Sender<Vec<crate::health::HealthTarget>>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let api = self.api_nodes();
            nodes.send_if_modified(|old| {
                let changed = *old != api;
                if changed {
                    *old = api;
                }
                changed
            });
            let t = self.health_targets();
            targets.send_if_modified(|old| {
                let changed = *old != t;
                if changed {
                    *old = t;
                }
                changed
            });
            if nodes.is_closed() && targets.is_closed() {
                return;
            }
        }
    }
}

impl MultiNode {
    /// The cluster's lines of `cilia status`: kvstore, tunnel, geneve.
    pub fn subsystems(&self) -> Vec<cilia_api::SubsystemStatus> {
        let s = Self::lock(&self.status).clone();
        let kv = self.client.status();
        let endpoints = self.options.kvstore_endpoints.join(",");
        let mut errors = s.identity_conflicts.clone();
        let kvstore = if s.connected && s.synced {
            cilia_api::SubsystemStatus {
                name: "kvstore".into(),
                status: "ok".into(),
                detail: format!("etcd {endpoints}: connected and synced, {} nodes", kv.nodes),
                errors,
            }
        } else {
            errors.extend(s.last_error.clone().or(kv.last_error.clone()));
            cilia_api::SubsystemStatus {
                name: "kvstore".into(),
                status: "degraded".into(),
                detail: format!(
                    "etcd {endpoints}: {}; forwarding and enforcing with the last known cluster state",
                    if s.connected { "resyncing" } else { "not connected, retrying" }
                ),
                errors,
            }
        };
        let u = &self.node.underlay;
        let tunnel = cilia_api::SubsystemStatus {
            name: "tunnel".into(),
            status: "ok".into(),
            detail: match self.options.tunnel {
                TunnelMode::Vxlan => format!(
                    "vxlan on {} (UDP {}, endpoint MTU {}) over {} {}",
                    nodenet::VXLAN_DEVICE,
                    self.options.tunnel_port,
                    self.node.endpoint_mtu,
                    u.ifname,
                    u.ip
                ),
                TunnelMode::Disabled => format!(
                    "disabled: native routing over {} {} (routes: {})",
                    u.ifname,
                    u.ip,
                    match self.options.native_routes {
                        crate::NativeRoutes::Auto => "by the agent",
                        crate::NativeRoutes::External => "by the operator",
                    }
                ),
            },
            errors: Vec::new(),
        };
        let geneve = cilia_api::SubsystemStatus {
            name: "geneve".into(),
            status: "off".into(),
            detail: match &self.node.geneve {
                Ok(true) => "available in this kernel (cilia's overlay is VXLAN)".into(),
                Ok(false) => {
                    "unavailable: this kernel cannot create geneve devices (no geneve module)"
                        .into()
                }
                Err(e) => format!("unknown: probing failed: {e}"),
            },
            errors: Vec::new(),
        };
        vec![kvstore, tunnel, geneve]
    }
}
