//! Logging: `tracing` events to stderr, as text for people or JSON for machines, colours only on a
//! terminal. Level and format can be changed while running (SIGHUP reloads them).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// The handles that change the installed logger.
pub struct Logger {
    filter: reload::Handle<EnvFilter, Registry>,
    output: reload::Handle<Output, Filtered>,
    /// `RUST_LOG` was set: it decides the level, at startup and on reload.
    env_level: bool,
}

fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|d| !d.is_empty())
}

fn output(format: LogFormat) -> Output {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| crate::support::secrets::ScrubbingStderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(log: &LogConfig) -> anyhow::Result<Logger> {
    let env_level = rust_log();
    let filter = EnvFilter::builder().parse(env_level.as_deref().unwrap_or(&log.level))?;
    let (filter, filter_handle) = reload::Layer::new(filter);
    let (output, output_handle) = reload::Layer::new(output(log.format));
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(Logger {
        filter: filter_handle,
        output: output_handle,
        env_level: env_level.is_some(),
    })
}

impl Logger {
    /// Moves the logger from `old` to `new`; returns the keys that changed.
    pub fn apply(&self, old: &LogConfig, new: &LogConfig) -> anyhow::Result<Vec<&'static str>> {
        let mut changed = Vec::new();
        if new.level != old.level {
            if self.env_level {
                tracing::warn!(
                    level = %new.level,
                    "log.level changed but RUST_LOG is set and decides the level"
                );
            } else {
                self.filter
                    .reload(EnvFilter::builder().parse(&new.level)?)
                    .map_err(|e| anyhow::anyhow!("cannot change the log level: {e}"))?;
                changed.push("log.level");
            }
        }
        if new.format != old.format {
            self.output
                .reload(output(new.format))
                .map_err(|e| anyhow::anyhow!("cannot change the log format: {e}"))?;
            changed.push("log.format");
        }
        Ok(changed)
    }
}
