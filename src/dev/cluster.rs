//! A throwaway Redis Cluster for the tests of cluster mode: six nodes on 127.0.0.1 (three
//! primaries with a replica each, `cluster-node-timeout` 1.5 s) made with `redis-cli --cluster
//! create`, each node a direct child of this process, so that a test can kill, freeze or restart
//! any of them to drive a failover.

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::install::{self, Tool};
use super::process::{
    await_ready, command, failed, free_cluster_port, io_err, on_path, signal, DevError,
};

/// Nodes in the cluster: three primaries and their replicas.
pub const NODES: usize = 6;

/// The ACL user replicas sync as.
const REPLICATION_USER: &str = "replication";
const REPLICATION_PASSWORD: &str = "replicate-me";

/// The running cluster; dropping it kills every node and removes their files.
pub struct RedisCluster {
    dir: TempDir,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl RedisCluster {
    /// Starts six nodes and joins them into a cluster; returns once every node says
    /// `cluster_state:ok`.
    pub fn start() -> Result<RedisCluster, DevError> {
        install::ensure(Tool::Redis)?;
        let dir = tempfile::Builder::new()
            .prefix("cacheward-cluster-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        let ports = (0..NODES)
            .map(|_| free_cluster_port())
            .collect::<Result<Vec<_>, _>>()?;
        let mut cluster = RedisCluster {
            dir,
            ports,
            children: (0..NODES).map(|_| None).collect(),
        };
        for node in 0..NODES {
            cluster.start_node(node)?;
        }
        let cli = on_path("redis-cli").ok_or(DevError::MissingBinary("redis-cli", ""))?;
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("redis-cli --cluster create"))?;
        if !out.status.success() {
            return Err(failed(
                "creating the redis cluster",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        cluster.await_state_ok(Duration::from_secs(20))?;
        cluster.await_replicas_synced(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// Waits until every replica has synchronised with its primary: before that a replica cannot
    /// be promoted (its data would be of unknown age), and a failover test would hang.
    pub fn await_replicas_synced(&self, limit: Duration) -> Result<(), DevError> {
        poll_until("waiting for the redis cluster's replicas", limit, || {
            (0..NODES)
                .filter(|&n| self.children[n].is_some())
                .filter_map(|n| ask(self.ports[n], "INFO replication"))
                .filter(|info| info.contains("role:slave"))
                .all(|info| info.contains("master_link_status:up"))
        })
    }

    fn start_node(&mut self, node: usize) -> Result<(), DevError> {
        if self.children[node].is_some() {
            return Ok(());
        }
        let port = self.ports[node];
        let cluster = [
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-node-timeout".to_owned(),
            "1500".to_owned(),
            "--cluster-config-file".to_owned(),
            format!("nodes-{port}.conf"),
        ];
        self.children[node] = Some(redis_node(self.dir.path(), port, &cluster)?);
        Ok(())
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn await_state_ok(&self, limit: Duration) -> Result<(), DevError> {
        poll_until(
            "waiting for every redis cluster node to say cluster_state:ok",
            limit,
            || {
                (0..NODES).filter(|&n| self.children[n].is_some()).all(|n| {
                    ask(self.ports[n], "CLUSTER INFO")
                        .is_some_and(|i| i.contains("cluster_state:ok"))
                })
            },
        )
    }

    /// Waits until no running node flags another as failing (`fail`, `fail?`): a primary frozen
    /// past the node timeout is flagged until it has answered for twice that long, and a replica
    /// allowed to take over meanwhile would.
    pub fn await_no_failure_flags(&self, limit: Duration) -> Result<(), DevError> {
        poll_until(
            "waiting for no redis cluster node to flag another as failing",
            limit,
            || {
                (0..NODES).filter(|&n| self.children[n].is_some()).all(|n| {
                    ask(self.ports[n], "CLUSTER NODES").is_some_and(|nodes| {
                        !nodes.lines().any(|node| {
                            let flags = node.split_whitespace().nth(2).unwrap_or("");
                            flags.split(',').any(|f| f == "fail" || f == "fail?")
                        })
                    })
                })
            },
        )
    }

    /// Makes the primary on `port` one whose outage costs only its own slots: the others serve
    /// on without full coverage, and its replica may not take over (`partial`); or undoes it.
    pub fn hold_failover(&self, port: u16, partial: bool) {
        let yes_no = |on: bool| if on { "yes" } else { "no" };
        for &node in &self.ports {
            ask(
                node,
                &format!(
                    "CONFIG SET cluster-require-full-coverage {}",
                    yes_no(!partial)
                ),
            );
        }
        if let Some(replica) = self.replica_of(port) {
            ask(
                replica,
                &format!("CONFIG SET cluster-replica-no-failover {}", yes_no(partial)),
            );
        }
    }

    /// The nodes' ports, in start order.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// A `redis://` URL of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|&p| ask(p, "ROLE").is_some_and(|role| role.contains("master")))
            .collect()
    }

    /// SIGKILL of one node: what it had not replicated is lost; its replica takes over after the
    /// node timeout.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.children[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again (it rejoins from its nodes.conf, as a replica if it lost its
    /// slots meanwhile).
    pub fn start_again(&mut self, node: usize) -> Result<(), DevError> {
        self.start_node(node)
    }

    /// Kills one node and starts it again from `snapshot` (an RDB file, as `SAVE` left it): a
    /// restart from older persisted data. The file is removed once loaded, so that a later
    /// restart does not load it again.
    pub fn restart_from(&mut self, node: usize, snapshot: &Path) -> Result<(), DevError> {
        self.kill(node);
        let dump = self
            .dir
            .path()
            .join(format!("dump-{}.rdb", self.ports[node]));
        std::fs::copy(snapshot, &dump).map_err(io_err("copy the snapshot"))?;
        let started = self.start_node(node);
        let _ = std::fs::remove_file(&dump);
        started
    }

    /// `SAVE` on the node on `port`; returns a copy of the RDB file it wrote, kept in `to`.
    pub fn snapshot(&self, port: u16, to: &Path) -> Result<PathBuf, DevError> {
        let answer = ask(port, "SAVE").unwrap_or_default();
        if !answer.starts_with("+OK") {
            return Err(failed("SAVE", answer));
        }
        let dump = self.dir.path().join(format!("dump-{port}.rdb"));
        let copy = to.join(format!("snapshot-{port}.rdb"));
        std::fs::rename(&dump, &copy).map_err(io_err("keep the snapshot"))?;
        Ok(copy)
    }

    /// Whether some slot is left migrating or importing (a resharding cut short: a node killed or
    /// failed over while it moved keys), which only `redis-cli --cluster fix` ends.
    pub fn has_open_slots(&self) -> bool {
        self.ports.iter().any(|&p| {
            ask(p, "CLUSTER NODES")
                .is_some_and(|nodes| nodes.contains("->-") || nodes.contains("-<-"))
        })
    }

    /// `redis-cli --cluster fix`: open slots closed, uncovered slots given a primary. A key
    /// found on both sides of an open slot with different values (one node restarted from an
    /// older snapshot while the slot moved) stops the fix: as docs/operations.md tells operators,
    /// both copies are deleted (a cache entry or a fence, which cacheward makes again) and the fix
    /// run again, slot after slot.
    pub fn fix(&self) -> Result<(), DevError> {
        let cli = on_path("redis-cli").ok_or(DevError::MissingBinary("redis-cli", ""))?;
        let Some(&port) = self.primaries().first() else {
            return Err(failed("fixing the redis cluster", "no primary"));
        };
        // A resharding cut short leaves every slot it had opened with copies on both sides (the
        // slot's fence among them): one slot fixed per attempt, as long as each attempt stops at
        // a slot not seen before.
        let mut fixed = std::collections::BTreeSet::new();
        loop {
            // Debian's redis-cli asks before covering a slot no node serves even with
            // `--cluster-yes` ("Fix these slots by covering with a random node?"): every question
            // is answered yes on its stdin.
            let mut child = Command::new(&cli)
                .args([
                    "--cluster",
                    "fix",
                    &format!("127.0.0.1:{port}"),
                    "--cluster-yes",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(io_err("redis-cli --cluster fix"))?;
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write as _;
                // It may exit before reading them all: a broken pipe is no failure.
                let _ = stdin.write_all("yes\n".repeat(64).as_bytes());
            }
            let out = child
                .wait_with_output()
                .map_err(io_err("redis-cli --cluster fix"))?;
            if out.status.success() {
                return Ok(());
            }
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            let stopped = differing_copies(&said).filter(|(slot, _)| fixed.insert(*slot));
            let Some((slot, nodes)) = stopped else {
                return Err(failed("fixing the redis cluster", said));
            };
            // The keys of that slot both nodes hold (redis-cli prints a key only up to a NUL, and
            // cacheward's own keys hold one): read from the nodes themselves.
            let held = |node: u16| -> Vec<Vec<u8>> {
                let asked = redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100_000)
                    .clone();
                connect(node)
                    .and_then(|mut c| asked.query(&mut c).ok())
                    .unwrap_or_default()
            };
            let on_target = held(nodes[1]);
            let both: Vec<Vec<u8>> = held(nodes[0])
                .into_iter()
                .filter(|k| on_target.contains(k))
                .collect();
            if both.is_empty() {
                return Err(failed("fixing the redis cluster", said));
            }
            for node in nodes {
                for key in &both {
                    // ASKING: an importing node serves the key only when asked so.
                    let delete = redis::pipe().cmd("ASKING").ignore().del(key).clone();
                    if let Some(mut c) = connect(node) {
                        let _: redis::RedisResult<()> = delete.query(&mut c);
                    }
                }
            }
        }
    }

    /// Runs `command` on the node on `port`; its raw answer (empty if none came).
    pub fn ask(&self, port: u16, command: &str) -> String {
        ask(port, command).unwrap_or_default()
    }

    /// Freezes one node (SIGSTOP); [`RedisCluster::resume`] thaws it.
    pub fn pause(&self, node: usize) {
        if let Some(child) = &self.children[node] {
            signal(child, libc::SIGSTOP);
        }
    }

    pub fn resume(&self, node: usize) {
        if let Some(child) = &self.children[node] {
            signal(child, libc::SIGCONT);
        }
    }

    /// The node listening on `port`.
    pub fn node(&self, port: u16) -> Option<usize> {
        self.ports.iter().position(|p| *p == port)
    }

    /// The node id of the node on `port`.
    pub fn id(&self, port: u16) -> Option<String> {
        let answer = ask(port, "CLUSTER MYID")?;
        answer.lines().nth(1).map(str::to_owned)
    }

    /// The port of the replica of the primary on `port`.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let wanted = format!("master_port:{port}");
        self.ports.iter().copied().find(|&p| {
            ask(p, "INFO replication")
                .is_some_and(|info| info.contains("role:slave") && info.contains(&wanted))
        })
    }

    /// Cuts the replication link of the primary on `port`: its replication user is disabled and
    /// its replicas' connections killed, so its replica keeps what it had and misses every
    /// write from now on, awake and still eligible for promotion (`DEBUG SLEEP` would not do:
    /// the replica would apply the buffered stream on waking).
    pub fn cut_replication(&self, port: u16) -> Result<(), DevError> {
        cut_replication(port)
    }

    /// Moves `slots` slots from the primary on `from` to the one on `to` with `redis-cli
    /// --cluster reshard` (keys migrate one by one while clients keep going).
    pub fn reshard(&self, from: u16, to: u16, slots: u32) -> Result<(), DevError> {
        let cli = on_path("redis-cli").ok_or(DevError::MissingBinary("redis-cli", ""))?;
        let (from_id, to_id) = match (self.id(from), self.id(to)) {
            (Some(f), Some(t)) => (f, t),
            _ => return Err(failed("resharding", "a node did not say its id")),
        };
        let out = Command::new(cli)
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("redis-cli --cluster reshard"))?;
        if !out.status.success() {
            return Err(failed(
                "resharding the redis cluster",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        Ok(())
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in 0..NODES {
            self.resume(node);
            self.kill(node);
        }
    }
}

/// Starts a `redis-server` on 127.0.0.1:`port` with `args`, its files in `dir`, without
/// persistence; its replicas (if any) sync as [`REPLICATION_USER`], so a test can cut them off.
/// Returns once it answers PING.
pub(super) fn redis_node(dir: &Path, port: u16, args: &[String]) -> Result<Child, DevError> {
    let binary = on_path("redis-server").ok_or(DevError::MissingBinary("redis-server", ""))?;
    let log = dir.join(format!("node-{port}.log"));
    let child = command(&binary, None, libc::SIGKILL)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        // `redis-cli --cluster fix` compares a key found on both sides of a slot left open
        // (`DEBUG DIGEST-VALUE`): identical copies are merged instead of failing the fix.
        .args(["--enable-debug-command", "local"])
        .arg("--dbfilename")
        .arg(format!("dump-{port}.rdb"))
        .args([
            "--masteruser",
            REPLICATION_USER,
            "--masterauth",
            REPLICATION_PASSWORD,
        ])
        .args(["--user", REPLICATION_USER, "on"])
        .arg(format!(">{REPLICATION_PASSWORD}"))
        .args(["~*", "&*", "+@all"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err("spawn redis-server"))?;
    await_ready(child, "redis node", &log, Duration::from_secs(10), || {
        ask(port, "PING").is_some_and(|answer| answer.starts_with("+PONG"))
    })
}

/// Cuts the replication link of the primary on `port` (see `RedisCluster::cut_replication`).
pub(super) fn cut_replication(port: u16) -> Result<(), DevError> {
    for command in [
        format!("ACL SETUSER {REPLICATION_USER} off"),
        "CLIENT KILL TYPE replica".to_owned(),
    ] {
        let answer = ask(port, &command).unwrap_or_default();
        if answer.starts_with('-') || answer.is_empty() {
            return Err(failed("cutting a replication link", answer));
        }
    }
    Ok(())
}

/// Checks `done` every 50 ms until it holds; an error saying `what` did not happen within `limit`.
pub(super) fn poll_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), DevError> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(failed(what, format!("not done after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sends one inline command to a node over TCP and returns its raw answer (`None` if the node
/// does not answer within a second).
/// What `redis-cli --cluster fix` said stopped it on keys with different values on both sides of
/// an open slot: that slot, and the source's and the target's ports.
fn differing_copies(said: &str) -> Option<(u16, [u16; 2])> {
    let (before, after) = said.split_once("having different values")?;
    let slot = before
        .rsplit_once("Moving slot ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let port = |label: &str| -> Option<u16> {
        let (_, rest) = after.split_once(label)?;
        let address = rest.split_whitespace().next()?;
        address.rsplit_once(':')?.1.parse().ok()
    };
    Some((slot, [port("Source node:")?, port("Target node:")?]))
}

/// A connection of its own to the node on `port`; `None` when it does not answer.
fn connect(port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()
}

pub(super) fn ask(port: u16, command: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut answer = vec![0u8; 64 * 1024];
    let n = stream.read(&mut answer).ok()?;
    Some(String::from_utf8_lossy(&answer[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fix_stopped_by_differing_copies_names_the_slot_and_the_nodes() {
        // As redis-cli 7 prints it, colours included.
        let said = "\u{1b}[29;1m>>> Case 2: Moving all the 11679 slot keys to its owner \
            127.0.0.1:45033\n\u{1b}[0mMoving slot 11679 from 127.0.0.1:45017 to 127.0.0.1:45033: \
            \u{1b}[33;1m\n*** Target key exists\n\u{1b}[0m\u{1b}[31;1m*** Found 1 key(s) in both \
            source node and target node having different values.\n    Source node: \
            127.0.0.1:45017\n    Target node: 127.0.0.1:45033\n    Keys(s):\n\u{1b}[0m\u{1b}[31;1m    \
            - user:\n\u{1b}[0m";
        assert_eq!(differing_copies(said), Some((11679, [45017, 45033])));
        assert_eq!(
            differing_copies("*** Target key exists\n[ERR] Not all slots covered"),
            None
        );
    }

    #[test]
    fn keys_with_a_nul_are_listed_and_deleted_whole() {
        let options = crate::dev::RedisOptions {
            tcp: true,
            ..Default::default()
        };
        let redis = crate::dev::Redis::start_with(options).expect("a throwaway redis");
        let url = redis.tcp_url(0).expect("tcp");
        let port: u16 = url
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let key = &b"user:\0fence:7"[..];
        let mut c = connect(port).expect("a connection");
        let () = redis::cmd("SET").arg(key).arg("x").query(&mut c).unwrap();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        assert_eq!(keys, [key]);
        let deleted: (i64,) = redis::pipe()
            .cmd("PING")
            .ignore()
            .del(key)
            .query(&mut c)
            .unwrap();
        assert_eq!(deleted, (1,));
    }
}
