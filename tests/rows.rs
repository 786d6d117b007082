//! Guarantee 8, hostile data: no legal value in `users` stops the CDC worker or fails a
//! neighbouring request. Columns of every type PostgreSQL 15 ships (and an enum, a composite and a
//! domain) are added with `ALTER TABLE`, rows with extreme values are written by plain SQL, and
//! every change must reach Redis and every `get` must answer the row, checked by PostgreSQL itself.

mod common;

use std::time::Duration;

use common::{kind, wait_until, Rpc, TestEnv};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// (column type, extreme values as SQL expressions). `NULL` is tried for every column too.
fn columns() -> Vec<(&'static str, Vec<String>)> {
    let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let big = format!("'1{}'::numeric", "0".repeat(1000));
    let tiny = format!("'0.{}1'::numeric", "0".repeat(900));
    let long_text = format!("'{}'", "x".repeat(100_000));
    let deep_json = format!("'{}{}'", "[".repeat(2000), "]".repeat(2000));
    let deep_jsonb = format!("'{}1{}'", "[".repeat(500), "]".repeat(500));
    vec![
        ("smallint", v(&["-32768", "32767"])),
        ("integer", v(&["-2147483648", "2147483647"])),
        (
            "bigint",
            v(&["-9223372036854775808", "9223372036854775807"]),
        ),
        (
            "numeric",
            vec![
                "'NaN'".into(),
                "'Infinity'".into(),
                "'-Infinity'".into(),
                big,
                tiny,
            ],
        ),
        (
            "real",
            v(&["'NaN'", "'Infinity'", "'-Infinity'", "3.4e38", "1e-45"]),
        ),
        (
            "double precision",
            v(&["'NaN'", "'-Infinity'", "1.7976931348623157e308", "5e-324"]),
        ),
        (
            "money",
            v(&["'-92233720368547758.08'", "'92233720368547758.07'"]),
        ),
        (
            "text",
            vec![
                "''".into(),
                long_text,
                r"E'\x01\x1b]0;title\x07 esc'".into(),
                r#"E'"quotes" \\ backslash \n newline'"#.into(),
                "'𝄞 ñ 中文 \u{202e}'".into(),
            ],
        ),
        ("varchar(5)", v(&["'abcde'"])),
        ("char(3)", v(&["'a'"])),
        (
            "bytea",
            v(&[r"'\x00ff'", "''", "decode(repeat('ff', 10000), 'hex')"]),
        ),
        ("boolean", v(&["true", "false"])),
        (
            "date",
            v(&[
                "'infinity'",
                "'-infinity'",
                "'4713-01-01 BC'",
                "'5874897-12-31'",
            ]),
        ),
        ("time", v(&["'24:00:00'", "'00:00:00.000001'"])),
        ("timetz", v(&["'23:59:59+15:59'"])),
        (
            "timestamp",
            v(&[
                "'infinity'",
                "'-infinity'",
                "'4713-01-01 00:00:00 BC'",
                "'294276-12-31 23:59:59.999999'",
                "'2025-11-02 01:43:23.5'",
            ]),
        ),
        (
            "timestamptz",
            v(&[
                "'infinity'",
                "'-infinity'",
                "'4713-01-01 00:00:00+00 BC'",
                "'294276-12-31 23:59:59.999999+00'",
                "'2025-11-02 01:43:23.0386+05:30'",
            ]),
        ),
        (
            "interval",
            v(&["'178000000 years'", "'-178000000 years'", "'1 microsecond'"]),
        ),
        ("uuid", v(&["'00000000-0000-0000-0000-000000000000'"])),
        ("inet", v(&["'::1'", "'255.255.255.255/32'"])),
        ("cidr", v(&["'10.0.0.0/8'"])),
        ("macaddr", v(&["'08:00:2b:01:02:03'"])),
        ("macaddr8", v(&["'08:00:2b:01:02:03:04:05'"])),
        ("point", v(&["'(1e308,-1e308)'", "'(NaN,Infinity)'"])),
        ("line", v(&["'{1,2,3}'"])),
        ("lseg", v(&["'[(0,0),(1,1)]'"])),
        ("box", v(&["'((0,0),(1,1))'"])),
        ("path", v(&["'[(0,0),(1,1),(2,0)]'"])),
        ("polygon", v(&["'((0,0),(1,1),(1,0))'"])),
        ("circle", v(&["'<(0,0),1e300>'"])),
        (
            "json",
            vec![r#"'{"a":[1,{"b":null}],"n":1e400}'"#.into(), deep_json],
        ),
        (
            "jsonb",
            vec![r#"'{"k":"v","u":"\u00e9"}'"#.into(), deep_jsonb],
        ),
        ("xml", v(&["'<a>x &amp; y</a>'"])),
        ("int4range", v(&["'empty'", "'[1,)'"])),
        ("numrange", v(&["'(,)'"])),
        ("tsrange", v(&["'[-infinity,infinity)'"])),
        ("tstzrange", v(&["'[2025-01-01,infinity)'"])),
        ("daterange", v(&["'[-infinity,2025-01-01)'"])),
        (
            "int8range",
            v(&["'[-9223372036854775808,9223372036854775807)'"]),
        ),
        ("int4multirange", v(&["'{[1,2),[5,6)}'", "'{}'"])),
        ("tsvector", v(&["'a:1 b:2'"])),
        ("tsquery", v(&["'a & !b'"])),
        ("bit(3)", v(&["B'101'"])),
        ("varbit", v(&["B'1'", "B''"])),
        ("integer[]", v(&["'{}'", "'{NULL,1}'", "'{{1,2},{3,4}}'"])),
        ("text[]", v(&[r#"'{"a,b","\"",NULL}'"#])),
        ("timestamptz[]", v(&["'{infinity,-infinity,2025-01-01}'"])),
        ("pg_lsn", v(&["'FFFFFFFF/FFFFFFFF'"])),
        ("oid", v(&["4294967295"])),
        ("pg_snapshot", v(&["'10:20:10,14,15'"])),
        ("cw_mood", v(&["'sad'", "'ok'"])),
        (
            "cw_pair",
            v(&["ROW(1, 'x')::cw_pair", "ROW(NULL, NULL)::cw_pair"]),
        ),
        ("cw_positive", v(&["1", "2147483647"])),
    ]
}

fn column_name(i: usize) -> String {
    format!("c{i:02}")
}

/// A small seedable generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// A `get` answer whose user is kept as text: numbers beyond f64 must not be rounded away.
#[derive(Deserialize)]
struct GetAnswer {
    result: Option<GetResult>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct GetResult {
    user: Box<RawValue>,
}

/// Reads one answer line as [`GetAnswer`].
async fn get_raw(c: &mut Rpc, name: &str) -> GetAnswer {
    c.send(&json!({"jsonrpc": "2.0", "id": 1, "method": "get", "params": {"username": name}}))
        .await;
    let line = c.recv_line().await;
    serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("answer for {name} is not JSON ({e}): {line}"))
}

/// PostgreSQL's own judgement of a user JSON against the row: equal as `jsonb` once the timestamp
/// columns are set aside, and every finite timestamp in the reference's form for the same instant.
async fn row_agrees(
    pg: &tokio_postgres::Client,
    name: &str,
    json: &str,
    ts_columns: &[String],
) -> Result<(), String> {
    let drop_ts: String = ts_columns.iter().map(|c| format!(" - '{c}'")).collect();
    let same: bool = pg
        .query_one(
            &format!(
                "SELECT ($2::text::jsonb{drop_ts}) = (row_to_json(u)::jsonb{drop_ts}) FROM users u WHERE username = $1"
            ),
            &[&name, &json],
        )
        .await
        .map_err(|e| format!("{name}: {e}"))?
        .get(0);
    if !same {
        return Err(format!("{name}: the answer differs from the row: {json}"));
    }
    for column in ts_columns {
        let ok: bool = pg
            .query_one(
                &format!(
                    "SELECT CASE WHEN {column} IS NULL THEN $2::text::jsonb -> '{column}' = 'null'
                                 WHEN NOT isfinite({column}) OR extract(year FROM {column}) NOT BETWEEN 1 AND 9999
                                   THEN $2::text::jsonb -> '{column}' = to_jsonb({column})
                                 ELSE ($2::text::jsonb ->> '{column}') ~ '^\\d{{4}}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{{6}}Z$'
                                      AND ($2::text::jsonb ->> '{column}')::timestamptz = {column}::timestamptz END
                     FROM users WHERE username = $1"
                ),
                &[&name, &json],
            )
            .await
            .map_err(|e| format!("{name}.{column}: {e}"))?
            .get(0);
        if !ok {
            return Err(format!("{name}.{column}: wrong timestamp form in {json}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_legal_value_of_every_type_is_served_and_applied() {
    let seed: u64 = std::env::var("CACHEWARD_ROWS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = Rng(seed);
    let env = TestEnv::start().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TYPE cw_mood AS ENUM ('sad', 'ok');
         CREATE TYPE cw_pair AS (a integer, b text);
         CREATE DOMAIN cw_positive AS integer CHECK (VALUE > 0);",
    )
    .await
    .unwrap();
    let columns = columns();
    // Half the columns exist before the daemon starts, half are added while it runs.
    let add = |range: std::ops::Range<usize>| {
        range
            .map(|i| {
                format!(
                    "ALTER TABLE users ADD COLUMN {} {};",
                    column_name(i),
                    columns[i].0
                )
            })
            .collect::<String>()
    };
    let half = columns.len() / 2;
    pg.batch_execute(&add(0..half)).await.unwrap();
    let daemon = env.start_daemon(env.config()).await;
    let mut c = daemon.client().await;
    assert_eq!(kind(&c.call("put", json!({"username": "warm"})).await), "");
    pg.batch_execute(&add(half..columns.len())).await.unwrap();
    let mut ts_columns = vec!["created_at".to_string()];
    for (i, (ty, _)) in columns.iter().enumerate() {
        if ty.starts_with("timestamp") && !ty.ends_with("[]") {
            ts_columns.push(column_name(i));
        }
    }

    // Every value of every column appears in some row; the other columns are random or NULL.
    let rows = columns
        .iter()
        .map(|(_, values)| values.len())
        .max()
        .unwrap()
        + 20;
    let names: Vec<String> = (0..rows).map(|r| format!("row{r:02}")).collect();
    for (r, name) in names.iter().enumerate() {
        let mut sets = Vec::new();
        for (i, (ty, values)) in columns.iter().enumerate() {
            let value = match values.get(r) {
                Some(v) => v.clone(),
                None if rng.below(4) == 0 => "NULL".into(),
                None => values[rng.below(values.len() as u64) as usize].clone(),
            };
            sets.push((column_name(i), format!("({value})::{ty}")));
        }
        let (cols, vals): (Vec<_>, Vec<_>) = sets.into_iter().unzip();
        pg.execute(
            &format!(
                "INSERT INTO users (username, {}) VALUES ($1, {})",
                cols.join(", "),
                vals.join(", ")
            ),
            &[name],
        )
        .await
        .unwrap_or_else(|e| panic!("insert {name}: {e}"));
    }
    // The issue's first finding: an infinite created_at on an existing user.
    pg.execute(
        "UPDATE users SET created_at = 'infinity' WHERE username = 'warm'",
        &[],
    )
    .await
    .unwrap();
    // A change after all of them: the CDC worker must get past every row above to apply it.
    pg.execute("INSERT INTO users (username) VALUES ('after')", &[])
        .await
        .unwrap();
    wait_until(
        "the CDC worker applied every row",
        Duration::from_secs(10),
        || async { env.cached("after").await.is_some() },
    )
    .await;
    let mut all = names.clone();
    all.extend(["warm".to_string(), "after".to_string()]);
    for name in &all {
        let cached = env
            .cached(name)
            .await
            .unwrap_or_else(|| panic!("{name} not applied"));
        row_agrees(&pg, name, &cached, &ts_columns).await.unwrap();
    }

    // Every get answers, from Redis and, after the entries are gone, from PostgreSQL; pipelined
    // with a healthy neighbour, neither fails the other.
    let mut conn = env.redis().await;
    for round in ["cache", "db"] {
        for name in &all {
            let answer = get_raw(&mut c, name).await;
            let user = answer
                .result
                .unwrap_or_else(|| panic!("{round} get of {name} failed: {:?}", answer.error))
                .user;
            row_agrees(&pg, name, user.get(), &ts_columns)
                .await
                .unwrap();
        }
        let keys: Vec<String> = all.iter().map(|n| format!("user:{n}")).collect();
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    c.send_raw(
        concat!(
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"warm"}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":2,"method":"get","params":{"username":"after"}}"#,
            "\n",
        )
        .as_bytes(),
    )
    .await;
    for _ in 0..2 {
        let line = c.recv_line().await;
        let answer: GetAnswer = serde_json::from_str(&line).unwrap();
        assert!(answer.result.is_some(), "{line}");
    }
    let verify = env.verify();
    assert!(
        verify.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    daemon.stop().await;
}
