//! Policy as users manage and question it: import, list and delete policy
//! documents, trace a flow, list identities and namespace labels
//! (`/v1/policy`, `/v1/identities`, `/v1/namespaces`).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use cilia_api::{
    ApiError, Identity, Namespace, PolicyChange, PolicyDocument, PolicyImport, PolicyList,
    TraceHttpRequest, TraceL7, TraceRequest, TraceResponse, TraceStep,
};
use cilia_policy::l7::SimpleRequest;
use serde::Deserialize;

use super::{bad_request, json_body, with_endpoints, with_policy, AppError, Shared};
use crate::endpoint::EndpointError;
use crate::policy::repository::PolicyState;

#[utoipa::path(post, path = "/v1/policy", request_body = PolicyImport,
    responses((status = 200, body = PolicyChange), (status = 400, body = ApiError, description = "invalid policy: file, document, field and reason, or a policy limit passed"),
        (status = 413, body = ApiError, description = "body over MAX_BODY_BYTES (8 MiB), code body-too-large")))]
pub(super) async fn import_policy(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<PolicyChange>, AppError> {
    let req: PolicyImport = json_body(&body)?;
    let mut l7 = state.l7_summary.clone();
    let mut change = with_policy(&state, move |policy| {
        policy.import_policies(&req.source, &req.yaml)
    })
    .await?;
    // An import that brings HTTP rules (the first ones start the proxy):
    // until the proxy enforces them, the flows it must see are dropped
    // (fail closed). Answer once it enforces the policy this import
    // published, so the caller's next connection is served; if it does not
    // within the wait, the answer says so.
    let summary = l7.borrow_and_update().clone();
    if summary.needed() {
        if let Err(note) = crate::proxy::wait_enforcing(
            state.proxy_covered.clone(),
            state.proxy.clone(),
            summary.generation,
            super::PROXY_START_WAIT,
        )
        .await
        {
            tracing::warn!("{note}");
            change.notes.push(note);
        }
    }
    Ok(Json(change))
}

#[utoipa::path(get, path = "/v1/policy", responses((status = 200, body = PolicyList)))]
pub(super) async fn get_policy(State(state): State<Shared>) -> Result<Json<PolicyList>, AppError> {
    with_policy(&state, |mgr| {
        Ok(PolicyList {
            revision: mgr.policy_revision()?,
            policies: mgr
                .policy_documents()
                .into_iter()
                .map(|p| PolicyDocument {
                    kind: p.kind,
                    namespace: p.namespace,
                    name: p.name,
                    yaml: p.yaml,
                    source: p.origin.unwrap_or_else(|| "local".into()),
                })
                .collect(),
            errors: mgr.policy_errors().to_vec(),
        })
    })
    .await
    .map(Json)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct PolicyDeleteQuery {
    /// Policy name (all kinds and namespaces unless `namespace` is given).
    name: Option<String>,
    namespace: Option<String>,
    /// Delete every policy.
    #[serde(default)]
    all: bool,
}

#[utoipa::path(delete, path = "/v1/policy", params(PolicyDeleteQuery),
    responses((status = 200, body = PolicyChange), (status = 404, body = ApiError)))]
pub(super) async fn delete_policy(
    State(state): State<Shared>,
    Query(q): Query<PolicyDeleteQuery>,
) -> Result<Json<PolicyChange>, AppError> {
    if q.name.is_none() && !q.all {
        return Err(bad_request(
            "invalid-request",
            "give a policy name or all=true",
        ));
    }
    with_policy(&state, move |mgr| {
        let (revision, policies) =
            mgr.delete_policies(q.name.as_deref(), q.namespace.as_deref())?;
        Ok(PolicyChange {
            revision,
            policies,
            ..Default::default()
        })
    })
    .await
    .map(Json)
}

fn verdict_name(v: cilia_policy::Verdict) -> String {
    match v {
        cilia_policy::Verdict::Allow => "ALLOWED".into(),
        cilia_policy::Verdict::Deny => "DENIED".into(),
    }
}

#[utoipa::path(post, path = "/v1/policy/trace", request_body = TraceRequest,
    responses((status = 200, body = TraceResponse), (status = 400, body = ApiError)))]
pub(super) async fn trace_policy(
    State(state): State<Shared>,
    body: Bytes,
) -> Result<Json<TraceResponse>, AppError> {
    let req: TraceRequest = json_body(&body)?;
    let (port, proto) =
        cilia_api::parse_port_proto(&req.dport).map_err(|e| bad_request("invalid-trace", e))?;
    let http = match &req.http {
        Some(h) => Some(http_request(h)?),
        None => None,
    };
    with_policy(&state, move |mgr| {
        let t = mgr.trace(&req.src, &req.dst, proto, port, req.datapath)?;
        let l7 = l7_steps(mgr, &t, proto, port, http.as_ref())?;
        let http_verdict = match (&http, t.verdict) {
            (Some(_), cilia_policy::Verdict::Allow) => Some(
                if l7
                    .iter()
                    .flatten()
                    .any(|s| s.verdict.as_deref() == Some("DENIED"))
                {
                    "DENIED"
                } else {
                    "ALLOWED"
                }
                .to_string(),
            ),
            _ => None,
        };
        Ok(TraceResponse {
            http_verdict,
            src: t.src.description.clone(),
            src_identity: t.src.identity,
            dst: t.dst.description.clone(),
            dst_identity: t.dst.identity,
            verdict: verdict_name(t.verdict),
            steps: t
                .steps
                .iter()
                .zip(l7)
                .map(|(s, l7)| TraceStep {
                    direction: match s.direction {
                        cilia_policy::Direction::Ingress => "ingress".into(),
                        cilia_policy::Direction::Egress => "egress".into(),
                    },
                    subject: s.subject.clone(),
                    verdict: verdict_name(s.verdict),
                    reason: s.reason.clone(),
                    rules: s.rules.clone(),
                    l7,
                })
                .collect(),
            // A flow the program sent to the proxy was allowed by it: the
            // test run's drop only says it could not reach the socket.
            datapath: t.datapath.map(|v| {
                if v == cilia_datapath::testrun::TC_ACT_SHOT && !t.datapath_to_proxy {
                    "DENIED"
                } else {
                    "ALLOWED"
                }
                .into()
            }),
        })
    })
    .await
    .map(Json)
}

/// The request of `--http-*`, checked: header lines must be `Name: value`.
fn http_request(h: &TraceHttpRequest) -> Result<SimpleRequest, AppError> {
    let bad = |m: String| bad_request("invalid-trace", m);
    if h.method.trim().is_empty() {
        return Err(bad("http.method: missing".into()));
    }
    if !h.path.starts_with('/') && h.path != "*" {
        return Err(bad(format!(
            "http.path: {:?} must start with / (path and query)",
            h.path.chars().take(40).collect::<String>()
        )));
    }
    let mut headers = Vec::with_capacity(h.headers.len());
    for (i, line) in h.headers.iter().enumerate() {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!(
                "http.headers[{i}]: {:?} is not `Name: value`",
                line.chars().take(40).collect::<String>()
            )));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(SimpleRequest {
        method: h.method.trim().to_string(),
        path: h.path.clone(),
        host: h.host.clone(),
        headers,
    })
}

/// The L7 side of each step of a trace (one per step, `None` where the
/// flow is denied or not TCP): resolved again from the policies and
/// identities, the resolution the merged policy of an endpoint equals.
fn l7_steps(
    mgr: &PolicyState,
    t: &crate::policy::repository::Trace,
    proto: u8,
    port: u16,
    http: Option<&SimpleRequest>,
) -> Result<Vec<Option<TraceL7>>, EndpointError> {
    const TCP: u8 = 6;
    if proto != TCP
        || t.steps
            .iter()
            .all(|s| s.verdict != cilia_policy::Verdict::Allow)
    {
        return Ok(t.steps.iter().map(|_| None).collect());
    }
    let mut cache = mgr.identity_cache()?;
    for p in [&t.src, &t.dst] {
        if let Some(labels) = &p.labels {
            if cache.labels(p.identity).is_none() {
                cache.insert_labels(p.identity, cilia_policy::Labels(labels.clone()));
            }
        }
    }
    let policies = mgr.policies();
    let mut out = Vec::with_capacity(t.steps.len());
    for s in &t.steps {
        let (subject, peer) = match s.direction {
            cilia_policy::Direction::Egress => (&t.src, &t.dst),
            cilia_policy::Direction::Ingress => (&t.dst, &t.src),
        };
        let Some(labels) = subject
            .labels
            .as_ref()
            .filter(|_| s.verdict == cilia_policy::Verdict::Allow)
        else {
            out.push(None);
            continue;
        };
        let resolved =
            cilia_policy::resolve(&policies, &cilia_policy::Labels(labels.clone()), &cache);
        let h = cilia_policy::trace_http(
            &resolved,
            s.direction,
            peer.identity,
            proto,
            port,
            http.map(|r| r as &dyn cilia_policy::l7::RequestView),
        );
        out.push(Some(TraceL7 {
            redirected: h.redirected,
            verdict: h
                .allowed
                .map(|a| if a { "ALLOWED" } else { "DENIED" }.to_string()),
            matched: h.matched.map(|m| m.to_string()),
            reason: h.reason,
            rules: h.l7.map(|l| l.rule_names()).unwrap_or_default(),
        }));
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/identities", responses((status = 200, body = Vec<Identity>)))]
pub(super) async fn list_identities(
    State(state): State<Shared>,
) -> Result<Json<Vec<Identity>>, AppError> {
    with_policy(&state, |mgr| mgr.identities()).await.map(Json)
}

#[utoipa::path(get, path = "/v1/identities/{id}", params(("id" = u32, Path)),
    responses((status = 200, body = Identity), (status = 404, body = ApiError)))]
pub(super) async fn get_identity(
    State(state): State<Shared>,
    Path(id): Path<u32>,
) -> Result<Json<Identity>, AppError> {
    let all = with_policy(&state, |mgr| mgr.identities()).await?;
    all.into_iter()
        .find(|i| i.id == id)
        .map(Json)
        .ok_or_else(|| {
            AppError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("identity {id} not found"),
            )
        })
}

#[utoipa::path(get, path = "/v1/namespaces", responses((status = 200, body = Vec<Namespace>)))]
pub(super) async fn list_namespaces(
    State(state): State<Shared>,
) -> Result<Json<Vec<Namespace>>, AppError> {
    with_policy(&state, |mgr| {
        Ok(mgr
            .namespaces()?
            .into_iter()
            .map(|(name, labels)| Namespace { name, labels })
            .collect())
    })
    .await
    .map(Json)
}

#[utoipa::path(put, path = "/v1/namespaces/{name}", params(("name" = String, Path)), request_body = Namespace,
    responses((status = 200, body = Namespace), (status = 400, body = ApiError)))]
pub(super) async fn set_namespace(
    State(state): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Namespace>, AppError> {
    let req: Namespace = json_body(&body)?;
    with_endpoints(&state, move |mgr| {
        mgr.set_namespace(&name, &req.labels)?;
        Ok(Namespace {
            name,
            labels: req.labels,
        })
    })
    .await
    .map(Json)
}
