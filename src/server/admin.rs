//! The admin listener (`server.admin_listen`, loopback by default): `/metrics`,
//! `/admin/routes`, `/admin/config`, `/admin/keys/{key}`, `POST /admin/reload`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{respond, Shared};
use crate::config::Config;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/admin/routes", get(routes))
        .route("/admin/config", get(config))
        .route("/admin/keys/{key}", get(key))
        .route("/admin/reload", post(reload))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let Some(handle) = &shared.metrics else {
        return respond::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no metrics recorder is installed",
        );
    };
    // State gauges are read from the live objects at scrape time, so they are never stale.
    let app = shared.app();
    for route in &app.routes {
        metrics::gauge!("sluicegate_queue_depth", "route" => route.name.clone())
            .set(route.batcher.queue_depth() as f64);
        let function = route.invoker.function().to_owned();
        let limits = route.invoker.gate().limits();
        metrics::gauge!("sluicegate_invoke_rate_limit", "function" => function.clone())
            .set(limits.rate);
        metrics::gauge!("sluicegate_invoke_concurrency_limit", "function" => function.clone())
            .set(limits.concurrency as f64);
        metrics::gauge!("sluicegate_invokes_in_flight", "function" => function)
            .set(limits.in_flight as f64);
    }
    metrics::gauge!("sluicegate_tracked_keys").set(app.admission.tracked_keys() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn routes(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let app = shared.app();
    let routes: Vec<_> = app
        .config
        .routes
        .iter()
        .zip(&app.routes)
        .map(|(cfg, route)| {
            let gate = route.invoker.gate();
            let (limits, configured) = (gate.limits(), gate.config());
            json!({
                "name": cfg.name,
                "path": cfg.path(),
                "function": cfg.function,
                "endpoint": &*app.endpoint,
                "queue_depth": route.batcher.queue_depth(),
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

/// Credentials in a URL's user-info are replaced by `***`.
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_userinfo, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The effective config as JSON, secrets redacted.
pub(super) fn redacted(config: &Config) -> Value {
    let mut config = config.clone();
    config.limits.redis_url = redact_url(&config.limits.redis_url);
    if let Some(url) = &config.lambda.endpoint_url {
        config.lambda.endpoint_url = Some(redact_url(url));
    }
    serde_json::to_value(&config).unwrap_or(Value::Null)
}

async fn config(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(redacted(&shared.app().config))
}

/// What applies to a key: its plan and each layer's quota.
async fn key(State(shared): State<Arc<Shared>>, Path(key): Path<String>) -> Json<Value> {
    let app = shared.app();
    let plan = app.admission.plan_of(&key).map(str::to_owned);
    let key_quota = match &plan {
        Some(name) => app
            .config
            .plans
            .iter()
            .find(|p| &p.name == name)
            .map(|p| p.quota()),
        None => Some(app.config.limits.default),
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
    }))
}

async fn reload(State(shared): State<Arc<Shared>>) -> Response {
    match shared.reload_from_source().await {
        Ok(report) => Json(json!({"reloaded": true, "restart_required": report.restart_required}))
            .into_response(),
        Err(message) => respond::error(StatusCode::BAD_REQUEST, "invalid_config", message),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_credentials_are_redacted() {
        assert_eq!(
            super::redact_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            super::redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
