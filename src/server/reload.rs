//! The running server's shared state ([`Server`]: the current app and how to build the next
//! one) and live reload: validate the new config, hold back what needs a restart and report
//! it, build the next [`App`] from the current one, swap it in.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;

use super::app::App;
use crate::coalesce::Closer;
use crate::config::Config;

/// What the listeners share: the current app, and how to build the next one.
pub(super) struct Server {
    /// Read on every request: an `ArcSwap` loads without writing to a lock word that both
    /// cores would fight over.
    pub(super) app: ArcSwap<App>,
    pub(super) client: crate::invoke::LambdaClient,
    /// Where reloads read from; `None` when started from an in-memory config.
    pub(super) source: Option<PathBuf>,
    /// Every batcher ever built, so shutdown can close the ones still draining after a reload.
    pub(super) closers: parking_lot::Mutex<Vec<Closer>>,
    pub(super) metrics: Option<PrometheusHandle>,
    /// The embedded emulator's actual URL when it runs, so a reloaded config that names
    /// it keeps pointing at it (see [`Config::targets_embedded_emulator`]).
    pub(super) emulator_url: Option<String>,
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Changed settings that only take effect after a restart (they were left as they are).
    pub restart_required: Vec<String>,
}

impl Server {
    pub(super) fn app(&self) -> Arc<App> {
        self.app.load_full()
    }

    /// Points the Lambda endpoint at the embedded emulator the way `start` did: only when
    /// the reloaded config names it.
    fn fix_endpoint(&self, config: &mut Config) {
        if let Some(actual) = &self.emulator_url {
            config.retarget_embedded_emulator(actual);
        }
    }

    pub(super) async fn reload_from_source(&self) -> Result<ReloadReport, String> {
        let Some(path) = &self.source else {
            return Err(
                "sluicegate was started without a config file; nothing to reload".to_owned(),
            );
        };
        let config = Config::load(path).map_err(|e| e.to_string())?;
        self.reload(config).await
    }

    pub(super) async fn reload(&self, mut config: Config) -> Result<ReloadReport, String> {
        config.validate().map_err(|e| e.to_string())?;
        self.fix_endpoint(&mut config);
        let current = self.app();
        let report = hold_back_restart_settings(&mut config, &current.config);
        let next = App::build(
            config,
            &self.client,
            Arc::clone(&current.endpoint),
            Some(&current),
        )
        .await
        .map_err(|e| e.to_string())?;
        self.closers
            .lock()
            .extend(next.routes.iter().map(|r| r.batcher().closer()));
        self.app.store(next);
        tracing::info!(restart_required = ?report.restart_required, "config reloaded");
        Ok(report)
    }
}

/// Puts back into `config` the running (`old`) value of every setting that needs a restart
/// — listener addresses, `[lambda]`, `[emulator]` — and names those that differed.
fn hold_back_restart_settings(config: &mut Config, old: &Config) -> ReloadReport {
    let mut report = ReloadReport::default();
    if config.server.listen != old.server.listen {
        report.restart_required.push("server.listen".to_owned());
        config.server.listen = old.server.listen;
    }
    if config.server.admin_listen != old.server.admin_listen {
        report
            .restart_required
            .push("server.admin_listen".to_owned());
        config.server.admin_listen = old.server.admin_listen;
    }
    if config.lambda != old.lambda {
        report.restart_required.push("lambda".to_owned());
        config.lambda = old.lambda.clone();
    }
    if config.emulator != old.emulator {
        report.restart_required.push("emulator".to_owned());
        config.emulator = old.emulator.clone();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::hold_back_restart_settings;
    use crate::config::Config;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "{extra}\n[[routes]]\nname = \"a\"\nfunction = \"f\"\n"
        ))
        .expect("valid")
    }

    #[test]
    fn a_reload_holds_back_and_reports_settings_that_need_a_restart() {
        let old = config("[server]\nlisten = \"127.0.0.1:8080\"\n");
        let mut new = config(
            "[server]\nlisten = \"127.0.0.1:9191\"\nmax_json_depth = 7\n\
             [lambda]\nregion = \"eu-west-1\"\n",
        );
        let report = hold_back_restart_settings(&mut new, &old);
        assert_eq!(report.restart_required, ["server.listen", "lambda"]);
        assert_eq!(new.server.listen, old.server.listen);
        assert_eq!(new.lambda, old.lambda);
        // What a reload can apply is applied.
        assert_eq!(new.server.max_json_depth, 7);
    }

    #[test]
    fn a_reload_of_the_same_config_needs_no_restart() {
        let old = config("");
        let mut new = old.clone();
        let report = hold_back_restart_settings(&mut new, &old);
        assert!(report.restart_required.is_empty());
    }
}
