//! cacheward's own keys in Redis, for the health monitor and the repairs: the fence of every slot
//! (established, raised), the epoch of every primary (what the monitor looks at), and the drop of
//! every entry behind a raised fence.

use super::error::{decode, CacheError, CacheErrorKind};
use super::keys::Primary;
use super::routing::{Router, BULK_TIMEOUTS};
use super::scripts;
use crate::model::key::TableId;

/// What the health monitor finds on one primary, in one round trip.
#[derive(Debug)]
pub struct NodeState {
    /// Its `run_id` (`None` where `INFO` is not allowed).
    pub run_id: Option<String>,
    /// The `run_id` recorded at its epoch key (see `Cache::epoch_key`).
    pub recorded: Option<String>,
    /// The replication id recorded with it (`Keys::term`).
    pub recorded_term: Option<String>,
    /// Its fence (the one at its anchor slot): `None` when missing (it lost its data); an error
    /// when the key holds a value that is not cacheward's.
    pub fence: Result<Option<i64>, String>,
    /// The declared tables' own fences at its anchor slot, each with its key, read alike (each
    /// is missing until the table's first TRUNCATE or change of shape).
    pub table_fences: Vec<(String, Result<Option<i64>, String>)>,
    /// Another node answered (the anchor slot moved while the monitor looked): nothing of the
    /// above is this primary's; the next look tells.
    pub elsewhere: bool,
    /// The cache's id there (`Cache::cache_id`; looked at on one server and under Sentinel,
    /// where a database can be swapped: `None` on a Cluster, or when there is none or what is
    /// there is no id).
    pub cache_id: Option<String>,
    /// Whether it keeps every write on disk before answering (`appendonly yes`, `appendfsync
    /// always`; false where `CONFIG GET` is refused).
    pub durable: bool,
    /// Whether it was promoted from a replica since it started (or `INFO replication` is refused).
    pub promoted: bool,
    /// Whether it says it is a replica: a primary demoted since the topology was read.
    pub replica: bool,
    /// Its replication id (`master_replid`; `None` where `INFO replication` is refused): a
    /// promotion or a sync from another master changes it.
    pub replid: Option<String>,
    /// Its heartbeat, just raised (`Keys::beat`; `None` when the key holds another value).
    pub beat: Option<i64>,
    /// Which server it is across restarts: the node id on a Cluster, the address Sentinel names,
    /// empty for the one server.
    pub at: String,
    /// The name of the connection that answered (`CLIENT GETNAME`; `None` when it has none or
    /// Redis refuses the command): whether it is the one confirmed (see `confirm`).
    pub name: Option<String>,
    /// Whether the name asked for was set, in the same pipeline as the rest (see
    /// [`Router::look_at`]); false when none was asked for or Redis refused it.
    pub named: bool,
}

impl Router {
    /// Raises the fences of the slots `within` selects to `fence`, then drops every live entry
    /// of those slots (see `Cache::drop_all`). Fails, changing nothing, while Redis has no fence.
    /// Raises the fences guarding `tables` in the slots `within` to `fence`, then drops the live
    /// entries of `tables` in those slots. One declared table alone is guarded by its own fences;
    /// any other set by users' (which guard every table).
    pub async fn drop_where(
        &self,
        fence: i64,
        within: impl Fn(u16) -> bool + Sync,
        tables: &[TableId],
    ) -> Result<u64, CacheError> {
        // One declared table alone (its TRUNCATE, its shape changed): its own fences are raised,
        // once the shared ones are seen there (raising them to 0 changes none).
        let own = match tables {
            [table] if *table != TableId::USERS => Some(*table),
            _ => None,
        };
        for primary in self.primaries().await? {
            let slots: Vec<u16> = primary.slots(&self.keys).filter(|&s| within(s)).collect();
            if slots.is_empty() {
                // Nothing of it to drop: it need not even answer.
                continue;
            }
            let shared = |slot| self.keys.fence(slot);
            let raise_to = if own.is_some() { 0 } else { fence };
            for now in self
                .fence_scripts(&primary, &slots, scripts::RAISE_FENCE, raise_to, shared)
                .await?
            {
                if now < 0 {
                    return Err(CacheError::said(CacheErrorKind::Unfenced, "no fence"));
                }
            }
            if let Some(table) = own {
                let key = |slot| {
                    self.keys
                        .table_fence(table, slot)
                        .expect("a declared table")
                };
                self.fence_scripts(&primary, &slots, scripts::RAISE_TABLE_FENCE, fence, key)
                    .await?;
            }
        }
        let mut dropped = 0u64;
        let serves = |p: &Primary| p.slots(&self.keys).any(&within);
        for &table in tables {
            let mut scan = self.scan_table(table).only(serves);
            while let Some(names) = scan.next_page().await? {
                let cmds = self
                    .by_slot(names.iter())
                    .into_iter()
                    .filter(|(slot, _)| within(*slot))
                    .map(|(slot, at)| {
                        let keys = at.into_iter().map(|i| self.keys.entry(&names[i]));
                        (slot, vec![scripts::drop(keys, self.keys.ttl(table))])
                    })
                    .collect();
                let bound = self.timeout * BULK_TIMEOUTS;
                for answer in self.send_per_slot(cmds, bound).await {
                    for value in answer? {
                        dropped += decode::<u64>(value)?;
                    }
                }
            }
        }
        Ok(dropped)
    }

    /// Runs a fence script (ARGV[1] = `value`) on the fence `fence_of` each of `slots`, all
    /// served by `primary`, in one pipeline; returns what each answered.
    pub async fn fence_scripts(
        &self,
        primary: &Primary,
        slots: &[u16],
        script: &str,
        value: i64,
        fence_of: impl Fn(u16) -> String,
    ) -> Result<Vec<i64>, CacheError> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &slot in slots {
            pipe.cmd("EVAL")
                .arg(script)
                .arg(1)
                .arg(fence_of(slot))
                .arg(value);
        }
        let values = self
            .on(primary, &pipe, self.timeout * BULK_TIMEOUTS)
            .await?;
        values.into_iter().map(decode).collect()
    }

    /// What the health monitor looks at on `primary`, in one round trip: the connection's name
    /// (after setting it to `name`, if given), its `run_id`, the epoch recorded there, its fence,
    /// whether it keeps every write on disk and was promoted, and its heartbeat (raised).
    pub async fn look_at(
        &self,
        primary: &Primary,
        name: Option<&str>,
    ) -> Result<NodeState, CacheError> {
        let anchor = primary.anchor(&self.keys).unwrap_or(0);
        let mut pipe = redis::pipe();
        if let Some(name) = name {
            pipe.cmd("CLIENT").arg("SETNAME").arg(name);
        }
        pipe.cmd("CLIENT").arg("GETNAME");
        pipe.cmd("INFO").arg("server");
        pipe.cmd("GET").arg(self.keys.epoch(anchor));
        pipe.cmd("GET").arg(self.keys.term(anchor));
        pipe.cmd("GET").arg(self.keys.fence(anchor));
        pipe.cmd("INFO").arg("replication");
        pipe.cmd("CONFIG").arg("GET").arg("appendonly");
        pipe.cmd("CONFIG").arg("GET").arg("appendfsync");
        pipe.cmd("EVAL")
            .arg(scripts::BEAT)
            .arg(1)
            .arg(self.keys.beat(anchor));
        if !self.keys.is_cluster() {
            pipe.cmd("GET").arg(self.keys.cache_id());
        }
        if self.keys.is_cluster() {
            // A slot that moved makes the driver send the whole pipeline to its new owner: the
            // node id tells who answered.
            pipe.cmd("CLUSTER").arg("MYID");
        }
        let table_fences: Vec<String> = self
            .keys
            .tables()
            .into_iter()
            .filter_map(|table| self.keys.table_fence(table, anchor))
            .collect();
        for key in &table_fences {
            pipe.cmd("GET").arg(key);
        }
        let count = pipe.cmd_iter().count();
        let values = self.on(primary, &pipe, self.timeout).await?;
        if values.len() != count {
            return Err(CacheError::said(
                CacheErrorKind::Server,
                format!("{count} commands answered {} values", values.len()),
            ));
        }
        // The anchor slot is moving or moved away: the epoch and fence there are not this
        // primary's to judge now.
        let moved = values.iter().any(|v| {
            matches!(v, redis::Value::ServerError(e)
                if matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN"))
        });
        let mut values = values.into_iter();
        let mut next = || values.next().expect("counted above");
        let text = |value: redis::Value| {
            redis::from_redis_value::<Option<String>>(value)
                .ok()
                .flatten()
        };
        // Only a command the server refuses for good (the ACL, or a server without it) turns a
        // check off (said once); any other error fails the look: a node answering errors now (its
        // role changing, its connection being killed) is not trusted on that look.
        let refused = |value: redis::Value, what: &str| match value {
            redis::Value::ServerError(e) if refused_for_good(&e) => Ok(None),
            redis::Value::ServerError(e) => Err(CacheError::said(
                CacheErrorKind::Server,
                format!(
                    "{what} answered {}: {}",
                    e.code(),
                    e.details().unwrap_or("")
                ),
            )),
            value => Ok(Some(value)),
        };
        let named = match name
            .map(|_| refused(next(), "CLIENT SETNAME"))
            .transpose()?
        {
            None | Some(None) => false,
            Some(Some(redis::Value::Okay)) => true,
            Some(Some(other)) => {
                return Err(CacheError::said(
                    CacheErrorKind::Server,
                    format!("CLIENT SETNAME answered {other:?}"),
                ))
            }
        };
        let name = text(next());
        let run_id = refused(next(), "INFO server")?
            .and_then(text)
            .and_then(|info| field(&info, "run_id"));
        // Anything but a string there (another type, put by someone else) records nothing: the
        // data is distrusted once and the key overwritten.
        let recorded = text(next());
        let recorded_term = text(next());
        let fence = fence_value(next());
        // A replica promoted since its start keeps its old master's history: a second id and
        // the offset it took over at (-1 when none). Unknown counts as promoted.
        let replication = refused(next(), "INFO replication")?.and_then(text);
        let promoted = replication
            .as_deref()
            .and_then(|info| field(info, "second_repl_offset"))
            .is_none_or(|offset| offset != "-1");
        // A demoted primary answers reads as a replica, with whatever its new master synced to
        // it (a connection remade to it since is not even told by its name).
        let replica = replication
            .as_deref()
            .and_then(|info| field(info, "role"))
            .is_some_and(|role| role == "slave");
        let replid = replication
            .as_deref()
            .and_then(|info| field(info, "master_replid"));
        let appendonly = config_value(next());
        let appendfsync = config_value(next());
        let durable =
            appendonly.as_deref() == Some("yes") && appendfsync.as_deref() == Some("always");
        let beat = redis::from_redis_value::<i64>(next()).ok();
        // Anything but an id there (a foreign value, another type) is no id: the look makes one
        // (`Cache::cache_id` stores it over the value), and a cache whose id it knew distrusts it.
        let cache_id = match self.keys.is_cluster() {
            true => None,
            false => text(next()).filter(|id| crate::support::ids::is_id(id)),
        };
        let elsewhere =
            moved || (self.keys.is_cluster() && text(next()).is_none_or(|id| id != primary.id));
        let table_fences = table_fences
            .into_iter()
            .map(|key| (key, fence_value(next())))
            .collect();
        Ok(NodeState {
            run_id,
            recorded,
            recorded_term,
            fence,
            table_fences,
            elsewhere,
            cache_id,
            name,
            named,
            durable,
            promoted,
            replica,
            replid,
            beat,
            at: primary.id.clone(),
        })
    }

    /// Records `run_id` as the process the cached data of `primary` is written under, and `term`
    /// (its replication id then; `None`: unknown) as the term it was written in.
    pub async fn record_epoch(
        &self,
        primary: &Primary,
        run_id: &str,
        term: Option<&str>,
    ) -> Result<(), CacheError> {
        let anchor = primary.anchor(&self.keys).unwrap_or(0);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.keys.epoch(anchor)).arg(run_id);
        match term {
            Some(term) => pipe.cmd("SET").arg(self.keys.term(anchor)).arg(term),
            None => pipe.cmd("DEL").arg(self.keys.term(anchor)),
        };
        let values = self.on(primary, &pipe, self.timeout).await?;
        values.into_iter().try_for_each(decode::<()>)
    }

    /// The `maxmemory-policy` of `primary`, or `None` where CONFIG is not allowed (managed
    /// services, ACLs).
    pub async fn eviction_policy(&self, primary: &Primary) -> Option<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        config_value(self.on_one(primary, &cmd).await.ok()?)
    }

    /// Sets every fence of `primary` that cannot be right (see `reset_fence.lua`) to `horizon`,
    /// which must have been drawn after it was seen; returns every slot `primary` serves, all of
    /// whose entries are suspect once one of its fences was forged.
    pub async fn reset_fences(
        &self,
        primary: &Primary,
        horizon: i64,
    ) -> Result<Vec<u16>, CacheError> {
        let slots: Vec<u16> = primary.slots(&self.keys).collect();
        self.fence_scripts(primary, &slots, scripts::RESET_FENCE, horizon, |slot| {
            self.keys.fence(slot)
        })
        .await?;
        // The declared tables' own fences alike (the script leaves every right one as it is).
        for table in self.keys.tables() {
            if self.keys.table_fence(table, 0).is_none() {
                continue;
            }
            self.fence_scripts(primary, &slots, scripts::RESET_FENCE, horizon, |slot| {
                self.keys
                    .table_fence(table, slot)
                    .expect("a declared table")
            })
            .await?;
        }
        Ok(slots)
    }

    /// Sets every missing fence of `primary` to `horizon`; returns how many it set. `horizon`
    /// must have been drawn after a fence was seen missing.
    pub async fn establish_fences(
        &self,
        primary: &Primary,
        horizon: i64,
    ) -> Result<usize, CacheError> {
        let slots: Vec<u16> = primary.slots(&self.keys).collect();
        let now = self
            .fence_scripts(primary, &slots, scripts::ESTABLISH_FENCE, horizon, |slot| {
                self.keys.fence(slot)
            })
            .await?;
        Ok(now.into_iter().filter(|&f| f == horizon).count())
    }
}

/// The value a `CONFIG GET` of one parameter answered (`None`: refused, or none): a map in RESP3
/// (the near cache's connections), a flat list in RESP2.
fn config_value(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .next()
            .and_then(|(_, value)| decode(value).ok()),
        value => decode::<Vec<String>>(value).ok()?.into_iter().nth(1),
    }
}

/// The value of `name` in an `INFO` section's text.
fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// A fence as a look reads it: `None` when missing, an error when the key holds a value that is
/// not cacheward's.
fn fence_value(value: redis::Value) -> Result<Option<i64>, String> {
    match value {
        redis::Value::ServerError(e) => Err(e.to_string()),
        value => match redis::from_redis_value::<Option<String>>(value) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => v
                .parse()
                .map(Some)
                .map_err(|_| "the fence key holds a value that is not cacheward's".to_owned()),
            Err(_) => Err("the fence key holds a value of another type".to_owned()),
        },
    }
}

/// Whether a server's error says a command will never be answered here: refused by the ACL, or
/// unknown to the server (renamed or missing on a managed service).
fn refused_for_good(e: &redis::ServerError) -> bool {
    let details = e.details().unwrap_or("");
    e.code() == "NOPERM"
        || (e.code() == "ERR"
            && (details.starts_with("unknown command")
                || details.starts_with("unknown subcommand")))
}

#[cfg(test)]
mod tests {
    use super::{field, refused_for_good};

    /// Only a refusal for good turns a look's check off: the ACL (NOPERM) or a server without the
    /// command. Any other error (a node changing role, loading, its connection being killed) fails
    /// the look instead.
    #[test]
    fn only_a_refusal_for_good_turns_a_check_off() {
        let error = |reply: &str| match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e,
            other => panic!("{reply:?} parsed as {other:?}"),
        };
        for refused in [
            "-NOPERM User cacheward has no permissions to run the 'info' command\r\n",
            "-ERR unknown command 'INFO', with args beginning with: \r\n",
            "-ERR unknown subcommand 'SETNAME'. Try CLIENT HELP.\r\n",
        ] {
            assert!(refused_for_good(&error(refused)), "{refused}");
        }
        for passing in [
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
            "-ERR Protocol error\r\n",
            "-MASTERDOWN Link with MASTER is down\r\n",
            "-ERR something else unknown command\r\n",
        ] {
            assert!(!refused_for_good(&error(passing)), "{passing}");
        }
    }

    /// `INFO` is what the server says, hostile or odd: fields are found by their whole name on a
    /// line of their own, CRLF or not, and anything else is no answer rather than a wrong one.
    #[test]
    fn an_info_field_is_its_whole_name_on_a_line_of_its_own() {
        let info = "# Replication\r\nmaster_replid2:0000\r\nrole:master\r\nroles:slave\r\n\
                    x_role:slave\r\nmaster_replid:abc \r\nsecond_repl_offset:-1\r\n";
        assert_eq!(field(info, "master_replid").as_deref(), Some("abc"));
        assert_eq!(field(info, "role").as_deref(), Some("master"));
        assert_eq!(field(info, "second_repl_offset").as_deref(), Some("-1"));
        assert_eq!(field(info, "run_id"), None);
        assert_eq!(field("role", "role"), None, "a name without a value");
        assert_eq!(field("", "role"), None);
        // The first of two answers counts (a forged second line changes nothing).
        assert_eq!(
            field("role:slave\nrole:master", "role").as_deref(),
            Some("slave")
        );
    }
}
