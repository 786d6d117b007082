//! A throwaway Sentinel group for the tests of sentinel mode: one primary and its replica on
//! 127.0.0.1, watched by three sentinels (quorum 2, `down-after-milliseconds` 1000) that promote
//! the replica when the primary dies; each process a direct child of this one.

use std::process::{Child, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::cluster::{ask, cut_replication, poll_until, redis_node};
use super::install::{self, Tool};
use super::process::{await_ready, command, failed, free_port, io_err, on_path, DevError};

/// The name the sentinels know the primary by.
pub const MASTER: &str = "cacheward";
/// Sentinels in the group.
pub const SENTINELS: usize = 3;

/// The running group; dropping it kills every process and removes their files.
pub struct RedisSentinels {
    dir: TempDir,
    /// The primary's and the replica's ports (the roles swap on a failover).
    nodes: [u16; 2],
    children: [Option<Child>; 2],
    sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
}

impl RedisSentinels {
    /// Starts the primary, its replica (returns once it is in sync) and three sentinels (once
    /// each knows the replica and the other two).
    pub fn start() -> Result<RedisSentinels, DevError> {
        install::ensure(Tool::Redis)?;
        let dir = tempfile::Builder::new()
            .prefix("cacheward-sentinel-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        let nodes = [free_port()?, free_port()?];
        let primary = redis_node(dir.path(), nodes[0], &[])?;
        let replicaof = [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            nodes[0].to_string(),
        ];
        let replica = redis_node(dir.path(), nodes[1], &replicaof)?;
        let mut group = RedisSentinels {
            dir,
            nodes,
            children: [Some(primary), Some(replica)],
            sentinel_ports: Vec::new(),
            sentinels: Vec::new(),
        };
        group.await_synced(nodes[1], Duration::from_secs(20))?;
        for _ in 0..SENTINELS {
            group.start_sentinel()?;
        }
        let each_knows_the_others = || {
            group.sentinel_ports.iter().all(|&port| {
                ask(port, &format!("SENTINEL MASTER {MASTER}")).is_some_and(|info| {
                    let field = |name: &str| {
                        let lines: Vec<&str> = info.lines().collect();
                        lines
                            .iter()
                            .position(|l| *l == name)
                            .and_then(|at| lines.get(at + 2).copied())
                            .unwrap_or("")
                            .to_owned()
                    };
                    field("num-slaves") == "1" && field("num-other-sentinels") == "2"
                })
            })
        };
        poll_until(
            "waiting for the sentinels to know the replica and each other",
            Duration::from_secs(30),
            each_knows_the_others,
        )?;
        Ok(group)
    }

    fn start_sentinel(&mut self) -> Result<(), DevError> {
        let port = free_port()?;
        let child = self.spawn_sentinel(port, true)?;
        self.sentinel_ports.push(port);
        self.sentinels.push(child);
        Ok(())
    }

    /// SIGKILL of sentinel `n`.
    pub fn kill_sentinel(&mut self, n: usize) {
        if let Some(child) = self.sentinels.get_mut(n) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts sentinel `n` again (after [`RedisSentinels::kill_sentinel`]) from the
    /// configuration it rewrote.
    pub fn start_sentinel_again(&mut self, n: usize) -> Result<(), DevError> {
        let child = self.spawn_sentinel(self.sentinel_ports[n], false)?;
        self.sentinels[n] = child;
        Ok(())
    }

    /// Starts the killed node on `port` again, as a replica of the primary now (the sentinels
    /// would make it one anyway).
    pub fn start_again(&mut self, port: u16) -> Result<(), DevError> {
        let Some(n) = self.nodes.iter().position(|&p| p == port) else {
            return Err(failed("restarting a node", format!("no node on {port}")));
        };
        if self.children[n].is_some() {
            return Ok(());
        }
        let primary = self
            .primary()
            .ok_or_else(|| failed("restarting a node", "no primary"))?;
        let replicaof = [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.to_string(),
        ];
        self.children[n] = Some(redis_node(self.dir.path(), port, &replicaof)?);
        Ok(())
    }

    /// Freezes the node on `port` (SIGSTOP), or thaws it (SIGCONT).
    pub fn freeze(&self, port: u16, frozen: bool) {
        let n = self.nodes.iter().position(|&p| p == port);
        if let Some(child) = n.and_then(|n| self.children[n].as_ref()) {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            super::process::signal(child, sig);
        }
    }

    /// Runs `command` on the node (or sentinel) on `port`; its raw answer (empty if none came).
    pub fn ask(&self, port: u16, command: &str) -> String {
        ask(port, command).unwrap_or_default()
    }

    fn spawn_sentinel(&self, port: u16, fresh: bool) -> Result<Child, DevError> {
        let binary = on_path("redis-server").ok_or(DevError::MissingBinary("redis-server", ""))?;
        // A sentinel rewrites its configuration file: it must be its own and writable.
        let conf = self.dir.path().join(format!("sentinel-{port}.conf"));
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel-{port}.log\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 10000\n\
             sentinel parallel-syncs {MASTER} 1\n",
            dir = self.dir.path().display(),
            primary = self.nodes[0],
        );
        if fresh {
            std::fs::write(&conf, text).map_err(io_err("write sentinel.conf"))?;
        }
        let log = self.dir.path().join(format!("sentinel-{port}.log"));
        let child = command(&binary, None, libc::SIGKILL)
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawn redis-server --sentinel"))?;
        await_ready(
            child,
            "redis sentinel",
            &log,
            Duration::from_secs(10),
            || ask(port, "PING").is_some_and(|answer| answer.starts_with("+PONG")),
        )
    }

    /// Waits until the replica on `port` says its link to the primary is up.
    fn await_synced(&self, port: u16, limit: Duration) -> Result<(), DevError> {
        poll_until("waiting for the replica to sync", limit, || {
            ask(port, "INFO replication").is_some_and(|i| i.contains("master_link_status:up"))
        })
    }

    /// `redis://` URLs of the sentinels.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the node that says it is the primary now (`None` while none does).
    pub fn primary(&self) -> Option<u16> {
        self.running()
            .find(|&p| ask(p, "ROLE").is_some_and(|role| role.contains("master")))
    }

    /// The port of the running node that is not the primary.
    pub fn replica(&self) -> Option<u16> {
        let primary = self.primary();
        self.running().find(|&p| Some(p) != primary)
    }

    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        (0..2)
            .filter(|&n| self.children[n].is_some())
            .map(|n| self.nodes[n])
    }

    /// Where the sentinels say the primary is (the first that answers).
    pub fn sentinels_say(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&port| {
            let answer = ask(port, &format!("SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER}"))?;
            answer.lines().nth(4)?.parse().ok()
        })
    }

    /// Cuts the primary's replication link (see `RedisCluster::cut_replication`).
    pub fn cut_replication(&self) -> Result<(), DevError> {
        let primary = self
            .primary()
            .ok_or_else(|| failed("cutting a replication link", "no primary"))?;
        cut_replication(primary)
    }

    /// `SENTINEL FAILOVER`: the sentinels promote the replica while the primary runs (retried
    /// for up to 10 s while a sentinel finds no replica good enough yet).
    pub fn force_failover(&self) -> Result<(), DevError> {
        let mut last = String::new();
        let asked = poll_until("a forced failover", Duration::from_secs(10), || {
            self.sentinel_ports.iter().any(|&sentinel| {
                last = ask(sentinel, &format!("SENTINEL FAILOVER {MASTER}")).unwrap_or_default();
                last.starts_with("+OK")
            })
        });
        asked.map_err(|_| failed("SENTINEL FAILOVER", last))
    }

    /// SIGKILL of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter().position(|&p| p == port) {
            if let Some(mut child) = self.children[n].take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for child in self
            .children
            .iter_mut()
            .flatten()
            .chain(&mut self.sentinels)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
