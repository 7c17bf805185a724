//! The `sluicegate` command: serve, emulate, check-config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluicegate::config::{Config, DEFAULT_CONFIG_TOML};

const DEFAULT_CONFIG_PATH: &str = "config/sluicegate.toml";

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

/// The config for `serve`: the given file, else `config/sluicegate.toml`, else the
/// compiled-in copy of it (so the binary runs anywhere out of the box).
fn load_serve_config(path: Option<PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(&path).map_err(|e| e.to_string()),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(Path::new(DEFAULT_CONFIG_PATH)).map_err(|e| e.to_string())
        }
        None => {
            tracing::info!("{DEFAULT_CONFIG_PATH} not found; using the built-in default config");
            Config::from_toml_with_env(DEFAULT_CONFIG_TOML, "<built-in default>", std::env::vars())
                .map_err(|e| e.to_string())
        }
    }
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
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                print!("{}", config.to_toml());
                eprintln!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let config = match load_serve_config(config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(sluicegate::server::run(config, shutdown_signal())) {
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
