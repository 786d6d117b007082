//! What the randomized soaks share: a seedable generator, wall-clock microseconds, and the check
//! of an answer against the commit history (a state of the key current at some moment of the
//! request, give or take the allowance).

use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: small, seedable, good enough to pick operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Wall-clock microseconds, comparable with PostgreSQL's commit timestamps.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64
}

/// SQL for the commit time, in microseconds since the epoch, of a row's `txid` (a `bigint` from
/// `txid_current()`): what a history orders its states by (`track_commit_timestamp` on).
pub const COMMITTED_US: &str = "(extract(epoch FROM pg_xact_commit_timestamp(\
    ((txid::text::numeric % 4294967296)::bigint)::text::xid)) * 1000000)::bigint";

/// What an answer showed of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Present(i64),
    Absent,
}

/// One state of a key in the commit history, ordered by commit time.
#[derive(Debug, Clone)]
pub struct State {
    pub committed_us: i64,
    pub version: i64,
    pub present: bool,
}

/// Whether an answer showing `seen`, asked at `sent_us` and answered at `answered_us`, shows a
/// state of `states` that was current at some moment in [sent − allowance, answered].
pub fn explained(
    sent_us: i64,
    answered_us: i64,
    seen: Seen,
    states: &[State],
    allowance_us: i64,
) -> bool {
    let absent = matches!(seen, Seen::Absent);
    explained_by(
        sent_us,
        answered_us,
        states,
        allowance_us,
        absent,
        |s| match seen {
            Seen::Absent => !s.present,
            Seen::Present(v) => s.present && s.version == v,
        },
    )
}

/// [`explained`] for answers told from states by `shows` (whether the answer shows that state),
/// such as a row's content where the answer carries no version; `absent`: the answer showed no
/// row, which the key's state before its first change explains too.
pub fn explained_by(
    sent_us: i64,
    answered_us: i64,
    states: &[State],
    allowance_us: i64,
    absent: bool,
    shows: impl Fn(&State) -> bool,
) -> bool {
    let from = sent_us - allowance_us;
    let current_after_from = |i: usize| {
        states
            .get(i + 1)
            .is_none_or(|next| next.committed_us > from)
    };
    let initial = absent && states.first().is_none_or(|first| first.committed_us > from);
    initial
        || states
            .iter()
            .enumerate()
            .any(|(i, s)| s.committed_us <= answered_us && current_after_from(i) && shows(s))
}

/// The seed and length of a soak: `CACHEWARD_SOAK_SEED` (else the clock) and `CACHEWARD_SOAK_SECS`
/// (else `default_secs`), printed so that a failure can be replayed.
pub fn soak_settings(label: &str, default_secs: u64) -> (u64, u64) {
    let seed: u64 = std::env::var("CACHEWARD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_us() as u64);
    let secs: u64 = std::env::var("CACHEWARD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    eprintln!("{label}: CACHEWARD_SOAK_SEED={seed} CACHEWARD_SOAK_SECS={secs}");
    (seed, secs)
}

/// Makes `env`'s PostgreSQL keep what a history needs: commit timestamps, and every acknowledged
/// commit surviving a crash (the harness starts it with `synchronous_commit` off; a database
/// setting wins). Restarts it.
pub async fn keep_history(env: &mut super::TestEnv) {
    let pg = env.pg().await;
    // Two statements: ALTER SYSTEM may not share a transaction block.
    for setting in [
        "ALTER SYSTEM SET track_commit_timestamp = on",
        "ALTER DATABASE cw SET synchronous_commit = on",
    ] {
        pg.batch_execute(setting).await.expect("history settings");
    }
    drop(pg);
    env.pg.stop();
    env.pg.start_again().expect("restart postgres");
}

/// A fault of a backend, as the soaks inject them.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    RedisRestart,
    RedisFlush,
    RedisFrozen,
    PostgresCrash,
}

/// Injects `fault` for `pause`; returns its name.
pub async fn inject(
    env: &mut super::TestEnv,
    fault: Fault,
    pause: std::time::Duration,
) -> &'static str {
    match fault {
        Fault::RedisRestart => {
            env.redis.kill();
            tokio::time::sleep(pause).await;
            env.redis.start_again().expect("restart redis");
            "redis killed and restarted empty"
        }
        Fault::RedisFlush => {
            let mut conn = env.redis().await;
            let _: Result<(), _> = redis::cmd("FLUSHALL").query_async(&mut conn).await;
            "FLUSHALL"
        }
        Fault::RedisFrozen => {
            env.redis.pause();
            tokio::time::sleep(pause).await;
            env.redis.resume();
            "redis frozen"
        }
        Fault::PostgresCrash => {
            env.pg.crash();
            tokio::time::sleep(pause).await;
            env.pg.start_again().expect("restart postgres");
            "postgres crashed and restarted"
        }
    }
}
