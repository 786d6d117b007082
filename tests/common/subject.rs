//! What a race test changes, so that one test body runs over `users` and over a declared table:
//! `orders`, keyed by `(region text, id bigint)` with `:` and `=` in every region. A test names
//! rows by a short name; for users it is the username, for orders the region `x:=NAME` of row
//! `id = 1`, so that a rename is a key change either way.

use std::time::Duration;

use serde_json::{json, Value};

use super::{wait_until, Rpc, TestEnv};
use cacheward::config::{Config, TableConfig};
use cacheward::store::pg::{capture, tables};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Users,
    Orders,
}

const ORDERS: &str = "CREATE TABLE orders (region text NOT NULL, id bigint NOT NULL,
                                           note text NOT NULL DEFAULT '', PRIMARY KEY (region, id))";

/// How `orders` is declared, in a configuration file.
pub const ORDERS_TOML: &str = "[tables.orders]\nkey = [\"region\", \"id\"]\n";

impl Subject {
    /// The region of the row named `name`.
    fn region(name: &str) -> String {
        format!("x:={name}")
    }

    /// Makes the subject's table (a declared one with its capture), and returns `config` serving
    /// it. A daemon started in `env`'s directory as a process reads the same declaration.
    pub async fn prepare(self, env: &TestEnv, mut config: Config) -> Config {
        if self == Subject::Users {
            return config;
        }
        config
            .tables
            .insert("orders".into(), TableConfig::keyed(&["region", "id"]));
        let mut pg = env.pg().await;
        pg.batch_execute(ORDERS).await.unwrap();
        let checked = tables::resolve_all(&pg, &config).await.unwrap();
        capture::install(&mut pg, &checked).await.unwrap();
        let dir = env.dir.path().join("config");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cacheward.toml"), ORDERS_TOML).unwrap();
        config
    }

    /// Waits until the daemon on `client` serves the subject (a declared table is unavailable
    /// until it has been checked against the catalog).
    pub async fn served(self, client: &mut Rpc) {
        if self == Subject::Users {
            return;
        }
        let params = self.params("served?");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while super::kind(&client.call("get", params.clone()).await) == "unavailable" {
            assert!(std::time::Instant::now() < deadline, "orders never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `get` params of row `name`.
    pub fn params(self, name: &str) -> Value {
        match self {
            Subject::Users => json!({"username": name}),
            Subject::Orders => {
                json!({"table": "orders", "key": {"region": Subject::region(name), "id": 1}})
            }
        }
    }

    /// The text of row `name`'s key after the prefix (what the fill hooks are called with).
    pub fn key_text(self, name: &str) -> String {
        match self {
            Subject::Users => name.to_owned(),
            Subject::Orders => format!("x%3A%3D{name}:1"),
        }
    }

    /// Row `name`'s key in Redis.
    pub fn redis_key(self, name: &str) -> String {
        match self {
            Subject::Users => format!("user:{name}"),
            Subject::Orders => format!("orders:{}", self.key_text(name)),
        }
    }

    /// SQL inserting rows `names`.
    pub fn insert_sql(self, names: &[&str]) -> String {
        let rows: Vec<String> = names
            .iter()
            .map(|n| match self {
                Subject::Users => format!("('{n}')"),
                Subject::Orders => format!("('{}', 1)", Subject::region(n)),
            })
            .collect();
        match self {
            Subject::Users => format!("INSERT INTO users (username) VALUES {}", rows.join(", ")),
            Subject::Orders => {
                format!("INSERT INTO orders (region, id) VALUES {}", rows.join(", "))
            }
        }
    }

    /// SQL moving row `from` to key `to`.
    pub fn rename_sql(self, from: &str, to: &str) -> String {
        match self {
            Subject::Users => {
                format!("UPDATE users SET username = '{to}' WHERE username = '{from}'")
            }
            Subject::Orders => format!(
                "UPDATE orders SET region = '{}' WHERE region = '{}' AND id = 1",
                Subject::region(to),
                Subject::region(from)
            ),
        }
    }

    /// SQL changing row `name` without changing its key.
    pub fn touch_sql(self, name: &str) -> String {
        match self {
            Subject::Users => format!(
                "UPDATE users SET created_at = created_at - interval '1 day' WHERE username = '{name}'"
            ),
            Subject::Orders => format!(
                "UPDATE orders SET note = note || '+' WHERE region = '{}' AND id = 1",
                Subject::region(name)
            ),
        }
    }

    /// SQL deleting row `name`.
    pub fn delete_sql(self, name: &str) -> String {
        match self {
            Subject::Users => format!("DELETE FROM users WHERE username = '{name}'"),
            Subject::Orders => format!(
                "DELETE FROM orders WHERE region = '{}' AND id = 1",
                Subject::region(name)
            ),
        }
    }

    /// The fence its TRUNCATE raises: users' (which guards every table's entries besides), or
    /// the declared table's own.
    pub fn fence_key(self) -> &'static str {
        match self {
            Subject::Users => "user:",
            Subject::Orders => "orders:\0fence",
        }
    }

    pub fn truncate_sql(self) -> &'static str {
        match self {
            Subject::Users => "TRUNCATE users",
            Subject::Orders => "TRUNCATE orders",
        }
    }

    /// The request creating row `name` (`put` for users, `upsert` for a declared table).
    pub fn put_call(self, name: &str) -> (&'static str, Value) {
        match self {
            Subject::Users => ("put", json!({"username": name})),
            Subject::Orders => {
                let row = json!({"region": Subject::region(name), "id": 1, "note": "put"});
                ("upsert", json!({"table": "orders", "row": row}))
            }
        }
    }

    /// The request moving row `from` to key `to`.
    pub fn rename_call(self, from: &str, to: &str) -> (&'static str, Value) {
        match self {
            Subject::Users => ("rename", json!({"username": from, "new_username": to})),
            Subject::Orders => {
                let key = json!({"region": Subject::region(from), "id": 1});
                let set = json!({"region": Subject::region(to)});
                ("update", json!({"table": "orders", "key": key, "set": set}))
            }
        }
    }

    /// Gets row `name` through the daemon: the whole answer.
    pub async fn get(self, client: &mut Rpc, name: &str) -> Value {
        client.call("get", self.params(name)).await
    }

    /// Creates rows `names` through the daemon (a write, so cached at once).
    pub async fn put(self, client: &mut Rpc, names: &[&str]) {
        for name in names {
            let (method, params) = self.put_call(name);
            let answer = client.call(method, params).await;
            assert!(answer.get("result").is_some(), "{answer}");
        }
    }

    /// Deletes row `name` through the daemon; whether it was there.
    pub async fn delete(self, client: &mut Rpc, name: &str) -> bool {
        let answer = client.call("delete", self.params(name)).await;
        answer["result"]["deleted"]
            .as_bool()
            .expect("a delete's answer")
    }

    /// Moves row `from` to key `to` through the daemon.
    pub async fn rename(self, client: &mut Rpc, from: &str, to: &str) {
        let (method, params) = self.rename_call(from, to);
        let answer = client.call(method, params).await;
        assert!(answer.get("result").is_some(), "{answer}");
    }

    /// The raw value at row `name`'s key.
    pub async fn cached(self, env: &TestEnv, name: &str) -> Option<String> {
        let mut conn = env.redis().await;
        redis::cmd("GET")
            .arg(self.redis_key(name))
            .query_async(&mut conn)
            .await
            .expect("redis GET")
    }

    /// Row `name` as the cache holds it (a user's JSON, a declared table's ROW), if live.
    pub async fn live(self, env: &TestEnv, name: &str) -> Option<Value> {
        let raw = self.cached(env, name).await?;
        if !cacheward::model::entry::is_live(&raw) {
            return None;
        }
        let value: Value = serde_json::from_str(&raw).unwrap();
        Some(match self {
            Subject::Users => value,
            Subject::Orders => value["row"].clone(),
        })
    }

    /// Row `name` as the daemon would serve it, straight from PostgreSQL.
    pub async fn row_json(self, env: &TestEnv, name: &str) -> Option<Value> {
        match self {
            Subject::Users => env.row_json(name).await,
            Subject::Orders => {
                let row = env
                    .pg()
                    .await
                    .query_opt(
                        "SELECT row_to_json(o)::text FROM orders o WHERE region = $1 AND id = 1",
                        &[&Subject::region(name)],
                    )
                    .await
                    .unwrap();
                row.map(|r| serde_json::from_str(r.get(0)).unwrap())
            }
        }
    }

    /// What a get of row `name` answered with: the user or the row.
    pub fn answered(self, answer: &Value) -> Value {
        match self {
            Subject::Users => answer["result"]["user"].clone(),
            Subject::Orders => answer["result"]["row"].clone(),
        }
    }

    /// Whether Redis agrees with the database for every row of `names`: a live entry equal to
    /// the row, or, without a row, no live entry.
    pub async fn agrees(self, env: &TestEnv, names: &[&str]) -> bool {
        for name in names {
            match (self.live(env, name).await, self.row_json(env, name).await) {
                (Some(c), Some(r)) if c != r => return false,
                (Some(_), None) => return false,
                _ => {}
            }
        }
        true
    }

    /// Waits (1 s: Guarantee 1) until row `from` is gone from the cache and row `to` holds its
    /// current row.
    pub async fn renamed(self, env: &TestEnv, from: &str, to: &str) {
        wait_until("the rename applied", Duration::from_secs(1), || async {
            self.live(env, from).await.is_none()
                && self.live(env, to).await == self.row_json(env, to).await
        })
        .await;
    }
}
