//! `[socket]`: the JSON-RPC socket's path, mode, peers and limits.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{at_least, at_most, invalid, ConfigError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub mode: SocketMode,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub max_inflight: usize,
    /// Request bytes read but not answered, plus answer bytes not written, per connection: past
    /// it the daemon stops reading that connection.
    pub max_inflight_bytes: usize,
    pub idle_timeout_secs: u64,
    /// A connection whose answers cannot be written for this long is closed.
    pub write_timeout_secs: u64,
    /// Peers (SO_PEERCRED) allowed to connect; both empty: anyone the file mode lets in.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    /// Peers that may only read (`get`, `stats`, `health`).
    pub readonly_uids: Vec<u32>,
    pub readonly_gids: Vec<u32>,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from("/run/cacheward/cacheward.sock"),
            mode: SocketMode(0o660),
            max_connections: 1024,
            max_request_bytes: 65536,
            max_inflight: 128,
            max_inflight_bytes: 1 << 20,
            idle_timeout_secs: 300,
            write_timeout_secs: 10,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            readonly_uids: Vec::new(),
            readonly_gids: Vec::new(),
        }
    }
}

/// Unix permission bits of the socket file. Written as an octal string (`"0660"`) so that a TOML
/// integer, which would be read as decimal, is refused instead of silently meaning something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SocketMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal permission string such as \"0660\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SocketMode, E> {
                parse_mode(v).map_err(E::custom)
            }
        }
        // deserialize_any, not deserialize_str: config-rs would turn a TOML integer into a string.
        d.deserialize_any(Visitor)
    }
}

fn parse_mode(text: &str) -> Result<SocketMode, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(format!(
            "\"{text}\" is not an octal permission string such as \"0660\""
        ));
    }
    let mode = u32::from_str_radix(digits, 8).expect("checked to be octal digits");
    if mode > 0o777 {
        return Err(format!("\"{text}\" has bits beyond 0777"));
    }
    Ok(SocketMode(mode))
}

impl SocketConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid("socket.path", "must not be empty"));
        }
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if self.path.as_os_str().len() > 107 {
            return Err(invalid(
                "socket.path",
                format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    self.path.display()
                ),
            ));
        }
        at_least("socket.max_connections", self.max_connections as u64, 1)?;
        at_least(
            "socket.max_request_bytes",
            self.max_request_bytes as u64,
            64,
        )?;
        at_most(
            "socket.max_request_bytes",
            self.max_request_bytes as u64,
            64 << 20,
        )?;
        at_least("socket.max_inflight", self.max_inflight as u64, 1)?;
        // One request of the largest size must fit, or that connection could never be read.
        at_least(
            "socket.max_inflight_bytes",
            self.max_inflight_bytes as u64,
            self.max_request_bytes as u64,
        )?;
        at_least("socket.write_timeout_secs", self.write_timeout_secs, 1)
    }
}
