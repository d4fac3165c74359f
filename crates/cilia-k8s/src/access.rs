//! What the agent asks of the API server, in one place: every resource and
//! verb the [`client`](crate::client) calls, and so exactly what the
//! ClusterRole of `install/kubernetes/cilia.yaml` grants — nothing more
//! (issue #15: "RBAC with only the verbs the agent needs"). A test parses
//! the shipped manifest and checks it against [`AGENT_ACCESS`]; a new call
//! in the agent adds its line here first.
//!
//! The calls behind each line: `list` and `watch` are [`client::run`]'s
//! list/relist and watch of each kind (no `get`: the cache is the list plus
//! the events); `patch` on the CRDs' `status` subresource is
//! [`client::report_crd_status`] (a merge patch, never an `update`);
//! `create` on core/v1 `events` is [`client::report_event`] (one Event per
//! refusal and generation, never patched). The API server's `/version`
//! (shown by `cilia status`) is no resource: every authenticated client may
//! read it (the `system:public-info-viewer` role), so it needs no grant.
//!
//! [`client::run`]: crate::client::run
//! [`client::report_crd_status`]: crate::client::report_crd_status
//! [`client::report_event`]: crate::client::report_event

/// One rule: these verbs on these resources of one API group (`""` is the
/// core group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The API group.
    pub group: &'static str,
    /// Resources (plural names; `x/status` is a subresource).
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
}

/// Everything the agent does on the API server.
pub const AGENT_ACCESS: &[Access] = &[
    Access {
        group: "",
        resources: &["pods", "namespaces"],
        verbs: &["list", "watch"],
    },
    Access {
        group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: &["list", "watch"],
    },
    Access {
        group: "cilium.io",
        resources: &["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
        verbs: &["list", "watch"],
    },
    Access {
        group: "cilium.io",
        resources: &[
            "ciliumnetworkpolicies/status",
            "ciliumclusterwidenetworkpolicies/status",
        ],
        verbs: &["patch"],
    },
    Access {
        group: "",
        resources: &["events"],
        verbs: &["create"],
    },
];

/// [`AGENT_ACCESS`] as sorted `(group, resource, verb)` triples, the form
/// two rule lists are compared in (rules may be split or merged freely).
pub fn triples(rules: &[Access]) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = rules
        .iter()
        .flat_map(|r| {
            r.resources.iter().flat_map(move |res| {
                r.verbs
                    .iter()
                    .map(move |v| (r.group.to_string(), res.to_string(), v.to_string()))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use cilia_policy::PolicyKind;

    use super::*;
    use crate::policy::api_resource;

    #[test]
    fn every_watched_policy_kind_is_listed_and_watched() {
        let t = triples(AGENT_ACCESS);
        for kind in [
            PolicyKind::NetworkPolicy,
            PolicyKind::CiliumNetworkPolicy,
            PolicyKind::CiliumClusterwideNetworkPolicy,
        ] {
            let r = api_resource(kind);
            for verb in ["list", "watch"] {
                let want = (r.group.clone(), r.plural.clone(), verb.to_string());
                assert!(t.contains(&want), "{want:?}");
            }
        }
    }

    #[test]
    fn only_the_crds_status_is_written_and_nothing_is_deleted() {
        for (group, resource, verb) in triples(AGENT_ACCESS) {
            match verb.as_str() {
                "list" | "watch" => {}
                "patch" => assert!(
                    group == "cilium.io" && resource.ends_with("/status"),
                    "{resource}"
                ),
                "create" => assert_eq!((group.as_str(), resource.as_str()), ("", "events")),
                other => panic!("unexpected verb {other} on {resource}"),
            }
        }
    }
}
