//! What a request needs, built from one config: the routes (each with its config, its
//! batcher and invoker, and its data-plane endpoint), identity, admission and readiness.
//!
//! An [`App`] is immutable and replaced whole on reload. Its routes are one list: a route's
//! config, its pipeline and its endpoint live in the same [`RouteEntry`], and the admission
//! layer's route index is the entry's position, handed to the endpoint when it is built.

use std::sync::Arc;
use std::time::Duration;

use super::identity::Identify;
use super::lambda_api::Targets;
use super::parseable;
use super::readiness::Readiness;
use super::records::{Endpoint, RecordRoute};
use crate::coalesce::{Batcher, KeyWeights};
use crate::config::{Config, RouteConfig};
use crate::idempotency::Idempotency;
use crate::invoke::Invoker;
use crate::limit::{Admission, DefaultClock, Plans, RedisBackend};
use crate::pipeline::Pipeline;

/// One route of an app: its config, what its records go through, and how the data plane
/// serves it.
pub(super) struct RouteEntry {
    /// The route's section of the app's config.
    pub(super) config: RouteConfig,
    /// The route as the record path sees it (batcher, invoker, per-record limits).
    pub(super) record: Arc<RecordRoute>,
    /// The route's data-plane endpoint: path, admission stack, counters.
    pub(super) endpoint: Endpoint,
}

impl RouteEntry {
    pub(super) fn batcher(&self) -> &Batcher {
        &self.record.batcher
    }

    pub(super) fn invoker(&self) -> &Arc<Invoker> {
        &self.record.invoker
    }
}

/// Everything a request needs; replaced whole on reload.
pub(super) struct App {
    /// The routes in config order; a route's position is its admission route index.
    pub(super) routes: Vec<RouteEntry>,
    pub(super) identify: Identify,
    pub(super) admission: Arc<Admission<DefaultClock>>,
    pub(super) readiness: Readiness,
    pub(super) config: Config,
    /// See [`endpoint_label`](super::endpoint_label).
    pub(super) endpoint: Arc<str>,
    /// Which route each function reachable through the Lambda Invoke API resolves to.
    pub(super) invoke_targets: Targets,
    /// The `Idempotency-Key` store: handed from app to app on reload, so its entries (the
    /// in-flight ones above all) survive it.
    pub(super) idempotency: Arc<Idempotency>,
}

/// The admission layers of `config`, decided in Redis when `backend` is given (the
/// pipeline's, so admission and invoke gates share one connection and one health state).
/// With a previous admission (reload), bucket state is carried over where the quotas did
/// not change.
fn build_admission(
    config: &Config,
    previous: Option<&Admission<DefaultClock>>,
    backend: Option<RedisBackend>,
) -> Arc<Admission<DefaultClock>> {
    let global = config.limits.global;
    let routes = config
        .routes
        .iter()
        .map(|r| (r.name.clone(), r.limit))
        .collect();
    let plans = Plans::new(
        config.limits.default.throttle(),
        config
            .plans
            .iter()
            .map(|p| (p.name.clone(), p.quota(), p.keys.clone()))
            .collect(),
    )
    .with_usage_quotas(
        config.limits.default.quota,
        config.plans.iter().map(|p| p.quota),
    );
    let max_keys = config.limits.max_keys;
    let admission = match previous {
        Some(previous) => previous.reconfigured(global, routes, plans, max_keys),
        None => Admission::new(global, routes, plans, max_keys, DefaultClock::default()),
    };
    Arc::new(admission.with_backend(backend))
}

/// Whether a route's records can keep flowing through the same batcher and gate.
fn same_pipeline(a: &RouteConfig, b: &RouteConfig) -> bool {
    let strip = |r: &RouteConfig| RouteConfig {
        limit: None,
        path: None,
        ..r.clone()
    };
    strip(a) == strip(b)
}

impl App {
    /// Builds the app for `config`. With `previous` (a reload), routes whose pipeline did
    /// not change keep their batcher, every function keeps its invoker (and gate), and
    /// admission carries its bucket state over (see the module docs of `server`).
    pub(super) async fn build(
        config: Config,
        client: &crate::invoke::LambdaClient,
        endpoint: Arc<str>,
        previous: Option<&App>,
    ) -> std::io::Result<Arc<App>> {
        // A reload keeps the Redis connection (and its health state) when [limits] did not
        // change how to reach it.
        let backend = crate::pipeline::limit_backend(
            &config.limits,
            previous.and_then(|p| p.admission.backend()),
        )
        .await?;
        // One invoker (and gate) per function for the life of the process: the batchers a
        // reload replaces drain on the same permits as their successors.
        let previous_invokers: Vec<Arc<Invoker>> = previous
            .map(|p| p.routes.iter().map(|r| Arc::clone(r.invoker())).collect())
            .unwrap_or_default();
        let pipeline =
            Pipeline::build_with(&config, client, true, backend, &previous_invokers).await?;
        let admission = build_admission(
            &config,
            previous.map(|p| &*p.admission),
            pipeline.limit_backend.clone(),
        );
        let idempotency = Arc::new(
            Idempotency::new(
                &config.idempotency,
                &config.limits,
                record_life(&config),
                previous.map(|p| &*p.idempotency),
            )
            .map_err(std::io::Error::other)?,
        );
        let mut routes = Vec::with_capacity(config.routes.len());
        let weights = Arc::new(KeyWeights::from_plans(&config.plans));
        for (index, (handle, cfg)) in pipeline.routes.into_iter().zip(&config.routes).enumerate() {
            let kept = previous.and_then(|p| {
                let old = p.routes.iter().find(|r| r.config.name == cfg.name)?;
                same_pipeline(&old.config, cfg)
                    .then(|| (old.batcher().clone(), Arc::clone(old.invoker())))
            });
            let (batcher, invoker) = kept.unwrap_or((handle.batcher, handle.invoker));
            let record = Arc::new(RecordRoute {
                name: cfg.name.clone(),
                batcher,
                invoker,
                request_timeout: cfg.request_timeout(&config.server),
                max_record_bytes: config.server.max_record_bytes.as_usize(),
                max_json_depth: parseable::record_depth_limit(
                    config.server.max_json_depth,
                    cfg.envelope,
                ),
                body_read_timeout: config.server.body_read_timeout,
                weights: Arc::clone(&weights),
                idempotency: Arc::clone(&idempotency),
            });
            routes.push(RouteEntry {
                config: cfg.clone(),
                endpoint: Endpoint::new(cfg.path(), index, Arc::clone(&record), &admission),
                record,
            });
        }
        let functions: Vec<String> = config.routes.iter().map(|r| r.function.clone()).collect();
        Ok(Arc::new(App {
            routes,
            identify: Identify::new(&config.identity),
            invoke_targets: Targets::new(&config),
            admission,
            readiness: Readiness::new(client.sdk().clone(), functions, Arc::clone(&endpoint)),
            config,
            endpoint,
            idempotency,
        }))
    }
}

/// The longest a submitted record can wait for its outcome: the longest caller deadline of
/// any route, plus one invoke begun just before it (connect and read timeouts) and a margin
/// for the dead-letter sink's confirmation. An idempotency claim lives at least this long.
fn record_life(config: &Config) -> Duration {
    let deadline = config
        .routes
        .iter()
        .map(|route| route.request_timeout(&config.server))
        .max()
        .unwrap_or(config.server.request_timeout);
    deadline + config.lambda.connect_timeout + config.lambda.read_timeout + Duration::from_secs(10)
}
