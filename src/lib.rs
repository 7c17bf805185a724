//! sluicegate: an HTTP rate-limiting reverse proxy in front of AWS Lambda.
//!
//! Clients POST one JSON record per request. sluicegate admits each request per key with
//! API Gateway throttling semantics, groups admitted records into Lambda batch invokes that
//! stay inside Lambda's own limits, and hands each record's result back to its caller.
//!
//! # Layout
//! Modules are listed from the top down; each one uses only modules below it (tests aside).
//! - [`commands`]: what each `sluicegate` subcommand does (`main.rs` only parses arguments).
//! - [`server`]: the data plane (hyper HTTP/1, one hand-written service), identity extraction, error → HTTP mapping, admin listener.
//! - [`idempotency`]: `Idempotency-Key`: at most one processing per key, joins, stored
//!   outcomes for replay (local, bounded; shared through Redis).
//! - [`redrive`]: replays dead letters through a pipeline with the routes' own limits.
//! - [`pipeline`]: assembles routes: one invoker (gate) per function, one batcher per route.
//! - [`coalesce`]: per-route batcher (handle + worker) and the batch envelope.
//! - [`dlq`]: dead-letter sinks (JSON-lines file, SQS) that confirm each letter, their reader
//!   and the redrive lock; storage only.
//! - [`limit`]: token-bucket admission (global → route → key), bounded keyed state, Tower layer.
//! - [`invoke`]: the `aws-sdk-lambda` client, per-function gate, Lambda error classification.
//! - [`backend`]: the Redis backend that shares admission and invoke-rate buckets across replicas.
//! - [`aws`]: the SDK config shared by the Lambda and SQS clients; starting the embedded emulator as Lambda.
//! - [`config`]: the typed TOML config with `SLUICEGATE_*` overrides, validated at load.
//! - [`emulator`]: a local Lambda Invoke API that the real SDK talks to unchanged.
//! - [`metrics`]: the Prometheus recorder and the metric names.
//! - [`quota`]: the token-bucket vocabulary (a bucket's `Quota` and its `Decision`), the one
//!   whole-seconds rounding, and the adjustable bucket of the invoke gate and the emulator.
//! - [`usage`]: the usage-plan quota vocabulary (`limit` requests per UTC day, week or month)
//!   and its period arithmetic.
//! - [`lambda`]: what AWS Lambda itself allows (payload limits), for the proxy and the emulator.
//! - [`units`]: durations and byte sizes written in human units.
//! - [`redact`]: secrets (URL user-info, the admin token) out of printed config and logs.
#![forbid(unsafe_code)]

pub mod aws;
pub mod backend;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod dlq;
pub mod emulator;
pub mod idempotency;
pub mod invoke;
pub mod lambda;
pub mod limit;
pub mod metrics;
pub mod pipeline;
pub mod quota;
pub mod redact;
pub mod redrive;
pub mod server;
pub mod units;
pub mod usage;
