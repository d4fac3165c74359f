//! Endpoints changing identity: their labels, their namespace's labels,
//! labels learned from the runtime, and audit mode. Each change is the
//! endpoint's (record, conntrack, program) and then the policy's (the
//! endpoint's map, and the others' when an identity comes or goes).

use std::collections::BTreeMap;

use cilia_api::EndpointState;
use tracing::info;

use super::{config_of, EndpointError, EndpointManager};
use crate::store::EndpointRecord;

impl EndpointManager {
    /// Sets a namespace's labels; endpoints in it move to their new
    /// identities (programs swapped atomically), then policies regenerate.
    pub fn set_namespace(
        &mut self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<usize, EndpointError> {
        cilia_api::labels::validate_value(namespace)
            .map_err(|reason| EndpointError::Namespace(namespace.into(), reason))?;
        cilia_api::labels::validate_labels(labels)?;
        let changed = self.store.set_namespace(namespace, labels)?;
        for rec in &changed {
            if rec.state != EndpointState::Ready {
                continue;
            }
            // Flows allowed under the old identity end with it.
            self.dp().purge_conntrack(rec.id, &rec.ips())?;
            if let Some(ifindex) = self.netdev.ifindex(&rec.host_ifname) {
                self.policy().apply_policy(rec)?;
                self.attach(&config_of(rec, ifindex), &rec.host_ifname)?;
                self.publish(rec, ifindex)?;
            }
        }
        self.policy().regenerate()?;
        Ok(changed.len())
    }

    /// Sets an endpoint's labels: it moves to the identity of its new
    /// security labels (program swapped atomically), then policies regenerate.
    pub fn set_labels(
        &mut self,
        id: u16,
        labels: &BTreeMap<String, String>,
    ) -> Result<EndpointRecord, EndpointError> {
        cilia_api::labels::validate_endpoint_labels(labels)?;
        self.relabel(id, labels)
    }

    /// Gives an endpoint the labels of its Kubernetes pod: the pod's own
    /// (`own`, checked as any endpoint's labels are: no reserved key), and
    /// those the agent adds from the pod (`agent`: service account and
    /// cluster, keys an endpoint may not claim itself), with the port names
    /// its containers declare. It moves to its new identity as with
    /// [`Self::set_labels`].
    pub fn set_pod_labels(
        &mut self,
        id: u16,
        own: &BTreeMap<String, String>,
        agent: &BTreeMap<String, String>,
        named_ports: &[cilia_api::NamedPort],
    ) -> Result<EndpointRecord, EndpointError> {
        cilia_api::labels::validate_endpoint_labels(own)?;
        let mut labels = own.clone();
        labels.extend(agent.iter().map(|(k, v)| (k.clone(), v.clone())));
        cilia_api::labels::validate_labels(&labels)?;
        let ports = crate::policy::checked_named_ports(named_ports)?;
        let mut rec = self.get(id)?;
        if rec.named_ports != ports {
            rec.named_ports = ports;
            self.store.update_endpoint(&rec)?;
        }
        self.relabel(id, &labels)
    }

    /// Moves an endpoint to the identity of `labels` (already checked).
    fn relabel(
        &mut self,
        id: u16,
        labels: &BTreeMap<String, String>,
    ) -> Result<EndpointRecord, EndpointError> {
        let old_identity = self.get(id)?.identity;
        let rec = self
            .store
            .set_endpoint_labels(id, labels)?
            .ok_or(EndpointError::NotFound(id))?;
        crate::crash::point("endpoint-labels:after-record");
        if rec.identity != old_identity {
            // Flows allowed under the old identity end with it.
            self.dp().purge_conntrack(rec.id, &rec.ips())?;
        }
        if rec.state == EndpointState::Ready {
            if let Some(ifindex) = self.netdev.ifindex(&rec.host_ifname) {
                self.policy().apply_policy(&rec)?;
                self.attach(&config_of(&rec, ifindex), &rec.host_ifname)?;
                crate::crash::point("endpoint-labels:after-attach");
                self.publish(&rec, ifindex)?;
            }
        }
        info!(id, identity = rec.identity, "endpoint labels set");
        self.policy().regenerate()?;
        Ok(rec)
    }

    /// Applies labels learned from a runtime, but only to the endpoint they
    /// were learned for: the same id, the same container, still waiting for
    /// them. An endpoint deleted and re-added meanwhile (ids are reused) is
    /// another container and keeps its own identity. `Ok(None)`: not applied.
    pub fn set_learned_labels(
        &mut self,
        id: u16,
        container_id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<EndpointRecord>, EndpointError> {
        let still_waiting = self.store.endpoints()?.into_iter().any(|r| {
            r.id == id
                && r.container_id.as_deref() == Some(container_id)
                && r.label_source.is_some()
        });
        if !still_waiting {
            return Ok(None);
        }
        self.set_labels(id, labels).map(Some)
    }

    /// Turns an endpoint's policy audit mode on or off.
    pub fn set_policy_audit(
        &mut self,
        id: u16,
        audit: bool,
    ) -> Result<EndpointRecord, EndpointError> {
        let rec = self
            .store
            .set_endpoint_audit(id, audit)?
            .ok_or(EndpointError::NotFound(id))?;
        if rec.state == EndpointState::Ready {
            self.policy().apply_policy(&rec)?;
            // Flows decided before now meet the policy again.
            self.dp().bump_policy_revision()?;
        }
        info!(id, audit, "policy audit mode set");
        Ok(rec)
    }

    /// Deletes the endpoints `matches` selects (CNI DEL: a container's
    /// attachment by interface and network), under the endpoints' lock, so
    /// the selection and the deletion see the same endpoints; returns how
    /// many. None is not an error: CNI DEL is idempotent.
    pub fn delete_matching(
        &mut self,
        matches: impl Fn(&EndpointRecord) -> bool,
    ) -> Result<usize, EndpointError> {
        let ids = self.matching(matches)?;
        for id in &ids {
            self.delete(*id)?;
        }
        Ok(ids.len())
    }

    /// [`EndpointManager::disconnect`]s the endpoints `matches` selects,
    /// for [`super::reap`] to finish after the caller answered. Endpoints
    /// already being deleted in the background are left to that delete.
    /// Stops at the first that cannot be disconnected: those before it are
    /// returned all the same (they must be reaped) with the error.
    pub fn disconnect_matching(
        &mut self,
        matches: impl Fn(&EndpointRecord) -> bool,
    ) -> (Vec<super::Disconnected>, Result<(), EndpointError>) {
        let ids = match self.matching(matches) {
            Ok(ids) => ids,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let mut gone = Vec::with_capacity(ids.len());
        for id in ids {
            match self.disconnect(id) {
                Ok(d) => gone.push(d),
                Err(e) => return (gone, Err(e)),
            }
        }
        (gone, Ok(()))
    }

    /// Ids of the records `matches` selects, but those a background
    /// delete is finishing.
    fn matching(
        &self,
        matches: impl Fn(&EndpointRecord) -> bool,
    ) -> Result<Vec<u16>, EndpointError> {
        Ok(self
            .store
            .endpoints()?
            .into_iter()
            .filter(|r| matches(r) && !self.deleting.contains(&r.id))
            .map(|r| r.id)
            .collect())
    }
}
