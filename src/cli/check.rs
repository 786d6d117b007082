//! `cacheward check [--connect]`: the configuration is loaded and checked as `serve` would
//! (every wrong section named, by the caller); with `--connect` the backends are reached the way
//! the daemon reaches them (TLS, password files) and what the daemon needs of them is looked at:
//! the migrations applied, each declared table's capture installed as declared. Each finding
//! says what to do about it.

use std::time::Duration;

use crate::config::Config;
use crate::model::table::Table;
use crate::store::pg::{self as db, capture, tables};
use crate::store::redis::{bounded, client};

/// How long one backend may take to answer.
const BOUND: Duration = Duration::from_secs(5);

/// What `check --connect` found: what holds, and what does not (each with its remedy).
#[derive(Debug, Default)]
pub struct Findings {
    pub ok: Vec<String>,
    pub problems: Vec<String>,
}

impl Findings {
    /// The problems found with one backend (`"postgres"`, `"redis"`).
    pub fn problems_with(&self, backend: &str) -> Vec<&str> {
        let found = self.problems.iter().filter(|p| p.starts_with(backend));
        found.map(String::as_str).collect()
    }

    fn say(&mut self, result: Result<String, String>) {
        match result {
            Ok(fine) => self.ok.push(fine),
            Err(problem) => self.problems.push(problem),
        }
    }
}

/// Reaches both backends as `config` says and looks at what the daemon needs there.
pub async fn backends(config: &Config) -> Findings {
    let mut found = Findings::default();
    postgres(config, &mut found).await;
    for result in redis(config).await {
        found.say(result);
    }
    found
}

async fn postgres(config: &Config, found: &mut Findings) {
    let target = match db::connect::pg_target(config) {
        Ok(target) => target,
        Err(e) => return found.say(Err(format!("postgres: {e}"))),
    };
    let client = match tokio::time::timeout(BOUND, target.connect()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return found.say(Err(format!("postgres: cannot connect: {e}"))),
        Err(_) => return found.say(Err(format!("postgres: no answer within {BOUND:?}"))),
    };
    found.say(Ok("postgres: reached".into()));
    // The migrations recorded (none if the record itself is missing).
    let applied: Vec<i32> = match client
        .query(
            "SELECT version FROM cacheward_migrations WHERE to_regclass('cacheward_migrations') IS NOT NULL",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(_) => Vec::new(),
    };
    let missing: Vec<String> = db::MIGRATIONS
        .iter()
        .filter(|(version, _, _)| !applied.contains(version))
        .map(|(version, name, _)| format!("{version} ({name})"))
        .collect();
    found.say(match missing.is_empty() {
        true => Ok(format!(
            "postgres: schema up to date ({} migrations)",
            db::MIGRATIONS.len()
        )),
        false => Err(format!(
            "postgres: migrations not applied: {} (run `cacheward migrate`)",
            missing.join(", ")
        )),
    });
    if !missing.is_empty() {
        return;
    }
    let users = capture::USERS_TRIGGERS.map(String::from);
    always(&client, "users", "postgres: users' capture", &users, found).await;
    let declared = match tables::resolve_all(&client, config).await {
        Ok(declared) => declared,
        Err(e) => return found.say(Err(format!("postgres: {e}"))),
    };
    for table in &declared {
        match capture::installed(&client, table).await {
            Ok(()) => {
                let what = format!("table {}: capture", table.name);
                let triggers = capture::triggers(&table.name);
                always(&client, &table.source, &what, &triggers, found).await;
            }
            // It names the table and says what to run.
            Err(e) => found.say(Err(e.to_string())),
        }
    }
    grants(&client, &declared, found).await;
}

/// Says whether every trigger of `what` (on `source`, named `names`) fires in every session: a
/// problem for each that does not (see `capture::not_always`).
async fn always(
    client: &tokio_postgres::Client,
    source: &str,
    what: &str,
    names: &[String],
    found: &mut Findings,
) {
    match capture::not_always(client, source, names).await {
        Ok(wrong) if wrong.is_empty() => found.say(Ok(format!("{what} installed"))),
        Ok(wrong) => {
            for problem in wrong {
                found.say(Err(format!("{what}: {problem}")));
            }
        }
        Err(e) => found.say(Err(format!("{what}: cannot read its triggers: {e}"))),
    }
}

/// The rights the daemon's role needs (sql/roles.sql's `cacheward_runtime`), on cacheward's
/// objects and on each declared table: each one the connecting role lacks is named with the
/// statement that grants it.
async fn grants(client: &tokio_postgres::Client, declared: &[Table], found: &mut Findings) {
    let mut wanted: Vec<(&str, String, &str)> = vec![
        ("TABLE", "users".into(), "SELECT, INSERT, UPDATE, DELETE"),
        ("TABLE", "cacheward_outbox".into(), "SELECT, DELETE"),
        ("TABLE", "cacheward_cdc_settings".into(), "SELECT, UPDATE"),
        (
            "TABLE",
            "cacheward_cdc_cursors".into(),
            "SELECT, INSERT, UPDATE",
        ),
        (
            "TABLE",
            "cacheward_cdc_leases".into(),
            "SELECT, INSERT, UPDATE, DELETE",
        ),
        ("TABLE", "cacheward_row_versions".into(), "SELECT"),
        ("TABLE", "cacheward_tables".into(), "SELECT"),
        ("SEQUENCE", "cacheward_version_seq".into(), "SELECT, USAGE"),
    ];
    for table in declared {
        let rights = match table.writable {
            true => "SELECT, INSERT, UPDATE, DELETE",
            false => "SELECT",
        };
        wanted.push(("TABLE", table.source.clone(), rights));
    }
    let role: String = match client.query_one("SELECT current_user::text", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return found.say(Err(format!("postgres: cannot read the role: {e}"))),
    };
    let mut missing = Vec::new();
    for (kind, object, rights) in &wanted {
        let function = match *kind {
            "TABLE" => "has_table_privilege",
            _ => "has_sequence_privilege",
        };
        for right in rights.split(", ") {
            let sql = format!("SELECT {function}($1, $2)");
            let has: bool = match client.query_one(&sql, &[object, &right]).await {
                Ok(row) => row.get(0),
                Err(e) => {
                    missing.push(format!("{right} on {object} cannot be checked: {e}"));
                    continue;
                }
            };
            if !has {
                missing.push(format!(
                    "lacks {right} on {object}: GRANT {right} ON {kind} {object} TO {};",
                    tables::quote_ident(&role)
                ));
            }
        }
    }
    if missing.is_empty() {
        found.say(Ok(format!(
            "postgres: role {role} has the rights the daemon needs"
        )));
    }
    for lack in missing {
        found.say(Err(format!("postgres: role {role} {lack}")));
    }
}

/// Each Redis server the configuration names (the URL, the seeds of a Cluster, the sentinels),
/// reached as the daemon reaches it and asked for a PING; then every server the daemon reads and
/// writes, with what its user may run there: the URL's, every primary of a Cluster (its seeds
/// and those they name), the master the sentinels name.
async fn redis(config: &Config) -> Vec<Result<String, String>> {
    use crate::config::RedisMode;
    let urls: Vec<(&str, &crate::config::SecretUrl)> = config
        .redis
        .url
        .iter()
        .map(|u| ("redis.url", u))
        .chain(config.redis.urls.iter().map(|u| ("redis.urls", u)))
        .collect();
    let mut said = Vec::new();
    // A reached seed of a Cluster, to ask for the others; the addresses probed already.
    let mut seed = None;
    let mut probed = Vec::new();
    for (key, url) in urls {
        // Under Sentinel, redis.url only lends its settings (user, TLS) to the master.
        if config.redis.mode == RedisMode::Sentinel && key == "redis.url" {
            continue;
        }
        let shown = url.redacted();
        let info = match client::connection_info(url, key) {
            Ok(info) => info,
            Err(e) => {
                said.push(Err(format!("redis {shown}: {e}")));
                continue;
            }
        };
        // Sentinels serve no data: reached as the daemon reaches them (their answers bounded),
        // never probed; only the servers the daemon reads and writes are.
        if config.redis.mode == RedisMode::Sentinel {
            reach_sentinel(config, &info, &shown, &mut said).await;
            continue;
        }
        let Some(conn) = reach(config, &info, &shown, &mut said).await else {
            continue;
        };
        probe(config, &conn, &shown, &user_of(&info), &mut said).await;
        probed.push(info.addr().clone());
        if config.redis.mode == RedisMode::Cluster && seed.is_none() {
            seed = Some((info, conn));
        }
    }
    match config.redis.mode {
        RedisMode::Cluster => {
            if let Some((info, conn)) = seed {
                primaries(config, &info, conn, &probed, &mut said).await;
            }
        }
        RedisMode::Sentinel => master(config, &mut said).await,
        RedisMode::Standalone => {}
    }
    said
}

/// The user a connection's settings log in as.
fn user_of(info: &redis::ConnectionInfo) -> String {
    info.redis_settings()
        .username()
        .unwrap_or("default")
        .to_owned()
}

/// A connection to the server at `info`, if it answers a PING within [`BOUND`]; says which.
async fn reach(
    config: &Config,
    info: &redis::ConnectionInfo,
    shown: &str,
    said: &mut Vec<Result<String, String>>,
) -> Option<redis::aio::ConnectionManager> {
    let reached = async {
        let mut conn = client::manager(config, info.clone(), Some(BOUND), None)?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| why(config, e))?;
        Ok::<_, String>(conn)
    };
    reached_within(reached, shown, said).await
}

/// The sentinel at `info` answers a PING within [`BOUND`], over the bounded connection the daemon
/// uses for sentinels (see `store::redis::bounded`); says which.
async fn reach_sentinel(
    config: &Config,
    info: &redis::ConnectionInfo,
    shown: &str,
    said: &mut Vec<Result<String, String>>,
) {
    let reached = async {
        let (mut conn, driver) = bounded::connection(config, info)
            .await
            .map_err(|e| why(config, e))?;
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        tokio::select! {
            answer = ping => answer.map(|_| ()).map_err(|e| why(config, e)),
            () = driver => Err("the connection ended".to_owned()),
        }
    };
    reached_within(reached, shown, said).await;
}

/// What `reached` gives within [`BOUND`], said as reached or not.
async fn reached_within<T>(
    reached: impl std::future::Future<Output = Result<T, String>>,
    shown: &str,
    said: &mut Vec<Result<String, String>>,
) -> Option<T> {
    match tokio::time::timeout(BOUND, reached).await {
        Ok(Ok(conn)) => {
            said.push(Ok(format!("redis {shown}: reached")));
            Some(conn)
        }
        Ok(Err(e)) => {
            said.push(Err(format!("redis {shown}: cannot reach: {e}")));
            None
        }
        Err(_) => {
            said.push(Err(format!("redis {shown}: no answer within {BOUND:?}")));
            None
        }
    }
}

/// What a failed connection says, as the daemon says it ("TLS failed", "refused the
/// connection"), and for TLS the files it was made with (the system's roots when none).
fn why(config: &Config, e: redis::RedisError) -> String {
    let e = crate::store::redis::CacheError::from(e);
    let r = &config.redis;
    let custom = r.tls_ca_file.is_some() || r.tls_cert_file.is_some();
    match e.kind() {
        crate::store::redis::CacheErrorKind::Tls if custom => client::tls_files_failed(config, &e),
        crate::store::redis::CacheErrorKind::Tls => format!("{e} (the system's roots)"),
        _ => e.to_string(),
    }
}

/// Every primary of the Cluster `seed` belongs to that was not probed as a seed: reached with
/// the seed's settings, and probed.
async fn primaries(
    config: &Config,
    info: &redis::ConnectionInfo,
    mut seed: redis::aio::ConnectionManager,
    probed: &[redis::ConnectionAddr],
    said: &mut Vec<Result<String, String>>,
) {
    let nodes = match redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async::<String>(&mut seed)
        .await
    {
        Ok(nodes) => nodes,
        Err(e) => {
            let shown = address(info.addr());
            return said.push(Err(format!(
                "redis {shown}: CLUSTER NODES failed, the other primaries are not checked: {e}"
            )));
        }
    };
    for (host, port) in primary_addresses(&nodes) {
        let Ok(node) = client::at_address(Some(info), &host, port) else {
            continue;
        };
        if probed.contains(node.addr()) {
            continue;
        }
        let shown = format!("{} (a primary of the cluster)", address(node.addr()));
        if let Some(conn) = reach(config, &node, &shown, said).await {
            probe(config, &conn, &shown, &user_of(&node), said).await;
        }
    }
}

/// The `host:port` of every primary `CLUSTER NODES` lists that is not failed or without address.
fn primary_addresses(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            let serving = flags.contains(&"master")
                && !flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"));
            // ip:port@cport[,hostname]
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            serving.then(|| Some((host.to_owned(), port.parse().ok()?)))?
        })
        .collect()
}

fn address(addr: &redis::ConnectionAddr) -> String {
    match addr {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        redis::ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

/// The master the sentinels name, reached as the daemon reaches it, and probed.
async fn master(config: &Config, said: &mut Vec<Result<String, String>>) {
    let name = config.redis.sentinel_master.clone().unwrap_or_default();
    let sentinel = match crate::store::redis::sentinel::SentinelConn::new(config, None) {
        Ok(sentinel) => sentinel,
        Err(e) => return said.push(Err(format!("redis master {name}: {e}"))),
    };
    let asked = async {
        let (host, port) = sentinel.ask_sentinels().await?;
        sentinel.command(&redis::cmd("PING")).await?;
        Ok::<_, redis::RedisError>(format!("{host}:{port}"))
    };
    let at = match tokio::time::timeout(BOUND, asked).await {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => {
            return said.push(Err(format!(
                "redis master {name}: cannot reach it through the sentinels: {e}"
            )))
        }
        Err(_) => {
            return said.push(Err(format!(
                "redis master {name}: no answer within {BOUND:?}"
            )))
        }
    };
    let shown = format!("master {name} at {at}");
    said.push(Ok(format!("redis {shown}: reached")));
    let user = match &config.redis.url {
        Some(url) => client::connection_info(url, "redis.url")
            .map(|info| user_of(&info))
            .unwrap_or_else(|_| "default".into()),
        None => "default".into(),
    };
    let run = |cmd: redis::Cmd| {
        let sentinel = sentinel.clone();
        async move { sentinel.command(&cmd).await }
    };
    tell(refused(config, run).await, &shown, &user, said);
}

/// Whether the user of `conn` may run what the daemon runs on its server; says so, or names
/// each right it lacks.
async fn probe(
    config: &Config,
    conn: &redis::aio::ConnectionManager,
    shown: &str,
    user: &str,
    said: &mut Vec<Result<String, String>>,
) {
    let run = |cmd: redis::Cmd| {
        let mut conn = conn.clone();
        async move { cmd.query_async::<redis::Value>(&mut conn).await }
    };
    tell(refused(config, run).await, shown, user, said);
}

fn tell(
    refused: Vec<(String, String, String)>,
    shown: &str,
    user: &str,
    said: &mut Vec<Result<String, String>>,
) {
    if refused.is_empty() {
        said.push(Ok(format!(
            "redis {shown}: user {user} may run what the daemon runs"
        )));
    }
    for (what, grant, e) in refused {
        said.push(Err(format!(
            "redis {shown}: user {user} may not {what}: {e}: ACL SETUSER {user} {grant}"
        )));
    }
}

/// What the daemon runs on a data server, each tried in a form that changes nothing (a `SET …
/// XX` of a key that does not exist) on a key under each prefix cacheward writes: those Redis
/// refuses (an ACL's `NOPERM`), with the ACL rules that allow it and Redis's error.
async fn refused<F, Fut>(config: &Config, mut run: F) -> Vec<(String, String, String)>
where
    F: FnMut(redis::Cmd) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<redis::Value>>,
{
    let mut prefixes = vec![config.cache.key_prefix.clone()];
    for (name, table) in &config.tables {
        prefixes.push(table.prefix(name));
    }
    let mut refused = Vec::new();
    let mut tries: Vec<(String, String, redis::Cmd)> = vec![("run INFO".into(), "+info".into(), {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        cmd
    })];
    for (sub, what) in [
        (
            "GETNAME",
            "run CLIENT GETNAME (reads wait for a look at a new connection)",
        ),
        (
            "SETNAME",
            "run CLIENT SETNAME (reads wait for a look at a new connection)",
        ),
    ] {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg(sub);
        if sub == "SETNAME" {
            cmd.arg("cacheward-check");
        }
        let grant = format!("+client|{}", sub.to_lowercase());
        tries.push((what.into(), grant, cmd));
    }
    if config.cache.local_max_bytes > 0 {
        let mut on = redis::cmd("CLIENT");
        on.arg("TRACKING").arg("ON").arg("OPTIN").arg("NOLOOP");
        let mut off = redis::cmd("CLIENT");
        off.arg("TRACKING").arg("OFF");
        let (what, grant) = ("run CLIENT TRACKING (the near cache)", "+client|tracking");
        tries.push((what.into(), grant.into(), on));
        tries.push((what.into(), grant.into(), off));
    }
    for prefix in &prefixes {
        let probe = format!("{prefix}\0check");
        let shown = prefix.escape_debug();
        let mut get = redis::cmd("MGET");
        get.arg(&probe).arg(&probe);
        let keys = format!("'~{shown}*'");
        tries.push((
            format!("read keys under '{shown}' (MGET)"),
            format!("+mget {keys}"),
            get,
        ));
        let mut kind = redis::cmd("TYPE");
        kind.arg(&probe);
        tries.push((
            format!("run TYPE on keys under '{shown}'"),
            format!("+type {keys}"),
            kind,
        ));
        let mut scan = redis::cmd("SCAN");
        scan.arg(0).arg("MATCH").arg(&probe).arg("COUNT").arg(1);
        tries.push((
            format!("SCAN keys under '{shown}'"),
            format!("+scan {keys}"),
            scan,
        ));
        let mut set = redis::cmd("SET");
        set.arg(&probe).arg("").arg("XX").arg("PX").arg(1);
        tries.push((
            format!("write keys under '{shown}' (SET)"),
            format!("+set {keys}"),
            set,
        ));
        let mut eval = redis::cmd("EVAL");
        eval.arg("return redis.call('SET', KEYS[1], '', 'XX', 'PX', 1)")
            .arg(1)
            .arg(&probe);
        let what = format!("write keys under '{shown}' from a script (EVAL)");
        tries.push((what, format!("+eval {keys}"), eval));
    }
    for (what, grant, cmd) in tries {
        // A refusal comes as an error, or (through the Sentinel connection) as an error value.
        let denied = match run(cmd).await {
            Err(e) if e.code() == Some("NOPERM") || e.to_string().contains("NoPerm") => {
                Some(e.to_string())
            }
            Ok(redis::Value::ServerError(e)) if e.code() == "NOPERM" => Some(e.to_string()),
            _ => None,
        };
        if let Some(e) = denied {
            if !refused.iter().any(|(w, _, _)| *w == what) {
                refused.push((what, grant, e));
            }
        }
    }
    refused
}
