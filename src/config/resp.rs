//! `[resp]`: the read-only Redis-protocol front end: its Unix socket, its TCP address and the
//! password that TCP requires, and the bound of its client-side caching. Its connection limits are
//! the JSON-RPC socket's (`socket.*`), its `max_connections` shared with it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};
use super::socket::SocketMode;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RespConfig {
    /// A Unix socket path; unset: no Unix socket.
    pub socket: Option<PathBuf>,
    /// Its permission bits (peers as `socket.allow_*`).
    pub mode: SocketMode,
    /// A TCP address (`127.0.0.1:6380`); served only with `password_file` set.
    pub listen: Option<SocketAddr>,
    /// The password clients give to `AUTH` (one line, read afresh at every AUTH).
    pub password_file: Option<PathBuf>,
    /// Keys remembered for clients that track what they read (`CLIENT TRACKING`), all clients
    /// together; past it the oldest are invalidated, as Redis's `tracking-table-max-keys`.
    pub tracking_max_keys: usize,
}

impl Default for RespConfig {
    fn default() -> Self {
        RespConfig {
            socket: None,
            mode: SocketMode(0o660),
            listen: None,
            password_file: None,
            tracking_max_keys: 1_000_000,
        }
    }
}

impl RespConfig {
    /// Whether the front end serves anything.
    pub fn enabled(&self) -> bool {
        self.socket.is_some() || self.listen.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.socket {
            if path.as_os_str().is_empty() {
                return Err(invalid("resp.socket", "must not be empty when set"));
            }
            if path.as_os_str().len() > 107 {
                return Err(invalid(
                    "resp.socket",
                    format!(
                        "{} is longer than the 107 bytes a Unix socket path may have",
                        path.display()
                    ),
                ));
            }
        }
        if self.listen.is_some() && self.password_file.is_none() {
            return Err(invalid(
                "resp.listen",
                "is served only with resp.password_file set (clients must AUTH over TCP)",
            ));
        }
        if let Some(path) = &self.password_file {
            crate::support::secrets::read_password_file(path)
                .map_err(|e| invalid("resp.password_file", e))?;
        }
        at_least("resp.tracking_max_keys", self.tracking_max_keys as u64, 1)?;
        Ok(())
    }
}
