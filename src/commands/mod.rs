//! What each `sluicegate` subcommand does, so that `main.rs` only parses arguments and
//! turns results into exit codes.
//!
//! Every command returns `Ok(true)` when it fully succeeded, `Ok(false)` when it ran but
//! its result is a failure (a redrive that left letters, `check-config --discover` findings
//! that `lambda.strict` would refuse), and `Err(message)` when it could not run; `main`
//! prints the message as `error: <message>` and exits non-zero for both failures.
//!
//! - [`serve`]: `serve` (config file or built-in default, signals, reload) and `emulate`.
//! - [`check`]: `check-config`, with `--discover` asking Lambda about each route's function.
//! - [`dlq`]: `dlq inspect` and `dlq redrive` over dead-letter files.

pub mod check;
pub mod dlq;
pub mod serve;

/// Logs to stderr, filtered by `SLUICEGATE_LOG` (else `RUST_LOG`, else `info`): text, or
/// one JSON object per line with `json`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICEGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
