//! What the agent writes back about a policy, so that `kubectl describe`
//! shows why a policy does nothing: on `CiliumNetworkPolicy` and
//! `CiliumClusterwideNetworkPolicy` a `Valid` condition in `status.conditions`
//! (the condition Cilium's own validation uses: type, status, reason,
//! message, lastTransitionTime), on a `NetworkPolicy`, which has no status, a
//! Warning Event. The message names the field and the reason.
//!
//! Every node's agent runs the same engine on the same object, so the
//! condition does not depend on the node: [`crd_status_patch`] returns
//! nothing when the object already says the same, and a cluster of agents
//! writes it once per spec change, not once per node. Events carry the
//! reporting node; [`Reported`] keeps one agent from repeating one.

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use serde_json::{json, Value};

use crate::policy::{PolicyRefusal, PolicySource};

/// The condition type on the CRDs' status.
pub const CONDITION_VALID: &str = "Valid";
/// `reason` of a refused policy (condition and Event).
pub const REASON_REFUSED: &str = "PolicyRefused";
/// `reason` of an accepted policy.
pub const REASON_ACCEPTED: &str = "PolicyAccepted";
/// The component named in Events.
pub const COMPONENT: &str = "cilia-agent";

/// The `Valid` condition for a translation outcome; `now` is RFC 3339.
pub fn valid_condition(outcome: Result<(), &PolicyRefusal>, now: &str) -> Value {
    let (status, reason, message) = match outcome {
        Ok(()) => ("True", REASON_ACCEPTED, "policy accepted".to_string()),
        Err(r) => ("False", REASON_REFUSED, r.detail()),
    };
    json!({
        "type": CONDITION_VALID,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    })
}

/// The merge patch for the status subresource of a CRD policy object, or
/// `None` when its `Valid` condition already has this status and message.
/// Other conditions on the object are kept.
pub fn crd_status_patch(
    obj: &DynamicObject,
    outcome: Result<(), &PolicyRefusal>,
    now: &str,
) -> Option<Value> {
    let wanted = valid_condition(outcome, now);
    let existing: Vec<Value> = obj
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let same = existing.iter().any(|c| {
        c.get("type") == wanted.get("type")
            && c.get("status") == wanted.get("status")
            && c.get("message") == wanted.get("message")
    });
    if same {
        return None;
    }
    // A merge patch replaces a list whole: carry the other conditions over.
    let mut conditions: Vec<Value> = existing
        .into_iter()
        .filter(|c| c.get("type").and_then(Value::as_str) != Some(CONDITION_VALID))
        .collect();
    conditions.push(wanted);
    Some(json!({ "status": { "conditions": conditions } }))
}

/// The Event (core/v1) reporting a refused `NetworkPolicy`, to create in the
/// policy's namespace. `now` is RFC 3339 (seconds); `micro_now` the same
/// instant with microseconds, for `eventTime`.
pub fn refusal_event(refusal: &PolicyRefusal, node: &str, now: &str, micro_now: &str) -> Value {
    let s = &refusal.object;
    let namespace = s.namespace.clone().unwrap_or_else(|| "default".into());
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": format!("{}.", s.name),
            "namespace": namespace,
        },
        "involvedObject": {
            "apiVersion": "networking.k8s.io/v1",
            "kind": s.kind,
            "namespace": namespace,
            "name": s.name,
            "uid": s.uid,
            "resourceVersion": s.resource_version,
        },
        "reason": REASON_REFUSED,
        "message": format!("not enforced by cilia on node {node}: {}", refusal.detail()),
        "type": "Warning",
        "source": { "component": COMPONENT, "host": node },
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "action": "Enforce",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": micro_now,
        "count": 1,
    })
}

/// Which refusals one agent has reported, by object uid: one report per
/// spec (generation, or resourceVersion when the object has none).
#[derive(Debug, Default)]
pub struct Reported(BTreeMap<String, String>);

impl Reported {
    /// Whether `source` has not been reported in this version yet; records it.
    pub fn first_time(&mut self, source: &PolicySource) -> bool {
        let version = source
            .generation
            .map(|g| format!("g{g}"))
            .unwrap_or_else(|| format!("rv{}", source.resource_version));
        self.0.insert(source.uid.clone(), version.clone()).as_ref() != Some(&version)
    }

    /// Forgets a deleted object.
    pub fn forget(&mut self, uid: &str) {
        self.0.remove(uid);
    }
}
