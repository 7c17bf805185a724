//! `sluicegate serve` and `sluicegate emulate`: which config to load, and the process
//! signals — SIGTERM/SIGINT to drain and stop, SIGHUP to reload.

use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_CONFIG_TOML};

/// The config file commands read when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/sluicegate.toml";

/// `serve`: loads the config ([`load_config`]) and serves until SIGTERM/SIGINT, reloading
/// on SIGHUP.
pub async fn serve(path: Option<PathBuf>) -> Result<bool, String> {
    let (config, source) = load_config(path)?;
    crate::server::run(config, source, shutdown_signal(), reload_signals())
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

/// `emulate`: serves only the file's `[emulator]` section until SIGTERM/SIGINT.
pub async fn emulate(path: &Path) -> Result<bool, String> {
    let emulator = Config::load_for_emulator(path).map_err(|e| e.to_string())?;
    crate::emulator::serve(emulator, shutdown_signal())
        .await
        .map_err(|e| format!("emulator: {e}"))?;
    Ok(true)
}

/// The config for `serve` and the file it came from: the given file, else
/// [`DEFAULT_CONFIG_PATH`], else the compiled-in copy of it (so the binary runs anywhere
/// out of the box; there is then no file to reload from).
pub fn load_config(path: Option<PathBuf>) -> Result<(Config, Option<PathBuf>), String> {
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

/// Resolves on the first SIGINT or SIGTERM. A signal that cannot be listened for is logged
/// and never fires, so the other one still stops the process.
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
