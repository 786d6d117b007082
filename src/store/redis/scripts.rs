//! The Lua scripts cacheward runs in Redis (`*.lua` beside this file) and the commands that call
//! them. Every cache write goes through [`apply`], so that cache-aside fills, write-through sets
//! and CDC applies commute: an older version never overwrites a newer one, whatever order they
//! arrive in. The entry rules the scripts apply are `model::entry`'s, in Lua (`entry.lua`).

use super::keys::Keys;
use crate::model::entry::{tombstone_json, Write};
use crate::model::key::TableId;

/// See `apply.lua`.
const APPLY: &str = concat!(include_str!("entry.lua"), include_str!("apply.lua"));
/// See `drop.lua`.
const DROP: &str = concat!(include_str!("entry.lua"), include_str!("drop.lua"));
/// See `establish_fence.lua`.
pub const ESTABLISH_FENCE: &str = include_str!("establish_fence.lua");
/// See `raise_fence.lua`.
pub const RAISE_FENCE: &str = include_str!("raise_fence.lua");
/// See `raise_table_fence.lua`.
pub const RAISE_TABLE_FENCE: &str = include_str!("raise_table_fence.lua");
/// See `beat.lua`.
pub const BEAT: &str = include_str!("beat.lua");
/// See `reset_fence.lua`.
pub const RESET_FENCE: &str = include_str!("reset_fence.lua");
/// See `replace.lua`.
const REPLACE: &str = include_str!("replace.lua");
/// See `cache_id.lua`.
const CACHE_ID: &str = include_str!("cache_id.lua");

/// The script call that reads the cache's id at `key`, storing `fresh` first if there is none.
pub fn cache_id(key: String, fresh: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CACHE_ID).arg(1).arg(key).arg(fresh);
    cmd
}

/// The script call replacing `key`'s `expected` value with `value` (see `replace.lua`).
pub fn replace(key: String, expected: &str, value: &str, ttl_secs: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(REPLACE)
        .arg(1)
        .arg(key)
        .arg(expected)
        .arg(value)
        .arg(ttl_secs);
    cmd
}

/// What one versioned write found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The same version was live there already (another path wrote it first).
    Current,
    /// Redis held a newer version, or a tombstone of this one: the write was stale.
    Refused,
    /// The row was read before the fence, or Redis has no fence (it lost its data): the write may
    /// be stale and was refused (see `Cache::fence_key`).
    Fenced,
    /// The key holds a value that is not cacheward's: it was left alone.
    Foreign,
}

/// What `apply.lua` answered, per write.
pub fn outcomes(flags: Vec<i64>) -> Vec<Outcome> {
    flags
        .into_iter()
        .map(|flag| match flag {
            1 => Outcome::Applied,
            2 => Outcome::Current,
            3 => Outcome::Fenced,
            4 => Outcome::Foreign,
            _ => Outcome::Refused,
        })
        .collect()
}

/// The script call applying `writes`, all of whose keys are in `slot`. EVAL with the body rather
/// than EVALSHA: the script is small, Redis caches it by digest, and no call ever fails with
/// NOSCRIPT (after a restart, a failover, or inside a pipeline).
pub fn apply(keys: &Keys, slot: u16, writes: &[&Write]) -> redis::Cmd {
    // The declared tables among the writes, each with its own fence in the slot.
    let mut tables: Vec<TableId> = writes
        .iter()
        .map(|w| w.key().table())
        .filter(|&t| t != TableId::USERS)
        .collect();
    tables.sort_unstable();
    tables.dedup();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(APPLY)
        .arg(1 + tables.len() + writes.len())
        .arg(keys.fence(slot));
    for &table in &tables {
        cmd.arg(keys.table_fence(table, slot).expect("a declared table"));
    }
    for write in writes {
        cmd.arg(keys.entry(write.key()));
    }
    cmd.arg(tables.len());
    for write in writes {
        let table = write.key().table();
        cmd.arg(
            tables
                .iter()
                .position(|&t| t == table)
                .map_or(0, |at| at + 1),
        );
        match write {
            Write::Live {
                version,
                json,
                read_at,
                ..
            } => cmd.arg(*version).arg(*read_at).arg(json.as_str()),
            Write::Tombstone { version, .. } => {
                cmd.arg(*version).arg("").arg(tombstone_json(*version))
            }
        };
        cmd.arg(keys.ttl(write.key().table()));
    }
    cmd
}

/// The script call dropping the live entries at `keys` (all in one slot), each to a tombstone
/// one version below its own.
pub fn drop<'a>(keys: impl ExactSizeIterator<Item = String> + 'a, ttl_secs: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(DROP).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    cmd.arg(ttl_secs);
    cmd
}
