//! A throwaway PgBouncer in transaction mode in front of a throwaway PostgreSQL (for the pooler
//! tests).

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::install::{self, Tool};
use super::postgres::Postgres;
use super::process::{await_ready, chown, command, free_port, io_err, DevError};

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
