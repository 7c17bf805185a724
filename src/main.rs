//! The `sluicegate` command: serve, emulate, check-config, dlq (inspect / redrive; the
//! work is in `sluicegate::dlq::command`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluicegate::config::{Config, DEFAULT_CONFIG_TOML};

const DEFAULT_CONFIG_PATH: &str = "config/sluicegate.toml";

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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICEGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// The config for `serve` and the file it came from: the given file, else
/// `config/sluicegate.toml`, else the compiled-in copy of it (so the binary runs anywhere
/// out of the box; there is then no file to reload from).
fn load_serve_config(path: Option<PathBuf>) -> Result<(Config, Option<PathBuf>), String> {
    match path {
        Some(path) => Config::load(&path)
            .map(|c| (c, Some(path)))
            .map_err(|e| e.to_string()),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            let path = PathBuf::from(DEFAULT_CONFIG_PATH);
            Config::load(&path)
                .map(|c| (c, Some(path)))
                .map_err(|e| e.to_string())
        }
        None => {
            tracing::info!("{DEFAULT_CONFIG_PATH} not found; using the built-in default config");
            Config::from_toml_with_env(DEFAULT_CONFIG_TOML, "<built-in default>", std::env::vars())
                .map(|c| (c, None))
                .map_err(|e| e.to_string())
        }
    }
}

/// SIGHUP, as a stream of reload requests.
fn reload_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
                return;
            }
        };
        while hup.recv().await.is_some() {
            // A reload already pending covers this one too.
            let _ = tx.try_send(());
        }
    });
    #[cfg(not(unix))]
    drop(tx);
    rx
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
    let command = cli.command.unwrap_or(Command::Serve { config: None });
    match command {
        Command::CheckConfig { file, discover } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", config.to_toml());
                eprintln!("{}: OK", file.display());
                if discover {
                    return runtime.block_on(discover_findings(config));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Dlq { command } => runtime.block_on(dlq(command)),
        Command::Serve { config } => {
            let (config, source) = match load_serve_config(config) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = runtime.block_on(async move {
                sluicegate::server::run(config, source, shutdown_signal(), reload_signals()).await
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Emulate { config } => {
            let emulator = match Config::load_for_emulator(&config) {
                Ok(emulator) => emulator,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(sluicegate::emulator::serve(emulator, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: emulator: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `check-config --discover`: prints findings; fails only when `lambda.strict` would refuse.
async fn discover_findings(mut config: Config) -> ExitCode {
    let mut emulator = None;
    if config.targets_embedded_emulator() {
        let mut emulator_config = config.emulator.clone();
        emulator_config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        match tokio::net::TcpListener::bind(emulator_config.listen).await {
            Ok(listener) => match sluicegate::emulator::spawn(emulator_config, listener).await {
                Ok(running) => {
                    config.retarget_embedded_emulator(&running.endpoint_url());
                    emulator = Some(running);
                }
                Err(e) => {
                    eprintln!("warning: cannot start the embedded emulator for discovery: {e}")
                }
            },
            Err(e) => eprintln!("warning: cannot start the embedded emulator for discovery: {e}"),
        }
    }
    let client = sluicegate::invoke::build_client(&config.lambda).await;
    let findings = sluicegate::invoke::discover::discover(&client, &config).await;
    drop(emulator);
    if findings.is_empty() {
        eprintln!("discovery: every route fits its function");
        return ExitCode::SUCCESS;
    }
    for finding in &findings {
        eprintln!("finding: {finding}");
    }
    if config.lambda.strict {
        eprintln!("lambda.strict = true: serve would refuse to start");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn dlq(command: DlqCommand) -> ExitCode {
    use sluicegate::dlq::command;
    let result = match command {
        DlqCommand::Inspect { config, from } => {
            load(&config).and_then(|config| command::inspect(&config, from))
        }
        DlqCommand::Redrive {
            config,
            from,
            rate,
            concurrency,
        } => match load(&config) {
            Ok(config) => {
                let limits = command::RedriveLimits { rate, concurrency };
                command::redrive_files(config, from, limits).await
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(report) => {
            println!("{}", report.json);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: &Path) -> Result<Config, String> {
    Config::load(config).map_err(|e| e.to_string())
}
