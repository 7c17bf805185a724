//! sluicegate: an HTTP rate-limiting reverse proxy in front of AWS Lambda.
//!
//! Clients POST one JSON record per request. sluicegate admits each request per key with
//! API Gateway throttling semantics, groups admitted records into Lambda batch invokes that
//! stay inside Lambda's own limits, and hands each record's result back to its caller.
//!
//! # Layout
//! - [`config`]: the typed TOML config with `SLUICEGATE_*` overrides, validated at load.
//! - [`server`]: the data plane (hyper HTTP/1, one hand-written service), identity extraction, error → HTTP mapping, admin listener.
//! - [`limit`]: token-bucket admission (global → route → key), bounded keyed state, Tower layer.
//! - [`coalesce`]: per-route batcher (handle + worker) and the batch envelope.
//! - [`invoke`]: the `aws-sdk-lambda` client, per-function gate, Lambda error classification.
//! - [`dlq`]: dead-letter sinks (JSON-lines file, SQS) that confirm each letter, their reader,
//!   and the `dlq inspect` / `dlq redrive` commands (with the redrive lock).
//! - [`metrics`]: the Prometheus recorder and the metric names.
//! - [`pipeline`]: assembles routes: one invoker (gate) per function, one batcher per route.
//! - [`emulator`]: a local Lambda Invoke API that the real SDK talks to unchanged.
#![forbid(unsafe_code)]

pub mod aws;
pub mod backend;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod dlq;
pub mod emulator;
pub mod invoke;
pub mod limit;
pub mod metrics;
pub mod pipeline;
pub mod quota;
pub mod redact;
pub mod redrive;
pub mod server;
pub mod units;
