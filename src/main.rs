//! The `sluicegate` command: serve, emulate, check-config.

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
    /// back (to the `--from` file, or appended to the route's live dead-letter file).
    Redrive {
        #[arg(long, short, env = "SLUICEGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A JSON-lines dead-letter file; default: every route's `dlq.file`.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Count dead letters per route and error kind.
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

/// The dead-letter files a `dlq` command reads: `--from`, or every route's `dlq.file`.
fn dlq_sources(config: &Config, from: Option<PathBuf>) -> Result<Vec<PathBuf>, String> {
    if let Some(from) = from {
        return Ok(vec![from]);
    }
    let mut files = Vec::new();
    for route in &config.routes {
        match &route.dlq {
            Some(dlq) if dlq.file.is_some() => files.extend(dlq.file.clone()),
            Some(_) => {
                return Err(format!(
                    "route {} dead-letters to SQS; receive the messages into a JSON-lines file and pass it with --from",
                    route.name
                ))
            }
            None => {}
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err("no route has a dlq.file; pass a dead-letter file with --from".to_owned());
    }
    Ok(files)
}

async fn dlq(command: DlqCommand) -> ExitCode {
    let result = match command {
        DlqCommand::Inspect { config, from } => inspect(&config, from),
        DlqCommand::Redrive { config, from } => redrive(&config, from).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(config: &Path, from: Option<PathBuf>) -> Result<ExitCode, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    let mut total = 0;
    for file in dlq_sources(&config, from)? {
        if !file.exists() {
            continue;
        }
        for letter in sluicegate::dlq::read_letters(&file)? {
            total += 1;
            *counts.entry((letter.route, letter.error_kind)).or_default() += 1;
        }
    }
    let by: Vec<serde_json::Value> = counts
        .into_iter()
        .map(|((route, kind), n)| serde_json::json!({"route": route, "error_kind": kind, "count": n}))
        .collect();
    println!(
        "{}",
        serde_json::json!({"total": total, "by_route_and_error": by})
    );
    Ok(ExitCode::SUCCESS)
}

/// Replays each source file. A route's live file is first moved aside (the running
/// server's writer follows the rotation to a fresh file), so letters written during the
/// redrive are never overwritten; what fails again is appended to the live file. A
/// `--from` file is rewritten with what failed again.
async fn redrive(config: &Path, from: Option<PathBuf>) -> Result<ExitCode, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let explicit = from.is_some();
    let mut reports = Vec::new();
    let mut any_left = false;
    for file in dlq_sources(&config, from)? {
        if !file.exists() {
            continue;
        }
        let work = if explicit {
            file.clone()
        } else {
            let aside = file.with_extension(format!("redrive-{}", std::process::id()));
            std::fs::rename(&file, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", file.display()))?;
            aside
        };
        let letters = sluicegate::dlq::read_letters(&work)?;
        let report = sluicegate::dlq::redrive::redrive(&config, letters)
            .await
            .map_err(|e| e.to_string())?;
        let written_back = if explicit {
            let tmp = work.with_extension("redrive-tmp");
            write_letters(&tmp, &report.remaining)?;
            std::fs::rename(&tmp, &work)
                .map_err(|e| format!("cannot replace {}: {e}", work.display()))?;
            work.clone()
        } else {
            if !report.remaining.is_empty() {
                let mut sink = sluicegate::dlq::FileSink::open(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                sink.write(&report.remaining)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
            std::fs::remove_file(&work)
                .map_err(|e| format!("cannot remove {}: {e}", work.display()))?;
            file.clone()
        };
        any_left |= !report.remaining.is_empty();
        reports.push(serde_json::json!({
            "file": file.display().to_string(),
            "total": report.total,
            "succeeded": report.succeeded,
            "function_errors": report.function_errors,
            "failed": report.failed,
            "failed_written_to": written_back.display().to_string(),
        }));
    }
    println!("{}", serde_json::json!({ "redrive": reports }));
    Ok(if any_left {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn write_letters(path: &Path, letters: &[sluicegate::dlq::DeadLetter]) -> Result<(), String> {
    let mut text = String::new();
    for letter in letters {
        text.push_str(&serde_json::to_string(letter).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
