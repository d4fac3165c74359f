//! Observed traffic for `cilia observe` and `cilia monitor`: recent flows
//! from the monitor's ring and live events, both as NDJSON streams
//! (`/v1/flows`, `/v1/monitor`).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{bad_request, Shared};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct StreamQuery {
    /// Only the last N matching flows of the ring (before following).
    last: Option<usize>,
    /// Keep the stream open and send new flows as they happen.
    #[serde(default)]
    follow: bool,
}

fn ndjson_line(item: &cilia_api::StreamItem) -> Result<Bytes, std::convert::Infallible> {
    let mut line = serde_json::to_vec(item).unwrap_or_default();
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// Live flows matching `filter`, as NDJSON lines; `lost` lines when the
/// listener fell behind. The guard keeps the datapath's event level up for
/// as long as the stream lives.
fn live_stream(
    state: &Shared,
    filter: cilia_api::flows::FlowMatcher,
    backlog: Vec<crate::monitor::FlowRef>,
) -> axum::body::Body {
    use futures_util::StreamExt;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    let (rx, guard) = state.monitor.subscribe(
        filter.filter().wants_traces(),
        filter.filter().wants_debug(),
    );
    let backlog = futures_util::stream::iter(
        backlog
            .into_iter()
            .map(|f| ndjson_line(&cilia_api::StreamItem::Flow(Box::new((*f).clone())))),
    );
    let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        let _keep = &guard;
        let line = match item {
            Ok(flow) if filter.matches(&flow) => Some(ndjson_line(&cilia_api::StreamItem::Flow(
                Box::new((*flow).clone()),
            ))),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(ndjson_line(&cilia_api::StreamItem::Lost { lost: n }))
            }
        };
        std::future::ready(line)
    });
    axum::body::Body::from_stream(backlog.chain(live))
}

fn ndjson(body: axum::body::Body) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// The ring's flows `filter` selects, oldest first; only the last `last`
/// of them when given. What `/v1/flows` sends before following, and this
/// node's part of `/v1/cluster/flows`.
pub(super) fn recent_matching(
    state: &super::AgentState,
    filter: &cilia_api::flows::FlowMatcher,
    last: Option<usize>,
) -> Vec<crate::monitor::FlowRef> {
    let mut recent: Vec<_> = state
        .monitor
        .recent()
        .into_iter()
        .filter(|f| filter.matches(f))
        .collect();
    if let Some(n) = last {
        let skip = recent.len().saturating_sub(n);
        recent.drain(..skip);
    }
    recent
}

#[utoipa::path(get, path = "/v1/flows", params(cilia_api::flows::FlowFilter, StreamQuery),
    responses((status = 200, description = "NDJSON: one Flow (or {\"lost\": n}) per line", body = Vec<cilia_api::Flow>),
        (status = 400, description = "A filter is invalid (an http_path that is no regular expression)", body = cilia_api::ApiError)))]
pub(super) async fn flows(
    State(state): State<Shared>,
    Query(filter): Query<cilia_api::flows::FlowFilter>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let filter = match compile(filter) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let recent = recent_matching(&state, &filter, q.last);
    if q.follow {
        return ndjson(live_stream(&state, filter, recent));
    }
    let body: Vec<u8> = recent
        .into_iter()
        .flat_map(|f| {
            ndjson_line(&cilia_api::StreamItem::Flow(Box::new((*f).clone())))
                .map(|b| b.to_vec())
                .unwrap_or_default()
        })
        .collect();
    ndjson(axum::body::Body::from(body))
}

#[utoipa::path(get, path = "/v1/monitor", params(cilia_api::flows::FlowFilter),
    responses((status = 200, description = "NDJSON stream of live events while connected", body = Vec<cilia_api::Flow>),
        (status = 400, description = "A filter is invalid (an http_path that is no regular expression)", body = cilia_api::ApiError)))]
pub(super) async fn monitor_stream(
    State(state): State<Shared>,
    Query(filter): Query<cilia_api::flows::FlowFilter>,
) -> Response {
    match compile(filter) {
        Ok(filter) => ndjson(live_stream(&state, filter, Vec::new())),
        Err(e) => e.into_response(),
    }
}

/// The filter, checked once for the whole stream; a bad one is a 400
/// naming the parameter.
pub(super) fn compile(
    filter: cilia_api::flows::FlowFilter,
) -> Result<cilia_api::flows::FlowMatcher, super::AppError> {
    filter
        .compile()
        .map_err(|e| bad_request("invalid-filter", e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use utoipa::OpenApi;

    #[test]
    fn openapi_describes_the_l7_object_and_the_http_filters() {
        let doc = serde_json::to_value(super::super::ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        assert!(
            schemas["Flow"]["properties"]["l7"].is_object(),
            "{}",
            schemas["Flow"]
        );
        assert!(schemas["FlowL7"]["properties"]["latency_us"].is_object());
        for route in ["/v1/flows", "/v1/monitor"] {
            let params: Vec<&str> = doc["paths"][route]["get"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            for name in ["types", "http_method", "http_path"] {
                assert!(params.contains(&name), "{route}: {params:?}");
            }
        }
    }
}
