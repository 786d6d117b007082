//! A connection URL whose password never shows: what every secret-bearing key holds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A connection URL that may carry a password. `Debug`, `Display` and `Serialize` show it with the
/// password replaced by `***`; only [`SecretUrl::expose`] gives the real text.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL as configured, password included: for connecting, never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// `url` with every password it holds replaced by `***` (see [`crate::support::secrets::redact_text`]).
pub fn redact_url(url: &str) -> String {
    crate::support::secrets::redact_text(url).into_owned()
}
