//! The `sluicegate` command: parses arguments, runs the subcommand (the work is in
//! `sluicegate::commands`) and turns its result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluicegate::commands::{self, dlq::RedriveLimits, serve::DEFAULT_CONFIG_PATH};

/// mimalloc: the request path allocates many small, short-lived objects (headers, bodies,
/// futures) across threads; measured in BENCHMARKS.md against the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "sluicegate",
    version,
    about = "Rate-limiting HTTP proxy that batches records into AWS Lambda invokes"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICEGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the data plane (the default when no command is given).
    Serve {
        /// Config file. When the default path does not exist, the built-in default config is used.
        #[arg(long, short, env = "SLUICEGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Serve only the `[emulator]` section of the config file: a local Lambda Invoke API.
    Emulate {
        #[arg(long, short, env = "SLUICEGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (with environment overrides).
    CheckConfig {
        /// Config file to check.
        file: PathBuf,
        /// Also ask Lambda about each route's function (timeout, reserved concurrency) and
        /// print what does not fit. With the embedded emulator, it is started for the check.
        #[arg(long)]
        discover: bool,
    },
    /// Dead letters: inspect them, or replay them through the same limits.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Replay dead letters and report what succeeded. Letters that fail again are written
    /// back (to the `--from` file, or appended to the route's live dead-letter file); lines
    /// that are not letters are skipped, reported and kept in `<file>.unparsable`. Takes
    /// `<file>.lock`: a second redrive of the same file refuses to start.
    ///
    /// The redrive has its own invoke gate: beside a running server, which has another,
    /// pass `--rate`/`--concurrency` low enough that both together fit the function.
    Redrive {
        #[arg(long, short, env = "SLUICEGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A JSON-lines dead-letter file; default: every route's `dlq.file`.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Invokes per second; default (and maximum) each route's `invoke.rate`.
        #[arg(long)]
        rate: Option<f64>,
        /// Invokes in flight; default (and maximum) each route's `invoke.max_concurrency`.
        #[arg(long)]
        concurrency: Option<u32>,
    },
    /// Count dead letters per route and error kind, and report lines that are not letters.
    Inspect {
        #[arg(long, short, env = "SLUICEGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging(matches!(cli.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve { config: None }) {
            Command::Serve { config } => commands::serve::serve(config).await,
            Command::Emulate { config } => commands::serve::emulate(&config).await,
            Command::CheckConfig { file, discover } => {
                commands::check::check_config(&file, discover).await
            }
            Command::Dlq {
                command: DlqCommand::Inspect { config, from },
            } => commands::dlq::inspect_command(&config, from),
            Command::Dlq {
                command:
                    DlqCommand::Redrive {
                        config,
                        from,
                        rate,
                        concurrency,
                    },
            } => {
                let limits = RedriveLimits { rate, concurrency };
                commands::dlq::redrive_command(&config, from, limits).await
            }
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
