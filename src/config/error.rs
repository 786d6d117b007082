//! Why the configuration could not be loaded, and the checks every section's values share: each
//! error names the key (or file) at fault.

use std::borrow::Cow;
use std::path::PathBuf;

/// Why the configuration could not be loaded. Every variant names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config FILE` named a file that does not exist.
    #[error("config file {0} does not exist")]
    FileNotFound(PathBuf),
    /// A file could not be read or parsed, or a value has the wrong type (config-rs names the key).
    /// Never echoes the file's text: a line that fails to parse may hold a password. Not a
    /// `source`: config-rs's own error quotes the line, and an error chain would print it.
    #[error("{}", load_error(.0))]
    Load(config::ConfigError),
    /// A key that cacheward does not know: almost always a typo.
    #[error("unknown configuration key `{key}` (from {origin})")]
    UnknownKey { key: String, origin: String },
    /// A key whose value is out of range or malformed.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        key: Cow<'static, str>,
        reason: String,
    },
    /// Several sections are wrong: each one's error, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        ConfigError::Load(e)
    }
}

/// What a config-rs error may say: where a file failed to parse, never the text there; anything
/// else with connection-string passwords redacted.
fn load_error(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::FileParse { uri, cause } => {
            let cause = cause.to_string();
            // The TOML error's first line says where ("TOML parse error at line 3, column 8"), its
            // last says what; the lines between quote the file.
            let mut lines = cause.lines().map(str::trim).filter(|l| !l.is_empty());
            let at = lines.next().unwrap_or("parse error");
            let what = lines
                .next_back()
                .filter(|l| !l.contains('|') && !l.starts_with(|c: char| c.is_ascii_digit()))
                .map(|l| format!(": {}", crate::support::secrets::redact_text(l)))
                .unwrap_or_default();
            format!(
                "cannot parse {}: {at}{what}",
                uri.as_deref().unwrap_or("the configuration file")
            )
        }
        other => crate::support::secrets::scrub(&other.to_string()).into_owned(),
    }
}

pub fn invalid(key: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

pub fn at_least(
    key: impl Into<Cow<'static, str>>,
    value: u64,
    min: u64,
) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(
            key,
            format!("{value} is below the minimum of {min}"),
        ));
    }
    Ok(())
}

pub fn at_most(key: impl Into<Cow<'static, str>>, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(invalid(
            key,
            format!("{value} is above the maximum of {max}"),
        ));
    }
    Ok(())
}
