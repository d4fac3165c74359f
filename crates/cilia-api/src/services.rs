//! Bodies of the services API (`/v1/services`, `/v1/bpf/lb`): east-west
//! load balancing of a frontend `[VIP]:PORT/PROTO` over backends.

use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;
use utoipa::ToSchema;

/// `POST /v1/services`: create a service, or replace the one with this id
/// (or, without an id, the one with this frontend).
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// 1-65535, also the datapath's rev-NAT id; absent: the frontend's
    /// service keeps its id, a new one gets the lowest free id.
    pub id: Option<u16>,
    /// `[VIP]:PORT/PROTO`, e.g. `192.0.2.10:80/tcp`, `[2001:db8::10]:53/udp`.
    pub frontend: String,
    /// Backends, of the frontend's address family.
    pub backends: Vec<ServiceBackendSpec>,
    /// `random` (default) or `maglev`.
    pub algorithm: Option<String>,
    /// Client-address affinity; absent: off.
    pub affinity: Option<ServiceAffinity>,
    /// NodePort services (frontend `0.0.0.0:PORT` or `[::]:PORT`):
    /// `Cluster` (default: any backend) or `Local` (external clients go to
    /// this node's backends only).
    pub external_traffic_policy: Option<String>,
}

/// One backend of a [`ServiceSpec`].
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceBackendSpec {
    /// `ADDR:PORT` (`[IPv6]:PORT`).
    pub address: String,
    /// Relative share of new flows under Maglev (default 1; 0: no new flows).
    pub weight: Option<u16>,
    /// `active` (default), `terminating` or `quarantined`: only active
    /// backends get new flows; the others keep the flows they have.
    pub state: Option<String>,
}

/// Client-address affinity: a client's new flows go to the backend of its
/// last flow while that was at most `timeout_secs` ago.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAffinity {
    pub timeout_secs: u32,
}

/// `POST /v1/services/import`: create or replace many services at once.
///
/// Every entry is checked first (against the others and the stored
/// services); if one is refused, nothing is applied and the error lists each
/// refused entry as `services[INDEX].FIELD: reason`. Otherwise all changes
/// are stored in one transaction, then written to the datapath.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceImport {
    /// The services, each as for `POST /v1/services` (by id, else by
    /// frontend; a new frontend gets the lowest free id).
    pub services: Vec<ServiceSpec>,
    /// Also delete the stored services this list does not name (by id, or
    /// by frontend for entries without one): the list becomes the whole set.
    #[serde(default)]
    pub prune: bool,
}

/// What a [`ServiceImport`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceImportResult {
    /// The id of each entry, in the order given.
    pub ids: Vec<u16>,
    /// Entries that made a new service.
    pub created: usize,
    /// Entries that changed a stored service.
    pub updated: usize,
    /// Entries equal to the stored service (written to the datapath again,
    /// not to the store).
    pub unchanged: usize,
    /// Services deleted by `prune`.
    pub deleted: Vec<u16>,
}

/// A service as the agent keeps it.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    pub id: u16,
    pub frontend: String,
    /// `random` or `maglev`.
    pub algorithm: String,
    pub affinity: Option<ServiceAffinity>,
    /// NodePort services: `Cluster` or `Local`; absent for the others.
    pub external_traffic_policy: Option<String>,
    pub backends: Vec<ServiceBackend>,
}

/// A backend of a [`Service`], with the id the agent gave its address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceBackend {
    /// Backend id (one per distinct address, shared between services).
    pub id: u32,
    pub address: String,
    pub weight: u16,
    /// `active`, `terminating` or `quarantined`.
    pub state: String,
}

/// `GET /v1/bpf/lb`: the load balancer's maps as the kernel holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BpfLb {
    /// Entries of every Maglev table (the agent's `--lb-maglev-table-size`).
    pub maglev_table_size: u32,
    pub services: Vec<BpfLbService>,
    pub backends: Vec<BpfLbBackend>,
}

/// One service of the services map.
#[skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BpfLbService {
    /// The rev-NAT id.
    pub id: u16,
    pub frontend: String,
    pub algorithm: String,
    /// Affinity timeout in seconds; absent: off.
    pub affinity_timeout: Option<u32>,
    /// Backend ids of the slots (the backends that get new flows).
    pub slots: Vec<u32>,
    /// Maglev services: how many table entries each backend holds.
    pub maglev: Option<Vec<BpfLbMaglevShare>>,
    /// What the service is beyond a frontend: `nodeport` (the frontend
    /// stands for every node address), `local` (externalTrafficPolicy
    /// Local), `dsr` (direct server return), `affinity`. Empty for a plain
    /// ClusterIP-style service.
    #[serde(default)]
    pub flags: Vec<String>,
}

/// A backend's share of a Maglev table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BpfLbMaglevShare {
    pub backend: u32,
    pub entries: u32,
}

/// One entry of the backends map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BpfLbBackend {
    pub id: u32,
    pub address: String,
    pub state: String,
}

/// The service part of a flow (from the datapath's service event): the
/// client spoke to `frontend`, the load balancer chose `backend`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowService {
    pub id: u16,
    pub frontend: String,
    pub backend: String,
    /// Which load balancer chose: `per-packet` (the client's endpoint
    /// program; the flow's source is the client) or `socket` (at
    /// connect()/sendmsg(); no packet yet, so the source is the endpoint,
    /// or the node, without address).
    #[serde(default)]
    pub balancer: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_needs_only_frontend_and_backends() {
        let spec: ServiceSpec = serde_json::from_str(
            r#"{"frontend":"192.0.2.10:80/tcp","backends":[{"address":"192.0.2.1:8080"}]}"#,
        )
        .expect("spec");
        assert_eq!(spec.id, None);
        assert_eq!(spec.backends[0].weight, None);
        let json = serde_json::to_string(&spec).expect("json");
        assert!(!json.contains("null"), "{json}");
    }

    #[test]
    fn unknown_fields_of_a_spec_are_refused() {
        let e = serde_json::from_str::<ServiceSpec>(
            r#"{"frontend":"192.0.2.10:80/tcp","backends":[],"algo":"maglev"}"#,
        )
        .expect_err("typo");
        assert!(e.to_string().contains("algo"), "{e}");
    }
}
