//! Signals: SIGTERM and SIGINT stop the daemon (drain first; a second one exits at once), SIGHUP
//! reloads the configuration and applies what can change without a restart.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::telemetry;

/// What SIGHUP re-reads, and what it can change without a restart: the log level and format.
pub struct Reloader {
    load: Box<dyn Fn() -> anyhow::Result<Config> + Send>,
    running: Config,
    logger: telemetry::Logger,
}

impl Reloader {
    /// `load` reads the configuration as the daemon was started (file, environment, flags);
    /// `running` is the configuration in effect, `logger` what applies a new log level or format.
    pub fn new(
        load: impl Fn() -> anyhow::Result<Config> + Send + 'static,
        running: Config,
        logger: telemetry::Logger,
    ) -> Reloader {
        Reloader {
            load: Box::new(load),
            running,
            logger,
        }
    }

    /// Loads the configuration again (file, environment, flags) and applies what can change while
    /// running. A configuration that fails to load or validate changes nothing.
    fn reload(&mut self) {
        let new = match (self.load)() {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "config reload rejected; the running configuration stays");
                return;
            }
        };
        let applied = match self.logger.apply(&self.running.log, &new.log) {
            Ok(applied) => applied,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "config reload rejected; the running configuration stays");
                return;
            }
        };
        self.running.log.level = new.log.level.clone();
        self.running.log.format = new.log.format;
        let needs_restart: Vec<String> = self.running.changed_keys(&new);
        if !needs_restart.is_empty() {
            tracing::warn!(keys = ?needs_restart, "config changes that take effect only after a restart");
        }
        tracing::info!(applied = ?applied, "config reloaded");
    }
}

/// SIGTERM/SIGINT cancel `shutdown` (a second one, a second or more later, exits at once); SIGHUP
/// reloads the configuration.
pub fn watch(
    shutdown: CancellationToken,
    mut reloader: Reloader,
) -> anyhow::Result<signal_hook_tokio::Handle> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    tokio::spawn(async move {
        let mut first_stop = None;
        while let Some(signal) = signals.next().await {
            let name = match signal {
                SIGTERM => "SIGTERM",
                SIGINT => "SIGINT",
                _ => "SIGHUP",
            };
            if signal == SIGHUP {
                tracing::info!(signal = name, "reloading the configuration");
                reloader.reload();
            } else if first_stop
                .is_some_and(|at: std::time::Instant| at.elapsed() < Duration::from_secs(1))
            {
                // The same Ctrl-C delivered twice (say, through `cargo run` or `timeout` as well).
                tracing::debug!(signal = name, "repeated stop signal ignored");
            } else if shutdown.is_cancelled() {
                tracing::warn!(
                    signal = name,
                    "second stop signal: exiting without draining"
                );
                std::process::exit(1);
            } else {
                tracing::info!(signal = name, "shutdown requested");
                first_stop = Some(std::time::Instant::now());
                shutdown.cancel();
            }
        }
    });
    Ok(handle)
}
