//! The `cacheward` binary: parses the command line and hands each command to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use cacheward::cli::client::{self, Client, ClientError};
use cacheward::config::{Config, Overrides};
#[cfg(feature = "dev")]
use cacheward::dev::{DevStack, SEED_USERS};
use cacheward::rpc::server;
use cacheward::runtime::signals::{self, Reloader};
use cacheward::runtime::{daemon, telemetry};
use cacheward::service::Hooks;
use cacheward::store::pg::{self as db, capture, connect, tables};

#[derive(Parser)]
#[command(
    name = "cacheward",
    version,
    about = "Keeps a Redis cache of a PostgreSQL users table correct"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Configuration file (must exist); default: ./config/cacheward.toml or /etc/cacheward/cacheward.toml
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Unix socket path (overrides socket.path)
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
}

impl Common {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&Overrides {
            file: self.config.clone(),
            socket: self.socket.clone(),
        })?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (logs to stderr)
    Serve {
        /// Throwaway PostgreSQL + Redis in a temp dir, seeded; sockets ./cacheward.sock and ./cacheward-resp.sock (Redis protocol); Ctrl-C removes it all
        #[cfg(feature = "dev")]
        #[arg(long)]
        dev: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Apply the embedded migrations and install each declared table's capture (idempotent)
    Migrate {
        /// Also drop the captures of tables no longer declared in the configuration
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Check the configuration as `serve` loads it (every wrong section named); with --connect
    /// also reach both backends and look at what the daemon needs there; exit 1 on any problem
    Check {
        /// Also reach PostgreSQL and Redis (TLS, password files) and check the migrations and
        /// each declared table's capture
        #[arg(long)]
        connect: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Compare every cached entry with the database; exit 1 if any differs
    Verify {
        /// Also drop each entry found wrong (the next read fills it from its row)
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Read a user, or with --table a declared table's row by COLUMN=VALUE... (cache-aside)
    Get {
        /// USERNAME, or with --table the key's (or the lookup's) COLUMN=VALUE pairs
        #[arg(required = true)]
        args: Vec<String>,
        /// A declared table
        #[arg(long)]
        table: Option<String>,
        /// Read by this lookup of the table instead of its key
        #[arg(long, requires = "table")]
        lookup: Option<String>,
        /// Answer a state at least this new (the `version` a write answered): read-your-writes
        #[arg(long)]
        min_version: Option<i64>,
        #[command(flatten)]
        common: Common,
    },
    /// Insert a declared table's row, or update the given columns of the row with its key
    Upsert {
        /// COLUMN=VALUE pairs, the key's among them (values as text, converted by PostgreSQL)
        #[arg(required = true)]
        pairs: Vec<String>,
        #[arg(long)]
        table: String,
        #[command(flatten)]
        common: Common,
    },
    /// Update the columns given with --set of a declared table's row found by its key
    Update {
        /// The key's COLUMN=VALUE pairs
        #[arg(required = true)]
        key: Vec<String>,
        #[arg(long)]
        table: String,
        /// COLUMN=VALUE to set (repeat for more columns)
        #[arg(long = "set", required = true)]
        set: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Get or create a user (write-through)
    Put {
        username: String,
        #[command(flatten)]
        common: Common,
    },
    /// Rename a user (write-through)
    Rename {
        old: String,
        new: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a user, or with --table a declared table's row by its key's COLUMN=VALUE pairs
    Delete {
        /// USERNAME, or with --table the key's COLUMN=VALUE pairs
        #[arg(required = true)]
        args: Vec<String>,
        #[arg(long)]
        table: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Print the daemon's counters
    Stats {
        #[command(flatten)]
        common: Common,
    },
    /// Print readiness; exit 0 only when ready
    Health {
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: on the request path every hop between tasks is then a queue push, never a
    // cross-thread wake-up, which the benchmark measures as 15-40% less CPU per request. Tokio's
    // own TOKIO_WORKER_THREADS=N selects its work-stealing runtime with N threads instead.
    let mut builder = match std::env::var_os("TOKIO_WORKER_THREADS") {
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
        None => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = builder
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "cacheward: {}",
                cacheward::support::secrets::scrub(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        #[cfg(feature = "dev")]
        Command::Serve { dev, common } => serve(dev, common).await,
        #[cfg(not(feature = "dev"))]
        Command::Serve { common } => serve(false, common).await,
        Command::Migrate { prune, common } => migrate(common, prune).await,
        Command::Verify { repair, common } => verify(common, repair).await,
        Command::Check { connect, common } => check(common, connect).await,
        Command::Get {
            args,
            table,
            lookup,
            min_version,
            common,
        } => {
            let mut params = target(&args, table)?;
            if let Some(lookup) = lookup {
                params["lookup"] = json!(lookup);
            }
            if let Some(min) = min_version {
                params["min_version"] = json!(min);
            }
            call(common, "get", params).await
        }
        Command::Upsert {
            pairs,
            table,
            common,
        } => {
            let params = json!({ "table": table, "row": client::pairs(&pairs).map_err(anyhow::Error::msg)? });
            call(common, "upsert", params).await
        }
        Command::Update {
            key,
            table,
            set,
            common,
        } => {
            let params = json!({
                "table": table,
                "key": client::pairs(&key).map_err(anyhow::Error::msg)?,
                "set": client::pairs(&set).map_err(anyhow::Error::msg)?,
            });
            call(common, "update", params).await
        }
        Command::Put { username, common } => {
            call(common, "put", json!({ "username": username })).await
        }
        Command::Rename { old, new, common } => {
            call(
                common,
                "rename",
                json!({ "username": old, "new_username": new }),
            )
            .await
        }
        Command::Delete {
            args,
            table,
            common,
        } => call(common, "delete", target(&args, table)?).await,
        Command::Stats { common } => call(common, "stats", Value::Null).await,
        Command::Health { common } => call(common, "health", Value::Null).await,
    }
}

async fn serve(dev: bool, common: Common) -> anyhow::Result<ExitCode> {
    let mut config = common.load()?;
    let logger = telemetry::init(&config.log)?;
    let stack = match dev {
        true => Some(dev_stack(&mut config, &common).await?),
        false => None,
    };
    config.require_backends()?;
    let config = Arc::new(config);
    let socket = server::bind(&config)?;
    if let Some(stack) = &stack {
        dev_banner(stack, &config);
    }
    // What `serve --dev` decided stays: the harness owns the backends and the socket.
    let pinned = dev.then(|| {
        (
            config.postgres.url.clone(),
            config.redis.url.clone(),
            config.socket.path.clone(),
        )
    });
    let reloader = Reloader::new(
        move || {
            let mut config = common.load()?;
            if let Some((postgres, redis, socket)) = &pinned {
                (config.postgres.url, config.redis.url) = (postgres.clone(), redis.clone());
                config.socket.path = socket.clone();
            }
            Ok(config)
        },
        (*config).clone(),
        logger,
    );
    let shutdown = CancellationToken::new();
    let signals = signals::watch(shutdown.clone(), reloader)?;
    // `serve --dev` leaves nothing behind: not even the CDC worker's id beside the socket.
    let holder_file = dev.then(|| cacheward::cdc::identity::holder_file(&config.socket.path));
    let result = daemon::run(config, socket, shutdown, Hooks::default()).await;
    signals.close();
    drop(stack);
    if let Some(file) = holder_file {
        let _ = std::fs::remove_file(file);
    }
    result.map(|()| ExitCode::SUCCESS)
}

/// The dev harness's servers behind `serve --dev` (the `dev` feature).
#[cfg(feature = "dev")]
type DevServers = DevStack;

/// Release builds have no dev harness: `serve --dev` does not exist there.
#[cfg(not(feature = "dev"))]
enum DevServers {}

/// Starts the dev servers and points `config` at them (socket `./cacheward.sock` unless given).
#[cfg(feature = "dev")]
async fn dev_stack(config: &mut Config, common: &Common) -> anyhow::Result<DevServers> {
    let stack = DevStack::start()
        .await
        .context("starting the dev servers")?;
    stack.configure(config);
    if common.socket.is_none() {
        config.socket.path = PathBuf::from("cacheward.sock");
    }
    if config.resp.socket.is_none() {
        config.resp.socket = Some(PathBuf::from("cacheward-resp.sock"));
    }
    Ok(stack)
}

#[cfg(not(feature = "dev"))]
async fn dev_stack(_: &mut Config, _: &Common) -> anyhow::Result<DevServers> {
    anyhow::bail!("this build has no dev harness (built without the `dev` feature)")
}

/// What `serve --dev` prints once the socket listens.
#[cfg(feature = "dev")]
fn dev_banner(stack: &DevServers, config: &Config) {
    let socket = config.socket.path.display();
    eprintln!(
        "\ncacheward dev: PostgreSQL in {pg}, Redis in {redis}\n\
         database: {url}\n\
         seeded users: {users} ({first} already cached); declared table: accounts (ids 1, 2)\n\
         socket: {socket}; Redis protocol: {resp}\n\n\
         try:  cargo run -- get user02 --socket {socket}     (first read comes from the database)\n      \
         cargo run -- put alice --socket {socket}\n      \
         cargo run -- rename alice bob --socket {socket}\n      \
         cargo run -- stats --socket {socket}\n      \
         echo '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{{\"table\":\"accounts\",\"lookup\":\"by_email\",\"key\":{{\"email\":\"ada@example.com\"}}}}}}' | nc -UN {socket}\n      \
         echo '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{{\"username\":\"user01\"}}}}' | nc -UN {socket}\n      \
         redis-cli -s {resp} MGET user:user01 accounts:1 accounts:by_email=ada@example.com\n\
         Ctrl-C stops the daemon and removes both servers and their data.\n",
        resp = config
            .resp
            .socket
            .as_deref()
            .unwrap_or(std::path::Path::new("-"))
            .display(),
        pg = stack.postgres.dir().display(),
        url = stack.database_url,
        redis = stack.redis.socket().display(),
        users = SEED_USERS.join(", "),
        first = SEED_USERS[0],
    );
}

#[cfg(not(feature = "dev"))]
fn dev_banner(stack: &DevServers, _: &Config) {
    match *stack {}
}

async fn migrate(common: Common, prune: bool) -> anyhow::Result<ExitCode> {
    let config = common.load()?;
    anyhow::ensure!(
        config.postgres.url.is_some(),
        "postgres.url is not set (set DATABASE_URL or postgres.url)"
    );
    let mut client = connect::pg_target(&config)?
        .connect()
        .await
        .context("connecting to postgres")?;
    let applied = db::migrate(&mut client).await?;
    if applied.is_empty() {
        println!("schema is up to date ({} migrations)", db::MIGRATIONS.len());
    } else {
        println!("applied migrations: {applied:?}");
    }
    let declared = tables::resolve_all(&client, &config).await?;
    let installed = capture::install(&mut client, &declared).await?;
    if !installed.is_empty() {
        println!("installed the capture of: {}", installed.join(", "));
    }
    if prune {
        let pruned = capture::prune(&mut client, &config).await?;
        if !pruned.is_empty() {
            println!("dropped the capture of: {}", pruned.join(", "));
        }
    } else {
        let left = capture::undeclared(&client, &config).await?;
        if !left.is_empty() {
            println!(
                "captures of tables no longer declared are left in place (drop them with \
                 `cacheward migrate --prune`): {}",
                left.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The params naming a user (one USERNAME) or, with `table`, a declared table's row (its key's
/// COLUMN=VALUE pairs).
fn target(args: &[String], table: Option<String>) -> anyhow::Result<Value> {
    Ok(match table {
        Some(table) => {
            json!({ "table": table, "key": client::pairs(args).map_err(anyhow::Error::msg)? })
        }
        None => match args {
            [username] => json!({ "username": username }),
            _ => anyhow::bail!("expected one USERNAME (or --table TABLE and COLUMN=VALUE pairs)"),
        },
    })
}

async fn check(common: Common, connect: bool) -> anyhow::Result<ExitCode> {
    let config = match common.load() {
        Ok(config) => config,
        Err(e) => {
            for line in cacheward::support::secrets::scrub(&format!("{e:#}")).lines() {
                println!("config: {line}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("config: ok");
    if !connect {
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = config.require_backends() {
        println!("config: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let found = cacheward::cli::check::backends(&config).await;
    for fine in &found.ok {
        println!("{fine}");
    }
    for problem in &found.problems {
        println!("problem: {problem}");
    }
    Ok(match found.problems.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

async fn verify(common: Common, repair: bool) -> anyhow::Result<ExitCode> {
    let config = common.load()?;
    config.require_backends()?;
    let report = cacheward::cli::verify::verify(&config, repair).await?;
    use cacheward::cli::verify::printable;
    for m in &report.mismatches {
        let repaired = match m.repaired {
            None => "",
            Some(true) => "; repaired: dropped, the next read fills it from its row",
            Some(false) => "; not repaired: it changed since, left as it is",
        };
        println!(
            "mismatch {}: cached {} database {}{repaired}",
            printable(&m.key),
            printable(&m.cached),
            printable(m.row.as_deref().unwrap_or("(no row)"))
        );
    }
    for key in &report.foreign {
        println!(
            "foreign {}: holds a value that is not cacheward's; left alone",
            printable(key)
        );
    }
    let repaired = match repair {
        true => {
            let n = report
                .mismatches
                .iter()
                .filter(|m| m.repaired == Some(true));
            format!(" ({} repaired)", n.count())
        }
        false => String::new(),
    };
    println!(
        "checked {} cached entries: {} mismatches{repaired}, {} foreign values",
        report.checked,
        report.mismatches.len(),
        report.foreign.len()
    );
    Ok(
        if report.mismatches.is_empty() && report.foreign.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

async fn call(common: Common, method: &str, params: Value) -> anyhow::Result<ExitCode> {
    let config = common.load()?;
    let mut client = Client::connect(&config.socket.path).await?;
    let print = |value: &Value| {
        if std::io::stdout().is_terminal() {
            serde_json::to_string_pretty(value)
        } else {
            serde_json::to_string(value)
        }
        .expect("JSON values serialize")
    };
    match client.call(method, params).await {
        Ok(result) => {
            println!("{}", print(&result));
            let unready = method == "health" && result["ready"] != json!(true);
            Ok(if unready {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(ClientError::Rpc(error)) => {
            eprintln!("{}", print(&error));
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}
