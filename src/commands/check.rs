//! `sluicegate check-config`: validates a config file and prints the effective config
//! (environment overrides applied, secrets redacted); with `--discover`, also asks Lambda
//! about each route's function and prints what does not fit.

use std::path::Path;

use crate::aws;
use crate::config::Config;

/// Prints the effective config on stdout and `<file>: OK` on stderr; `Ok(false)` only when
/// `discover` found something that `lambda.strict` would refuse to start with.
pub async fn check_config(file: &Path, discover: bool) -> Result<bool, String> {
    let config = Config::load(file).map_err(|e| e.to_string())?;
    print!("{}", config.to_toml());
    eprintln!("{}: OK", file.display());
    if !discover {
        return Ok(true);
    }
    Ok(discover_findings(config).await)
}

/// `check-config --discover`: prints findings; fails only when `lambda.strict` would refuse.
///
/// With the embedded emulator as the Lambda endpoint it is started for the check, on a free
/// port, so a running server's emulator does not stand in the way.
async fn discover_findings(mut config: Config) -> bool {
    let mut emulator = None;
    if config.targets_embedded_emulator() {
        // `emulator.listen` itself stays: it is what `lambda.endpoint_url` names.
        let free_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let started = match tokio::net::TcpListener::bind(free_port).await {
            Ok(listener) => aws::start_embedded_emulator(&mut config, listener).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(embedded) => emulator = Some(embedded),
            Err(e) => eprintln!("warning: cannot start the embedded emulator for discovery: {e}"),
        }
    }
    let client = crate::invoke::build_client(&config.lambda).await;
    let findings = match &client {
        Ok(client) => crate::invoke::discover::discover(client.sdk(), &config).await,
        Err(e) => {
            eprintln!("error: {e}");
            return false;
        }
    };
    drop(emulator);
    if findings.is_empty() {
        eprintln!("discovery: every route fits its function");
        return true;
    }
    for finding in &findings {
        eprintln!("finding: {finding}");
    }
    if config.lambda.strict {
        eprintln!("lambda.strict = true: serve would refuse to start");
        false
    } else {
        true
    }
}
