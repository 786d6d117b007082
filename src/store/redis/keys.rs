//! Where cacheward's keys live, pure: a user's key, the fence and epoch keys of every slot, the
//! slot math of Redis Cluster, and which primary serves which slot. No I/O here.

use std::sync::Arc;

use crate::model::key::{Key, KeyRef, TableId};

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag (the text
/// between the first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key).unwrap_or(key)) % SLOTS as u16
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let close = key[open + 1..].iter().position(|b| *b == b'}')?;
    let tag = &key[open + 1..open + 1 + close];
    (!tag.is_empty()).then_some(tag)
}

/// Where cacheward's keys live. A user's key is the prefix and the username; besides those,
/// cacheward keeps a fence (`Cache::fence_key`) and an epoch (`Cache::epoch_key`) next to the
/// entries they guard: one of each on a single server, one of each **per slot** on a Cluster,
/// since a script may only touch keys of one slot, and a slot's fence must move with its entries
/// when the slot moves.
#[derive(Clone)]
pub struct Keys {
    prefix: Arc<str>,
    /// Every table's prefix, by [`TableId`]: `users`' (the prefix above) first, then each
    /// declared table's. No prefix starts another (the configuration checks it), so a key names
    /// at most one table.
    tables: Arc<[Arc<str>]>,
    /// Every table's entries' TTL in seconds, by [`TableId`].
    ttls: Arc<[u64]>,
    /// Cluster mode: per slot, the number that puts a fence (an epoch) key in that slot.
    slotted: Option<Arc<SlotKeys>>,
}

struct SlotKeys {
    fence: Box<[u32]>,
    epoch: Box<[u32]>,
    term: Box<[u32]>,
    beat: Box<[u32]>,
    /// Each declared table's own fence numbering, by [`TableId`] from 1.
    table_fences: Box<[Box<[u32]>]>,
}

/// No key of cacheward's can hash to this slot (the prefix carries a hash tag of its own).
const UNUSED: u32 = u32::MAX;

impl Keys {
    /// `prefix`: users'; `tables`: the declared tables' prefixes, in [`TableId`] order from 1.
    /// Fences and epochs live under users' prefix and guard every table's entries in their slot.
    pub fn new(prefix: &str, tables: &[String], cluster: bool) -> Keys {
        let all: Vec<Arc<str>> = std::iter::once(prefix)
            .chain(tables.iter().map(String::as_str))
            .map(Arc::from)
            .collect();
        Keys {
            prefix: prefix.into(),
            tables: all.into(),
            ttls: Arc::new([]),
            slotted: cluster.then(|| {
                Arc::new(SlotKeys {
                    fence: numbering(prefix, "fence"),
                    epoch: numbering(prefix, "epoch"),
                    term: numbering(prefix, "term"),
                    beat: numbering(prefix, "beat"),
                    table_fences: tables.iter().map(|t| numbering(t, "fence")).collect(),
                })
            }),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_cluster(&self) -> bool {
        self.slotted.is_some()
    }

    /// With `ttls` (seconds, by [`TableId`]) as the tables' entries' TTLs.
    pub fn with_ttls(mut self, ttls: Vec<u64>) -> Keys {
        self.ttls = ttls.into();
        self
    }

    /// The TTL of `table`'s entries (an hour, `cache.ttl_secs`' default, where none was given).
    pub fn ttl(&self, table: TableId) -> u64 {
        self.ttls.get(table.0 as usize).copied().unwrap_or(3600)
    }

    /// Every table: users, then the declared ones.
    pub fn tables(&self) -> Vec<TableId> {
        (0..self.tables.len() as u16).map(TableId).collect()
    }

    /// The prefix of `table`'s keys.
    pub fn prefix_of(&self, table: TableId) -> &str {
        &self.tables[table.0 as usize]
    }

    /// The Redis key of an entry: its table's prefix + the key's text (a user's: the username).
    pub fn entry(&self, key: &Key) -> String {
        let prefix = self.prefix_of(key.table());
        let mut redis_key = String::with_capacity(prefix.len() + key.as_str().len());
        redis_key.push_str(prefix);
        redis_key.push_str(key.as_str());
        redis_key
    }

    /// The entry's key a Redis key names, if it is one under a table's prefix: not users' prefix
    /// alone, a fence or an epoch (those follow it with nothing or with NUL; no username is empty
    /// or holds NUL). A declared table's prefix alone is the entry of an empty text key (its
    /// fences and epochs are users').
    pub fn key_of(&self, redis_key: &[u8]) -> Option<Key> {
        self.key_ref_of(redis_key).map(KeyRef::to_key)
    }

    /// [`Keys::key_of`], borrowed from `redis_key`.
    pub fn key_ref_of<'a>(&self, redis_key: &'a [u8]) -> Option<KeyRef<'a>> {
        self.tables.iter().enumerate().find_map(|(table, prefix)| {
            let rest = redis_key.strip_prefix(prefix.as_bytes())?;
            let text = std::str::from_utf8(rest).ok()?;
            let entry = match TableId(table as u16) {
                TableId::USERS => !text.is_empty() && !text.starts_with('\0'),
                _ => !text.starts_with('\0'),
            };
            let table = TableId(table as u16);
            entry.then_some(KeyRef { table, text })
        })
    }

    /// The slot `key` lives in; 0 for every key on a single server.
    pub fn slot(&self, key: &str) -> u16 {
        match self.slotted {
            Some(_) => slot_of(key.as_bytes()),
            None => 0,
        }
    }

    /// The fence of `slot`'s entries: the prefix itself on a single server (no user's key is:
    /// usernames are never empty), the prefix + NUL + `fence:N` in the slot on a Cluster.
    pub fn fence(&self, slot: u16) -> String {
        match &self.slotted {
            None => self.prefix.to_string(),
            Some(keys) => format!("{}\0fence:{}", self.prefix, keys.fence[slot as usize]),
        }
    }

    /// A declared table's own fence in `slot`, raised by its TRUNCATE (and when its shape
    /// changed) so that only its own fills that read before are refused: its prefix + NUL +
    /// `fence` (`fence:N` in the slot on a Cluster). `None` for users, whose fence is
    /// [`Keys::fence`], which guards every table's entries besides (a lost Redis, lost history).
    pub fn table_fence(&self, table: TableId, slot: u16) -> Option<String> {
        let at = (table.0 as usize).checked_sub(1)?;
        let prefix = self.tables.get(table.0 as usize)?;
        Some(match &self.slotted {
            None => format!("{prefix}\0fence"),
            Some(keys) => format!(
                "{prefix}\0fence:{}",
                keys.table_fences.get(at)?[slot as usize]
            ),
        })
    }

    /// The epoch of the node holding `slot`: the prefix + NUL + `epoch` (`epoch:N` in the slot on
    /// a Cluster). No username makes either (PostgreSQL's text holds no NUL).
    pub fn epoch(&self, slot: u16) -> String {
        match &self.slotted {
            None => format!("{}\0epoch", self.prefix),
            Some(keys) => format!("{}\0epoch:{}", self.prefix, keys.epoch[slot as usize]),
        }
    }

    /// The term of the epoch of the node holding `slot`: the replication id (`master_replid`) its
    /// primary had when the epoch was recorded (prefix + NUL + `term`, `term:N` in the slot on a
    /// Cluster). A primary demoted and promoted again has another one, though its `run_id` is
    /// the same.
    pub fn term(&self, slot: u16) -> String {
        match &self.slotted {
            None => format!("{}\0term", self.prefix),
            Some(keys) => format!("{}\0term:{}", self.prefix, keys.term[slot as usize]),
        }
    }

    /// The heartbeat of the primary whose anchor is `slot`: a counter each look of the health
    /// monitor raises, so that a restarted Redis shows whether its data holds the last look's
    /// (prefix + NUL + `beat`, `beat:N` in the slot on a Cluster).
    pub fn beat(&self, slot: u16) -> String {
        match &self.slotted {
            None => format!("{}\0beat", self.prefix),
            Some(keys) => format!("{}\0beat:{}", self.prefix, keys.beat[slot as usize]),
        }
    }

    /// The id of the cache this Redis holds: the prefix + NUL + `id` (see `Cache::cache_id`).
    pub fn cache_id(&self) -> String {
        format!("{}\0id", self.prefix)
    }

    /// Whether a key of cacheward's can live in `slot`.
    pub fn in_use(&self, slot: u16) -> bool {
        match &self.slotted {
            None => slot == 0,
            Some(keys) => keys.fence.get(slot as usize).is_some_and(|&n| n != UNUSED),
        }
    }

    /// Every slot a key of cacheward's can live in.
    pub fn slots(&self) -> Vec<u16> {
        (0..SLOTS as u16).filter(|&s| self.in_use(s)).collect()
    }
}

/// For each slot, the smallest N that puts `prefix` NUL `kind:N` in it. A prefix that carries a
/// hash tag of its own puts every key in one slot: that one alone is numbered.
fn numbering(prefix: &str, kind: &str) -> Box<[u32]> {
    let mut table = vec![UNUSED; SLOTS].into_boxed_slice();
    let mut left = SLOTS;
    let mut key = String::new();
    // Coupon collecting: about 170 000 tries number every slot; a tag in the prefix, only one.
    let limit = match hash_tag(prefix.as_bytes()) {
        Some(_) => 1,
        None => 1 << 22,
    };
    for n in 0..limit {
        use std::fmt::Write as _;
        key.clear();
        let _ = write!(key, "{prefix}\0{kind}:{n}");
        let slot = slot_of(key.as_bytes()) as usize;
        if table[slot] == UNUSED {
            table[slot] = n;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    table
}

/// A primary the health monitor looks at: where it is, which slots it serves (all of them on a
/// single server) and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`, or `""` on a single server (the connection knows where).
    pub address: String,
    /// The node id on a Cluster (a promoted replica has its own), `""` otherwise.
    pub id: String,
    /// Inclusive slot ranges.
    pub ranges: Vec<(u16, u16)>,
}

impl Primary {
    /// The one server (standalone, Sentinel's current master): every slot, no address or id of
    /// its own.
    pub fn one_server() -> Primary {
        Primary {
            address: String::new(),
            id: String::new(),
            ranges: vec![(0, (SLOTS - 1) as u16)],
        }
    }

    /// The lowest slot it serves where cacheward keeps keys: where its epoch is kept and its
    /// fence checked. `None`: none of cacheward's keys can live there.
    pub fn anchor(&self, keys: &Keys) -> Option<u16> {
        self.slots(keys).next()
    }

    /// The slots it serves where cacheward's keys can live.
    pub fn slots<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = u16> + 'a {
        self.ranges
            .iter()
            .flat_map(|&(from, to)| from..=to)
            .filter(|&s| keys.in_use(s))
    }
}

/// The Cluster's primaries and, per slot, which of them serves it (as `CLUSTER SLOTS` said).
pub struct Routes {
    pub primaries: Vec<Primary>,
    owner: Box<[u16]>,
}

impl Routes {
    pub fn new(primaries: &[Primary]) -> Routes {
        let mut owner = vec![u16::MAX; SLOTS].into_boxed_slice();
        for (p, primary) in primaries.iter().enumerate() {
            for &(from, to) in &primary.ranges {
                for slot in from..=to.min(SLOTS as u16 - 1) {
                    owner[slot as usize] = p as u16;
                }
            }
        }
        Routes {
            primaries: primaries.to_vec(),
            owner,
        }
    }

    pub fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(slot as usize) {
            Some(&p) if p != u16::MAX => Some(p as usize),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_past_the_table_is_not_cacheward_s_rather_than_a_panic() {
        assert!(!Keys::new("user:", &[], true).in_use(u16::MAX));
    }

    #[test]
    fn slots_are_computed_as_redis_cluster_does() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn every_slot_gets_a_fence_and_an_epoch_key_of_its_own() {
        let keys = Keys::new("user:", &[], true);
        for slot in [0u16, 1, 5461, 10923, 16383] {
            assert_eq!(slot_of(keys.fence(slot).as_bytes()), slot);
            assert_eq!(slot_of(keys.epoch(slot).as_bytes()), slot);
            assert_eq!(slot_of(keys.term(slot).as_bytes()), slot);
            assert!(keys.fence(slot).starts_with("user:\0"));
        }
        assert_eq!(keys.slots().len(), SLOTS);
        // A prefix with a hash tag puts every key in one slot.
        let tagged = Keys::new("{users}:", &[], true);
        let slot = slot_of(b"users");
        assert_eq!(tagged.slots(), vec![slot]);
        assert_eq!(slot_of(tagged.fence(slot).as_bytes()), slot);
        assert_eq!(tagged.slot(&tagged.entry(&Key::user("anyone"))), slot);

        // One server: one fence, the prefix.
        let single = Keys::new("user:", &["acc:".into()], false);
        assert_eq!(single.fence(single.slot("user:a")), "user:");
        assert_eq!(single.epoch(0), "user:\0epoch");
        assert_eq!(single.term(0), "user:\0term");
        // What follows the prefix names an entry; users' prefix alone, a fence or an epoch do
        // not. A declared table's prefix alone is the entry of its empty text key.
        assert_eq!(single.key_of(b"user:ann"), Some(Key::user("ann")));
        assert_eq!(single.key_of(b"acc:42"), Some(Key::new(TableId(1), "42")));
        assert_eq!(single.entry(&Key::new(TableId(1), "42")), "acc:42");
        assert_eq!(single.key_of(b"acc:"), Some(Key::new(TableId(1), "")));
        // A declared table's own fence: after its prefix, NUL; no entry's key.
        assert_eq!(single.table_fence(TableId::USERS, 0), None);
        let own = single.table_fence(TableId(1), 0).unwrap();
        assert_eq!(own, "acc:\0fence");
        assert_eq!(single.key_of(own.as_bytes()), None);
        let clustered = Keys::new("user:", &["acc:".into()], true);
        for slot in [0, 77, 16383] {
            let own = clustered.table_fence(TableId(1), slot).unwrap();
            assert_eq!(slot_of(own.as_bytes()), slot);
            assert!(own.starts_with("acc:\0fence:"));
            assert_eq!(clustered.key_of(own.as_bytes()), None);
        }
        assert_eq!(single.entry(&Key::new(TableId(1), "")), "acc:");
        for not_an_entry in [
            &b"user:"[..],
            b"user:\0epoch",
            b"user:\0term",
            b"other:ann",
            b"user:\xff",
            b"acc:\0x",
        ] {
            assert_eq!(single.key_of(not_an_entry), None);
        }
    }
}
