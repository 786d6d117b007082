//! A throwaway Redis: a child process on a Unix socket (and TCP, TLS when asked), killed,
//! frozen, flushed or restarted by the tests that inject faults.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::install::{self, Tool};
use super::process::{
    await_ready, command, free_port, io_err, on_path, ping, signal, DevError, ServerTls,
};

/// Options of a throwaway Redis.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file with fsync on every write: data survives a kill, as on a production Redis.
    pub persistent: bool,
    /// Also listen on TCP (127.0.0.1, a free port) with TLS; with `client_ca`, clients must
    /// present a certificate signed by it.
    pub tls: Option<ServerTls>,
    /// Also listen on plain TCP (127.0.0.1, a free port): how production reaches Redis, and what
    /// the benchmark measures.
    pub tcp: bool,
}

/// A throwaway Redis listening only on a Unix socket in its own directory.
pub struct Redis {
    dir: TempDir,
    options: RedisOptions,
    child: Option<Child>,
    /// The TLS port, when TLS was asked for.
    tls_port: Option<u16>,
    /// The plain TCP port, when asked for.
    tcp_port: Option<u16>,
}

impl Redis {
    pub fn start() -> Result<Redis, DevError> {
        Redis::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Result<Redis, DevError> {
        let dir = tempfile::Builder::new()
            .prefix("cacheward-redis-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        let tls_port = match options.tls {
            Some(_) => Some(free_port()?),
            None => None,
        };
        let tcp_port = match options.tcp {
            true => Some(free_port()?),
            false => None,
        };
        let mut redis = Redis {
            dir,
            options,
            child: None,
            tls_port,
            tcp_port,
        };
        redis.start_again()?;
        Ok(redis)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// Its directory: `dump.rdb` (written by `SAVE`, loaded at start) lives there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server again on the same socket (and, if persistent, the same data).
    pub fn start_again(&mut self) -> Result<(), DevError> {
        if self.child.is_some() {
            return Ok(());
        }
        install::ensure(Tool::Redis)?;
        let binary = on_path("redis-server").ok_or(DevError::MissingBinary("redis-server", ""))?;
        let log_path = self.dir.path().join("redis.log");
        let mut cmd = command(&binary, None, libc::SIGKILL);
        let port = self.tcp_port.unwrap_or(0).to_string();
        cmd.args(["--port", &port, "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--daemonize",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log_path);
        if self.tls_port.is_some() || self.tcp_port.is_some() {
            cmd.args(["--bind", "127.0.0.1"]);
        }
        if let (Some(port), Some(tls)) = (self.tls_port, &self.options.tls) {
            cmd.args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key);
            match &tls.client_ca {
                Some(ca) => {
                    cmd.arg("--tls-ca-cert-file")
                        .arg(ca)
                        .args(["--tls-auth-clients", "yes"]);
                }
                None => {
                    cmd.args(["--tls-auth-clients", "no"]);
                }
            }
        }
        if self.options.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawn redis-server"))?;
        let socket = self.socket();
        self.child = await_ready(child, "redis", &log_path, Duration::from_secs(10), || {
            ping(&socket)
        })
        .map(Some)?;
        Ok(())
    }

    /// SIGKILL: what was not persisted is lost; clients see the connection drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.socket());
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
        }
    }

    /// Thaws a [`Redis::pause`]d server.
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A `redis://` URL over TCP for logical database `db`, if TCP was asked for.
    pub fn tcp_url(&self, db: u32) -> Option<String> {
        Some(format!("redis://127.0.0.1:{}/{db}", self.tcp_port?))
    }

    /// A `rediss://` URL for logical database `db` (host name `localhost`), if TLS was asked for.
    pub fn tls_url(&self, db: u32) -> Option<String> {
        Some(format!("rediss://localhost:{}/{db}", self.tls_port?))
    }

    /// A URL for logical database `db`.
    pub fn url(&self, db: u32) -> String {
        format!("redis+unix://{}?db={db}", self.socket().display())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}
