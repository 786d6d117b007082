//! A throwaway PostgreSQL: an initdb'd template copied per server, a Unix socket in a private
//! directory, TLS on TCP when asked, databases made on demand.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::install::{self, Tool};
use super::process::{
    await_ready, chown, command, failed, free_port, io_err, pg_binary, run, server_owner, signal,
    wait_with_deadline, DevError, ServerTls,
};
use crate::store::pg::{self as db};

/// A data directory made by `initdb` once per machine and PostgreSQL version, copied for every
/// server: copying takes milliseconds where initdb takes seconds.
fn template(owner: Option<(u32, u32)>) -> Result<PathBuf, DevError> {
    // One builder per process; other processes build under their own name and the first rename wins.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let postgres = pg_binary("postgres")?;
    let version_out = Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(io_err("postgres --version"))?;
    let version = String::from_utf8_lossy(&version_out.stdout)
        .split_whitespace()
        .nth(2) // "postgres (PostgreSQL) 15.18 (Debian ...)"
        .unwrap_or("unknown")
        .to_owned();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("cacheward-pg-template-{version}-{uid}"));
    if dir.join("PG_VERSION").is_file() {
        return Ok(dir);
    }
    let building = std::env::temp_dir().join(format!(
        "cacheward-pg-template-{version}-{uid}.{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&building);
    run(
        command(&pg_binary("initdb")?, owner, libc::SIGKILL)
            .arg("-D")
            .arg(&building)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--wal-segsize=1",
            ]),
        "initdb",
    )?;
    if fs::rename(&building, &dir).is_err() {
        // Another process made it first.
        let _ = fs::remove_dir_all(&building);
    }
    Ok(dir)
}

/// Options of a throwaway PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Also listen on TCP (127.0.0.1, a free port) with TLS only (`hostssl`): plain TCP is refused.
    pub tls: Option<ServerTls>,
    /// How TCP clients authenticate (`pg_hba` method; `trust` when unset).
    pub tcp_auth: Option<String>,
    /// Flush every commit to disk before it returns, as a production server does. Unset, the
    /// server skips flushes (`fsync`, `synchronous_commit` and `full_page_writes` off): tests
    /// run faster, and a crash of the test's own server loses nothing a test needs.
    pub durable: bool,
}

/// A throwaway PostgreSQL listening on a Unix socket in its own directory (and, if asked, on TCP
/// with TLS).
pub struct Postgres {
    dir: TempDir,
    pub(super) owner: Option<(u32, u32)>,
    child: Option<Child>,
    options: PostgresOptions,
    /// The TCP port, when TLS was asked for.
    tcp_port: Option<u16>,
}

/// The port only names the socket file; the directory is private, so it never collides.
const PG_PORT: u16 = 5432;

impl Postgres {
    /// Starts a fresh server (an empty cluster with the `postgres` database).
    pub fn start() -> Result<Postgres, DevError> {
        Postgres::start_with(PostgresOptions::default())
    }

    pub fn start_with(options: PostgresOptions) -> Result<Postgres, DevError> {
        install::ensure(Tool::Postgres)?;
        let owner = server_owner()?;
        let template = template(owner)?;
        let dir = tempfile::Builder::new()
            .prefix("cacheward-pg-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod temp dir"))?;
        chown(dir.path(), owner)?;
        run(
            command(Path::new("cp"), owner, libc::SIGKILL)
                .arg("-a")
                .arg(&template)
                .arg(dir.path().join("data")),
            "copying the PostgreSQL template",
        )?;
        let data = dir.path().join("data");
        let tcp_port = match &options.tls {
            None => None,
            Some(tls) => {
                // The server's user must own its key, mode 0600.
                let client_ca = tls
                    .client_ca
                    .as_ref()
                    .map(|ca| (ca, "client-ca.crt", 0o644));
                for (from, name, mode) in [
                    (&tls.cert, "server.crt", 0o644),
                    (&tls.key, "server.key", 0o600),
                ]
                .into_iter()
                .chain(client_ca)
                {
                    let to = data.join(name);
                    fs::copy(from, &to).map_err(io_err(format!("copy {}", from.display())))?;
                    fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                        .map_err(io_err("chmod certificate"))?;
                    chown(&to, owner)?;
                }
                let auth = options.tcp_auth.as_deref().unwrap_or("trust");
                fs::write(
                    data.join("pg_hba.conf"),
                    format!(
                        "local all all trust\n\
                         hostssl all all 127.0.0.1/32 {auth}\n\
                         hostnossl all all 0.0.0.0/0 reject\n"
                    ),
                )
                .map_err(io_err("write pg_hba.conf"))?;
                Some(free_port()?)
            }
        };
        let mut pg = Postgres {
            dir,
            owner,
            child: None,
            options,
            tcp_port,
        };
        pg.start_again()?;
        Ok(pg)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server on its existing data (after [`Postgres::stop`] or [`Postgres::crash`]).
    pub fn start_again(&mut self) -> Result<(), DevError> {
        if self.child.is_some() {
            return Ok(());
        }
        let data = self.dir.path().join("data");
        let log_path = self.dir.path().join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open server.log"))?;
        let _ = fs::remove_file(data.join("postmaster.pid"));
        let child = command(&pg_binary("postgres")?, self.owner, libc::SIGQUIT)
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(self.listen_args())
            .args(match self.options.durable {
                true => &[][..],
                false => &[
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ][..],
            })
            .args([
                "-c",
                "shared_preload_libraries=pg_stat_statements",
                "-c",
                "max_connections=300",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("dup log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err("spawn postgres"))?;
        let pid_file = data.join("postmaster.pid");
        let ready = || {
            let status = fs::read_to_string(&pid_file).unwrap_or_default();
            status.lines().nth(7).map(str::trim) == Some("ready")
        };
        self.child =
            await_ready(child, "postgres", &log_path, Duration::from_secs(30), ready).map(Some)?;
        Ok(())
    }

    /// Unix socket only, or also TLS on 127.0.0.1.
    fn listen_args(&self) -> Vec<String> {
        let mut args = vec!["-c".to_owned()];
        match (self.tcp_port, &self.options.tls) {
            (Some(_), Some(_)) => {
                args.push("listen_addresses=127.0.0.1".into());
                for setting in [
                    "ssl=on",
                    "ssl_cert_file=server.crt",
                    "ssl_key_file=server.key",
                ] {
                    args.extend(["-c".into(), setting.into()]);
                }
                if self
                    .options
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.client_ca.is_some())
                {
                    // Client certificates are checked against it (pg_hba's `cert` method).
                    args.extend(["-c".into(), "ssl_ca_file=client-ca.crt".into()]);
                }
            }
            _ => args.push("listen_addresses=".into()),
        }
        args
    }

    /// The port: it names the Unix socket file, and is the TCP port when there is one.
    pub fn port(&self) -> u16 {
        self.tcp_port.unwrap_or(PG_PORT)
    }

    /// The TCP port (TLS only), if the server listens on one.
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// A URL for database `db` over TCP (host name `localhost`, address 127.0.0.1), with `params`
    /// appended (`sslmode=…`).
    pub fn tcp_url(&self, db: &str, params: &str) -> Option<String> {
        let port = self.tcp_port?;
        Some(format!(
            "postgresql://postgres@localhost:{port}/{db}?hostaddr=127.0.0.1&{params}"
        ))
    }

    /// Fast shutdown: sessions are disconnected, the server exits cleanly.
    pub fn stop(&mut self) {
        self.halt(libc::SIGINT);
    }

    /// Immediate shutdown, like a crash: no checkpoint, recovery at the next start.
    pub fn crash(&mut self) {
        self.halt(libc::SIGQUIT);
    }

    fn halt(&mut self, sig: i32) {
        if let Some(mut child) = self.child.take() {
            signal(&child, sig);
            if !wait_with_deadline(&mut child, Duration::from_secs(10)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A URL for database `db` over the Unix socket.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@localhost/{db}?host={}&port={}",
            self.dir.path().display(),
            self.port()
        )
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, DevError> {
        let admin: tokio_postgres::Config = self
            .url("postgres")
            .parse()
            .map_err(|e| failed("postgres url", format!("{e}")))?;
        let client = db::connect(&admin)
            .await
            .map_err(|e| failed("connecting to postgres", e.to_string()))?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| failed(format!("CREATE DATABASE {name}"), e.to_string()))?;
        Ok(self.url(name))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.crash();
    }
}
