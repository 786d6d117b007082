//! What the front end serves, as `COMMAND` describes it, and what it refuses: the commands
//! with their arity and flags, `COMMAND` itself, the writes answered `-READONLY`, and Redis's
//! answer to a command it does not know.

use bytes::Bytes;

use super::frame::{shown, Reply};

/// Commands that change data in Redis: answered `-READONLY`.
pub const WRITES: &[&str] = &[
    "append",
    "bitfield",
    "blmove",
    "blmpop",
    "blpop",
    "brpop",
    "brpoplpush",
    "bzmpop",
    "bzpopmax",
    "bzpopmin",
    "copy",
    "decr",
    "decrby",
    "del",
    "eval",
    "evalsha",
    "expire",
    "expireat",
    "fcall",
    "flushall",
    "flushdb",
    "geoadd",
    "getdel",
    "getex",
    "getset",
    "hdel",
    "hexpire",
    "hincrby",
    "hincrbyfloat",
    "hmset",
    "hset",
    "hsetnx",
    "incr",
    "incrby",
    "incrbyfloat",
    "linsert",
    "lmove",
    "lmpop",
    "lpop",
    "lpush",
    "lpushx",
    "lrem",
    "lset",
    "ltrim",
    "migrate",
    "move",
    "mset",
    "msetnx",
    "persist",
    "pexpire",
    "pexpireat",
    "pfadd",
    "pfmerge",
    "psetex",
    "publish",
    "rename",
    "renamenx",
    "restore",
    "rpop",
    "rpoplpush",
    "rpush",
    "rpushx",
    "sadd",
    "sdiffstore",
    "set",
    "setbit",
    "setex",
    "setnx",
    "setrange",
    "sinterstore",
    "smove",
    "spop",
    "srem",
    "sunionstore",
    "swapdb",
    "unlink",
    "xack",
    "xadd",
    "xautoclaim",
    "xclaim",
    "xdel",
    "xgroup",
    "xtrim",
    "zadd",
    "zdiffstore",
    "zincrby",
    "zinterstore",
    "zmpop",
    "zpopmax",
    "zpopmin",
    "zrangestore",
    "zrem",
    "zremrangebylex",
    "zremrangebyrank",
    "zremrangebyscore",
    "zunionstore",
];

/// A command served, as `COMMAND` describes it.
pub struct Served {
    pub name: &'static str,
    /// Arguments with the name; negative: at least that many.
    pub arity: i64,
    flags: &'static [&'static str],
    first_key: i64,
    last_key: i64,
    step: i64,
    /// What `COMMAND DOCS` says of it.
    summary: &'static str,
}

/// The commands served.
pub const SERVED: &[Served] = &[
    Served {
        name: "get",
        arity: 2,
        flags: &["readonly", "fast"],
        first_key: 1,
        last_key: 1,
        step: 1,
        summary: "Returns a row's JSON (USER or ROW), read through cacheward.",
    },
    Served {
        name: "mget",
        arity: -2,
        flags: &["readonly", "fast"],
        first_key: 1,
        last_key: -1,
        step: 1,
        summary: "Returns the JSON of several rows, read through cacheward.",
    },
    Served {
        name: "exists",
        arity: -2,
        flags: &["readonly", "fast"],
        first_key: 1,
        last_key: -1,
        step: 1,
        summary: "Counts the keys that name an existing row.",
    },
    Served {
        name: "ping",
        arity: -1,
        flags: &["fast"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Returns the server's liveliness response.",
    },
    Served {
        name: "echo",
        arity: 2,
        flags: &["fast"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Returns the given string.",
    },
    Served {
        name: "hello",
        arity: -1,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Handshakes with the server.",
    },
    Served {
        name: "auth",
        arity: -2,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Authenticates the connection.",
    },
    Served {
        name: "select",
        arity: 2,
        flags: &["loading", "stale", "fast"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Changes the selected database (only 0).",
    },
    Served {
        name: "quit",
        arity: -1,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Closes the connection.",
    },
    Served {
        name: "reset",
        arity: 1,
        flags: &["noscript", "loading", "stale", "fast", "no_auth"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Resets the connection.",
    },
    Served {
        name: "client",
        arity: -2,
        flags: &["noscript", "loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "A container for client connection commands.",
    },
    Served {
        name: "subscribe",
        arity: -2,
        flags: &["pubsub", "noscript", "loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Listens for the invalidations redirected to this connection (only __redis__:invalidate).",
    },
    Served {
        name: "unsubscribe",
        arity: -1,
        flags: &["pubsub", "noscript", "loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Stops listening for messages posted to channels.",
    },
    Served {
        name: "command",
        arity: -1,
        flags: &["loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Returns detailed information about the commands served.",
    },
    Served {
        name: "info",
        arity: -1,
        flags: &["loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        summary: "Returns information and statistics about the server.",
    },
];

/// `COMMAND`, `COMMAND COUNT|INFO|DOCS|LIST`.
pub fn command(reply: Reply, args: &[Bytes], out: &mut Vec<u8>) {
    let entry = |out: &mut Vec<u8>, c: &Served| {
        reply.array(out, 10);
        reply.bulk(out, c.name.as_bytes());
        reply.int(out, c.arity);
        reply.set(out, c.flags.len());
        for flag in c.flags {
            reply.simple(out, flag);
        }
        reply.int(out, c.first_key);
        reply.int(out, c.last_key);
        reply.int(out, c.step);
        reply.set(out, 0);
        reply.array(out, 0);
        reply.array(out, 0);
        reply.array(out, 0);
    };
    let named = |args: &[Bytes]| -> Vec<Option<&Served>> {
        args.iter()
            .map(|a| SERVED.iter().find(|c| c.name == name_of(a)))
            .collect()
    };
    match args.first().map(|a| name_of(a)).as_deref() {
        None => {
            reply.array(out, SERVED.len());
            for c in SERVED {
                entry(out, c);
            }
        }
        Some("count") => reply.int(out, SERVED.len() as i64),
        Some("list") => {
            reply.array(out, SERVED.len());
            for c in SERVED {
                reply.bulk(out, c.name.as_bytes());
            }
        }
        Some("info") => {
            let wanted = match args.len() {
                1 => SERVED.iter().map(Some).collect(),
                _ => named(&args[1..]),
            };
            reply.array(out, wanted.len());
            for c in wanted {
                match c {
                    Some(c) => entry(out, c),
                    None => reply.nil(out),
                }
            }
        }
        Some("docs") => {
            let wanted: Vec<_> = match args.len() {
                1 => SERVED.iter().collect(),
                _ => named(&args[1..]).into_iter().flatten().collect(),
            };
            reply.map(out, wanted.len());
            for c in wanted {
                reply.bulk(out, c.name.as_bytes());
                reply.map(out, 3);
                for (key, value) in [
                    ("summary", c.summary),
                    ("since", "1.0.0"),
                    ("group", "cacheward"),
                ] {
                    reply.bulk(out, key.as_bytes());
                    reply.bulk(out, value.as_bytes());
                }
            }
        }
        Some(other) => reply.error(
            out,
            &format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                shown(other.as_bytes())
            ),
        ),
    }
}

/// Redis's answer to a command it does not know.
pub fn unknown(args: &[Bytes]) -> String {
    let mut message = format!(
        "ERR unknown command '{}', with args beginning with: ",
        shown(&args[0])
    );
    for arg in args[1..].iter().take(3) {
        message.push_str(&format!("'{}' ", shown(arg)));
    }
    message
}

/// A command's or option's name in lower case (at most 64 bytes of it).
pub fn name_of(arg: &[u8]) -> String {
    String::from_utf8_lossy(&arg[..arg.len().min(64)]).to_ascii_lowercase()
}
