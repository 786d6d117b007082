//! Throwaway PostgreSQL, Redis and PgBouncer started from the system's binaries (installed by
//! [`install`] when missing) in temp dirs this process owns (for `serve --dev`, the tests and the
//! benchmark). Each server is a direct child, so callers can
//! stop, kill and restart it to inject faults; dropping it kills it and removes its files.
//!
//! Servers get `PR_SET_PDEATHSIG`, so they die with the thread that started them: start them from a
//! thread that outlives them (never from `spawn_blocking`).

use std::fs;
use std::io::{Read, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod cluster;
pub mod install;
pub mod sentinel;

use install::Tool;

use crate::config::{Config, SecretUrl};
use crate::store::cache::{Cache, Write};
use crate::store::{connect, db};

/// Why a throwaway server could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("`{0}` not found on PATH{1}; scripts/install-deps installs it")]
    MissingBinary(&'static str, &'static str),
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |e| DevError::Io(what, e)
}

fn failed(what: impl Into<String>, detail: impl Into<String>) -> DevError {
    DevError::Failed {
        what: what.into(),
        detail: detail.into(),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A PostgreSQL binary: on PATH, else under the newest `/usr/lib/postgresql/*/bin`.
fn pg_binary(name: &'static str) -> Result<PathBuf, DevError> {
    if let Some(path) = on_path(name) {
        return Ok(path);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_str()?.parse().ok()?,
                e.path().join("bin").join(name),
            ))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or(DevError::MissingBinary(
            name,
            " or under /usr/lib/postgresql/*/bin",
        ))
}

/// A PostgreSQL client tool (`psql`, `pgbench`, …) found the same way as the server.
pub fn pg_tool(name: &'static str) -> Result<PathBuf, DevError> {
    pg_binary(name)
}

/// uid/gid of the `postgres` user, when running as root (PostgreSQL refuses to run as root).
fn server_owner() -> Result<Option<(u32, u32)>, DevError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("read /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            failed(
                "running PostgreSQL as root",
                "needs a `postgres` user to run it as; apt-get install -y postgresql creates one",
            )
        })
}

fn command(program: &Path, owner: Option<(u32, u32)>, death_signal: i32) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: setpgid and prctl are async-signal-safe and touch only the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            // Its own process group: a Ctrl-C meant for cacheward does not stop the servers under it.
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), DevError> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), DevError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io_err(what))?;
    if !out.status.success() {
        return Err(failed(
            what,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill with a pid we own; an already-exited child makes it fail harmlessly.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits until `ready()` holds for a just-spawned server, or reports why it never will (it exited,
/// or `limit` passed) with the end of its log.
fn await_ready(
    mut child: Child,
    what: &str,
    log: &Path,
    limit: Duration,
    ready: impl Fn() -> bool,
) -> Result<Child, DevError> {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return Ok(child);
        }
        if let Ok(Some(code)) = child.try_wait() {
            return Err(failed(
                format!("starting {what}"),
                format!("exited with {code}:\n{}", tail(log)),
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(
                format!("starting {what}"),
                format!("not ready after {limit:?}:\n{}", tail(log)),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a Redis answers PING on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

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

/// A server's certificate and key (PEM files), for the TLS a test asks for.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must chain to (Redis's `--tls-auth-clients yes`;
    /// PostgreSQL's `ssl_ca_file`, for `tcp_auth = "cert"`).
    pub client_ca: Option<PathBuf>,
}

/// Options of a throwaway PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Also listen on TCP (127.0.0.1, a free port) with TLS only (`hostssl`): plain TCP is refused.
    pub tls: Option<ServerTls>,
    /// How TCP clients authenticate (`pg_hba` method; `trust` when unset).
    pub tcp_auth: Option<String>,
}

/// A throwaway PostgreSQL listening on a Unix socket in its own directory (and, if asked, on TCP
/// with TLS).
pub struct Postgres {
    dir: TempDir,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
    options: PostgresOptions,
    /// The TCP port, when TLS was asked for.
    tcp_port: Option<u16>,
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, DevError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("find a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("find a free port"))?
        .port())
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
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
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

/// A throwaway PgBouncer in front of a [`Postgres`], on 127.0.0.1, trusting every client, in
/// `pool_mode = transaction` with a small pool: what a request path must survive when each of its
/// statements may run on a different server connection.
pub struct PgBouncer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts one with `pool_size` server connections per database and user. `ignore_options`:
    /// it takes the `options` startup parameter and drops it (`ignore_startup_parameters`), as
    /// many deployments are set up; otherwise it refuses connections that send one.
    pub fn start(
        pg: &Postgres,
        pool_size: u32,
        ignore_options: bool,
    ) -> Result<PgBouncer, DevError> {
        install::ensure(Tool::PgBouncer)?;
        let binary =
            install::pgbouncer().ok_or(DevError::MissingBinary("pgbouncer", " or in /usr/sbin"))?;
        let dir = tempfile::Builder::new()
            .prefix("cacheward-pgbouncer-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        chown(dir.path(), pg.owner)?;
        let port = free_port()?;
        let d = dir.path().display();
        let ini = format!(
            "[databases]\n\
             * = host={pg_dir} port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {d}/userlist.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 1000\n\
             logfile = {d}/pgbouncer.log\n\
             pidfile = {d}/pgbouncer.pid\n\
             {ignore}",
            pg_dir = pg.dir().display(),
            pg_port = pg.port(),
            ignore = match ignore_options {
                true => "ignore_startup_parameters = options\n",
                false => "",
            },
        );
        for (name, text) in [
            ("pgbouncer.ini", ini.as_str()),
            ("userlist.txt", "\"postgres\" \"\"\n"),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, text).map_err(io_err(format!("write {name}")))?;
            chown(&path, pg.owner)?;
        }
        let log = dir.path().join("pgbouncer.log");
        let child = command(&binary, pg.owner, libc::SIGKILL)
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawn pgbouncer"))?;
        let child = await_ready(child, "pgbouncer", &log, Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(PgBouncer {
            dir,
            port,
            child: Some(child),
        })
    }

    /// A URL for database `db` through the pooler.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

/// The original article's users. `user01` is also cached, so the first `get user02` comes from
/// the database.
pub const SEED_USERS: [&str; 4] = ["user01", "user02", "user05", "user06"];

/// Everything `serve --dev` runs on: both servers, the `cacheward` database migrated and seeded.
pub struct DevStack {
    pub postgres: Postgres,
    pub redis: Redis,
    pub database_url: String,
    pub redis_url: String,
}

impl DevStack {
    pub async fn start() -> Result<DevStack, DevError> {
        let postgres = Postgres::start()?;
        let redis = Redis::start()?;
        let database_url = postgres.create_database("cacheward").await?;
        let redis_url = redis.url(0);
        let stack = DevStack {
            postgres,
            redis,
            database_url,
            redis_url,
        };
        stack.seed().await?;
        Ok(stack)
    }

    /// A configuration pointing at this stack.
    pub fn configure(&self, config: &mut Config) {
        config.postgres.url = Some(SecretUrl::new(self.database_url.clone()));
        config.redis.url = Some(SecretUrl::new(self.redis_url.clone()));
    }

    async fn seed(&self) -> Result<(), DevError> {
        let mut config = Config::default();
        self.configure(&mut config);
        let target =
            connect::pg_target(&config).map_err(|e| failed("postgres url", e.to_string()))?;
        let mut client = target
            .connect()
            .await
            .map_err(|e| failed("connecting to postgres", e.to_string()))?;
        db::migrate(&mut client)
            .await
            .map_err(|e| failed("migrate", e.to_string()))?;
        for name in SEED_USERS {
            client
                .execute(
                    "INSERT INTO users (username) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&name],
                )
                .await
                .map_err(|e| failed("seeding users", e.to_string()))?;
        }
        // The seed is history from before the daemon, as in the article: without this, the CDC
        // worker's first start would replay it and cache every seeded user.
        client
            .batch_execute("DELETE FROM cacheward_outbox")
            .await
            .map_err(|e| failed("seeding users", e.to_string()))?;
        let store = db::Db::new(&config).map_err(|e| failed("postgres pool", e.to_string()))?;
        let seeding = |e: String| failed("seeding the cache", e);
        // A fresh Redis has no fence yet; the daemon's health monitor would set it, the seed
        // needs it now.
        let fence = store
            .fresh_horizon()
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let cache = Cache::new(&config).map_err(|e| failed("redis url", e.to_string()))?;
        // Written under this very Redis process: the daemon then trusts it (see Cache::epoch_key).
        cache
            .claim(fence)
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let mut found = store
            .find_users(&[SEED_USERS[0]])
            .await
            .map_err(|e| seeding(e.to_string()))?;
        let user = found
            .users
            .pop()
            .ok_or_else(|| seeding("user01 vanished".into()))?;
        cache
            .apply(&[Write::live(&user, found.read_at)])
            .await
            .map_err(|e| seeding(e.to_string()))?;
        Ok(())
    }
}
