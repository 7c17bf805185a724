//! The admin listener (`server.admin_listen`, loopback by default): `/metrics`,
//! `/healthz`, `/admin/routes`, `/admin/config`, `/admin/keys/{key}`,
//! `POST /admin/keys/{key}/quota` (set a key's usage count), `POST /admin/reload`.
//!
//! With `server.admin_token` set, every path except `/metrics` and `/healthz` needs
//! `Authorization: Bearer <token>` (`401` and `WWW-Authenticate: Bearer` otherwise); the
//! token is read from the current config on each request, so a reload rotates it. A
//! listener bound to a non-loopback address without a token refuses those paths too:
//! config validation already refuses that start, and this covers a reload that drops the
//! token while the (restart-only) address stays public. `/admin/config` never shows the
//! token, a URL's password or a plan's keys (only how many there are).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::reload::Server;
use super::respond::AdminError;
use crate::config::Config;
use crate::usage::{UsageState, MAX_LIMIT};

/// Paths anyone who reaches the listener may read: scrapes and liveness probes.
const OPEN_PATHS: [&str; 2] = ["/metrics", "/healthz"];

/// `public`: the listener is bound to an address other hosts can reach.
pub(super) fn router(server: Arc<Server>, public: bool) -> Router {
    let guard = Guard {
        server: Arc::clone(&server),
        public,
    };
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/admin/routes", get(routes))
        .route("/admin/config", get(config))
        .route("/admin/keys/{key}", get(key))
        .route("/admin/keys/{key}/quota", post(set_quota))
        .route("/admin/reload", post(reload))
        .with_state(server)
        // Outside the routes, so a path that matches nothing is refused the same way and
        // does not tell a caller without the token which paths exist.
        .layer(middleware::from_fn_with_state(guard, require_token))
}

#[derive(Clone)]
struct Guard {
    server: Arc<Server>,
    public: bool,
}

async fn require_token(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let app = guard.server.app();
    match app.config.server.admin_token() {
        Some(token) if bearer_matches(request.headers(), token) => next.run(request).await,
        Some(_) => refuse(AdminError::Unauthorized(
            "this endpoint needs `Authorization: Bearer <server.admin_token>`",
        )),
        None if guard.public => refuse(AdminError::Unauthorized(
            "the admin listener is reachable from other hosts and server.admin_token is not set",
        )),
        None => next.run(request).await,
    }
}

/// An admin refusal, mapped in [`respond`](super::respond), as axum's response type (the
/// body is moved into it, not copied).
fn refuse(error: AdminError) -> Response {
    error.into_response().map(Body::new)
}

/// Whether `Authorization` is `Bearer <token>` (scheme case-insensitive, RFC 9110). The
/// token is compared in constant time, so timing does not reveal how much of a guess was
/// right.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && bool::from(given.ct_eq(token.as_bytes()))
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let Some(handle) = &server.metrics else {
        return refuse(AdminError::NoMetrics);
    };
    // State gauges are read from the live objects at scrape time, so they are never stale.
    let app = server.app();
    for route in &app.routes {
        let name = &route.config.name;
        metrics::gauge!("sluicegate_queue_depth", "route" => name.clone())
            .set(route.batcher().queue_depth() as f64);
        metrics::gauge!("sluicegate_queue_bytes", "route" => name.clone())
            .set(route.batcher().queued_bytes() as f64);
        let function = route.invoker().function().to_owned();
        let limits = route.invoker().gate().limits();
        metrics::gauge!("sluicegate_invoke_rate_limit", "function" => function.clone())
            .set(limits.rate);
        metrics::gauge!("sluicegate_invoke_concurrency_limit", "function" => function.clone())
            .set(limits.concurrency as f64);
        metrics::gauge!("sluicegate_invokes_in_flight", "function" => function)
            .set(limits.in_flight as f64);
    }
    metrics::gauge!("sluicegate_tracked_keys").set(app.admission.tracked_keys() as f64);
    let now = app.admission.wall_clock().now();
    metrics::gauge!("sluicegate_quota_keys_at_limit")
        .set(app.admission.usage_counters().at_limit(now) as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn routes(State(server): State<Arc<Server>>) -> Json<Value> {
    let app = server.app();
    let routes: Vec<_> = app
        .routes
        .iter()
        .map(|route| {
            let cfg = &route.config;
            let gate = route.invoker().gate();
            let (limits, configured) = (gate.limits(), gate.config());
            json!({
                "name": cfg.name,
                "path": cfg.path(),
                "function": cfg.function,
                "endpoint": &*app.endpoint,
                "queue_depth": route.batcher().queue_depth(),
                "queue_bytes": route.batcher().queued_bytes(),
                "max_pending": cfg.queue.max_pending,
                "limit": cfg.limit,
                "batch": { "max_records": cfg.max_records(), "max_bytes": cfg.max_bytes(), "flush": cfg.batch.flush },
                "invoke": {
                    "concurrency_limit": limits.concurrency,
                    "rate_limit": limits.rate,
                    "in_flight": limits.in_flight,
                    "configured_concurrency": configured.max_concurrency,
                    "configured_rate": configured.rate,
                    "adaptive": configured.adaptive,
                },
            })
        })
        .collect();
    Json(json!({ "routes": routes, "tracked_keys": app.admission.tracked_keys() }))
}

/// The effective config as JSON: URL passwords and the token redacted, and each plan's
/// keys replaced by their count (the keys are credentials too).
pub(super) fn redacted(config: &Config) -> Value {
    let mut shown = serde_json::to_value(config.redacted()).unwrap_or(Value::Null);
    if let Some(plans) = shown.get_mut("plans").and_then(Value::as_array_mut) {
        for (plan, config) in plans.iter_mut().zip(&config.plans) {
            plan["keys"] = json!(config.keys.len());
        }
    }
    shown
}

async fn config(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(redacted(&server.app().config))
}

/// What applies to a key: its plan, each layer's quota, and its usage quota with what the
/// key used of it this period.
async fn key(State(server): State<Arc<Server>>, Path(key): Path<String>) -> Json<Value> {
    let app = server.app();
    let usage = app
        .admission
        .usage_now(&key)
        .await
        .map(|s| usage_json(&s, &app));
    let plan = app.admission.plan_of(&key).map(str::to_owned);
    let key_quota = match &plan {
        Some(name) => app
            .config
            .plans
            .iter()
            .find(|p| &p.name == name)
            .map(|p| p.quota()),
        None => Some(app.config.limits.default.throttle()),
    };
    let routes: Vec<Value> = app
        .config
        .routes
        .iter()
        .map(|r| json!({"route": r.name, "route_limit": r.limit}))
        .collect();
    Json(json!({
        "key": key,
        "plan": plan,
        "known": plan.is_some(),
        "layers": {
            "global": app.config.limits.global,
            "routes": routes,
            "key": key_quota,
        },
        "quota": usage,
    }))
}

/// A usage quota and a key's count, as the admin API shows them.
fn usage_json(state: &UsageState, app: &super::app::App) -> Value {
    let now = app.admission.wall_clock().now();
    let reset_at = std::time::SystemTime::UNIX_EPOCH + now + state.reset;
    json!({
        "limit": state.quota.limit,
        "period": state.quota.period.as_str(),
        "offset": state.quota.offset,
        "used": state.used,
        "left": state.left(),
        "reset_at": humantime::format_rfc3339_seconds(reset_at).to_string(),
        "reset_in_secs": crate::quota::ceil_secs(state.reset),
    })
}

/// `{"used": n}`: sets the key's count in the current period (API Gateway's `UpdateUsage`;
/// `{"used": 0}` is `ResetUsage`). `404` for a key without a usage quota.
async fn set_quota(
    State(server): State<Arc<Server>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SetUsage {
        used: u64,
    }
    let used = match serde_json::from_slice::<SetUsage>(&body) {
        Ok(SetUsage { used }) if used <= MAX_LIMIT => used,
        Ok(SetUsage { used }) => {
            return refuse(AdminError::BadBody(format!(
                "used must be at most {MAX_LIMIT}, got {used}"
            )))
        }
        Err(e) => {
            return refuse(AdminError::BadBody(format!(
                "expected {{\"used\": <non-negative integer>}}: {e}"
            )))
        }
    };
    let app = server.app();
    match app.admission.set_usage(&key, used).await {
        Ok(Some(state)) => {
            Json(json!({"key": key, "quota": usage_json(&state, &app)})).into_response()
        }
        Ok(None) => refuse(AdminError::NoUsageQuota(key)),
        Err(_) => refuse(AdminError::BackendUnavailable(
            "Redis did not take the new count; it applies to this replica only until Redis \
             answers",
        )),
    }
}

async fn reload(State(server): State<Arc<Server>>) -> Response {
    match server.reload_from_source().await {
        Ok(report) => Json(json!({"reloaded": true, "restart_required": report.restart_required}))
            .into_response(),
        Err(message) => refuse(AdminError::InvalidConfig(message)),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    fn with(auth: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_str(auth).unwrap());
        headers
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let token = "t0ken";
        assert!(super::bearer_matches(&with("Bearer t0ken"), token));
        assert!(super::bearer_matches(&with("bearer t0ken"), token));
        for wrong in [
            "Bearer t0ke",
            "Bearer t0kenn",
            "Basic t0ken",
            "t0ken",
            "Bearer",
            "",
        ] {
            assert!(!super::bearer_matches(&with(wrong), token), "{wrong:?}");
        }
        assert!(!super::bearer_matches(&HeaderMap::new(), token));
    }
}
