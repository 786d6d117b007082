//! What every throwaway server shares: finding and running the system's binaries (as the
//! `postgres` user under root), waiting for readiness, signalling, and why it failed.

use std::fs;
use std::io::{Read, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |e| DevError::Io(what, e)
}

pub(super) fn failed(what: impl Into<String>, detail: impl Into<String>) -> DevError {
    DevError::Failed {
        what: what.into(),
        detail: detail.into(),
    }
}

pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A PostgreSQL binary: on PATH, else under the newest `/usr/lib/postgresql/*/bin`.
pub(super) fn pg_binary(name: &'static str) -> Result<PathBuf, DevError> {
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
pub(super) fn server_owner() -> Result<Option<(u32, u32)>, DevError> {
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

pub(super) fn command(program: &Path, owner: Option<(u32, u32)>, death_signal: i32) -> Command {
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

pub(super) fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), DevError> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

pub(super) fn run(cmd: &mut Command, what: &str) -> Result<(), DevError> {
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

pub(super) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub(super) fn signal(child: &Child, sig: i32) {
    // SAFETY: kill with a pid we own; an already-exited child makes it fail harmlessly.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub(super) fn wait_with_deadline(child: &mut Child, deadline: Duration) -> bool {
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
pub(super) fn await_ready(
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
pub(super) fn ping(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
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

/// A free port for a Redis Cluster node whose cluster bus port (the port + 10 000) is free too:
/// a node whose bus port is taken exits at start.
pub fn free_cluster_port() -> Result<u16, DevError> {
    for _ in 0..100 {
        let port = free_port()?;
        let bus = port.checked_add(10_000).filter(|_| port < 55_000);
        if bus.is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok()) {
            return Ok(port);
        }
    }
    Err(failed(
        "finding a free port",
        "no port whose cluster bus port was free too",
    ))
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
