//! One RESP connection's state (protocol version, authentication, name, tracking, subscription)
//! and what each command does to it and answers (`CLIENT`, `SUBSCRIBE`: `resp::client`). Reads
//! (`GET`, `MGET`, `EXISTS`) are only resolved to keys here: the connection runs them on the read
//! path (`resp::read`). No I/O here.

use std::net::IpAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::commands::{command, name_of, unknown, SERVED, WRITES};
use super::frame::{shown, Reply};
use super::guard::AuthGuard;
use super::read::ReadKind;
use super::tracking::{self, Push, Sink, Tracker};
use crate::model::key::Key;
use crate::service::Service;

/// The Redis version whose protocol the front end speaks, as `HELLO` and `INFO` say.
pub const REDIS_VERSION: &str = "7.4.0";

/// The longest client name, library name or version kept.
pub(super) const MAX_NAME: usize = 256;

/// What a connection knows of its client.
pub struct Session {
    pub id: u64,
    pub reply: Reply,
    /// Whether the client still has to `AUTH` (a password is configured and this is TCP).
    pub must_auth: bool,
    authenticated: bool,
    pub(super) name: Option<String>,
    pub(super) lib_name: Option<String>,
    pub(super) lib_ver: Option<String>,
    /// The peer, as `CLIENT INFO` shows it.
    addr: String,
    /// The password file, when one is configured.
    password: Option<crate::support::secrets::PasswordFile>,
    /// Where this peer's wrong passwords are counted (TCP with a password), and its address.
    guard: Option<(Arc<AuthGuard>, IpAddr)>,
    /// Client-side caching's bookkeeping (`None` with the near cache off).
    pub(super) tracker: Option<Arc<Tracker>>,
    /// The invalidations owed to this connection: for its own tracking, and those other
    /// connections redirect to it (`None` with the near cache off).
    pub(super) inbox: Option<Arc<Sink>>,
    /// `CLIENT TRACKING ON`'s state.
    pub(super) tracking: Option<Tracking>,
    /// Subscribed to [`tracking::CHANNEL`] (the only channel there is).
    pub(super) subscribed: bool,
}

/// How a connection tracks (`CLIENT TRACKING ON …`).
pub(super) struct Tracking {
    /// Where its invalidations are owed: its inbox, or with `REDIRECT` a sink of its own whose
    /// pushes go to the target's inbox once this connection has answered what they follow.
    pub(super) sink: Arc<Sink>,
    pub(super) redirect: Option<(u64, Weak<Sink>)>,
    pub(super) broadcast: bool,
    pub(super) optin: bool,
    pub(super) optout: bool,
    pub(super) prefixes: Vec<Bytes>,
    /// `CLIENT CACHING yes|no`, for the next command only.
    pub(super) caching: Option<bool>,
}

/// What the connection does with one command.
pub enum Action {
    /// Answer these bytes.
    Answer(Vec<u8>),
    /// Read these keys and answer in this protocol; `tracked`: the client caches the answer
    /// (an answer not known to be watched is invalidated right behind it).
    Read {
        kind: ReadKind,
        keys: Vec<Key>,
        reply: Reply,
        tracked: bool,
    },
    /// A plain `GET` (untracked) of the request's second argument, a Redis key not resolved yet,
    /// answered in this protocol.
    Get { reply: Reply },
    /// A plain `MGET` or `EXISTS` (untracked) of the request's arguments after the first, Redis
    /// keys not resolved yet, answered in this protocol.
    Many { kind: ReadKind, reply: Reply },
    /// Answer these bytes, then close the connection.
    Close(Vec<u8>),
}

impl Session {
    pub fn new(
        id: u64,
        addr: String,
        password: Option<crate::support::secrets::PasswordFile>,
        guard: Option<(Arc<AuthGuard>, IpAddr)>,
        tracker: Option<Arc<Tracker>>,
    ) -> Session {
        let must_auth = guard.is_some();
        let inbox = tracker.as_ref().map(|tracker| {
            let inbox = Arc::new(Sink::default());
            tracker.open(id, &inbox);
            inbox
        });
        Session {
            id,
            reply: Reply(2),
            must_auth,
            authenticated: false,
            name: None,
            lib_name: None,
            lib_ver: None,
            addr,
            password,
            guard,
            tracker,
            inbox,
            tracking: None,
            subscribed: false,
        }
    }

    /// The invalidations owed to this connection (`None` with the near cache off).
    pub fn inbox(&self) -> Option<&Arc<Sink>> {
        self.inbox.as_ref()
    }

    /// Whether a push owed to this connection could be written now: it tracks (its own, or
    /// redirected), or is subscribed, or speaks RESP3 (a target of another's `REDIRECT`). A
    /// RESP2 connection that does neither takes none ([`Session::encode_push`]), and its loop
    /// need not wait for them.
    pub fn takes_pushes(&self) -> bool {
        self.inbox.is_some() && (self.tracking.is_some() || self.subscribed || self.reply.resp3())
    }

    /// Where the invalidations of this connection's tracked reads are owed, when it tracks.
    pub fn tracking_sink(&self) -> Option<&Arc<Sink>> {
        self.tracking.as_ref().map(|t| &t.sink)
    }

    /// With `REDIRECT`: the sink of this connection's own invalidations, the target's id, and
    /// the target's inbox (gone when the target closed).
    pub fn redirected(&self) -> Option<(&Arc<Sink>, u64, &Weak<Sink>)> {
        let t = self.tracking.as_ref()?;
        t.redirect.as_ref().map(|(id, to)| (&t.sink, *id, to))
    }

    /// The connection has read `requests` requests: what is owed from now on follows their answers.
    pub fn saw(&self, requests: u64) {
        if let Some(inbox) = &self.inbox {
            inbox.saw(requests);
        }
        if let Some((sink, _, _)) = self.redirected() {
            sink.saw(requests);
        }
    }

    /// Writes `push`, owed to this connection, as it can take it: an `invalidate` push in RESP3,
    /// a `message` on [`tracking::CHANNEL`] when subscribed in RESP2, else nothing (as Redis).
    pub fn encode_push(&self, push: &Push, out: &mut Vec<u8>) {
        if self.reply.resp3() {
            tracking::encode(push, out);
        } else if self.subscribed {
            tracking::encode_message(push, out);
        }
    }

    /// Whether a read of `keys` is tracked (remembered for this connection first, in its default
    /// mode), given the `CLIENT CACHING` that preceded it.
    fn track(&self, keys: &[Key], caching: Option<bool>) -> bool {
        let (Some(t), Some(tracker)) = (&self.tracking, &self.tracker) else {
            return false;
        };
        let tracked = match (t.optin, t.optout) {
            (true, _) => caching == Some(true),
            (_, true) => caching != Some(false),
            _ => true,
        };
        if tracked && !t.broadcast {
            tracker.remember(self.id, keys);
        }
        tracked
    }

    /// What `args` (a whole request) does and answers.
    pub fn handle(&mut self, service: &Service, args: &[Bytes]) -> Action {
        let Some(first) = args.first() else {
            return Action::Answer(Vec::new());
        };
        // The common cases first, without the general path's allocations.
        if (self.authenticated || !self.must_auth) && self.tracking.is_none() && !self.subscribed {
            if args.len() == 2 && first.eq_ignore_ascii_case(b"get") {
                return Action::Get { reply: self.reply };
            }
            if args.len() >= 2 {
                for (name, kind) in [
                    (&b"mget"[..], ReadKind::Mget),
                    (b"exists", ReadKind::Exists),
                ] {
                    if first.eq_ignore_ascii_case(name) {
                        return Action::Many {
                            kind,
                            reply: self.reply,
                        };
                    }
                }
            }
        }
        let name = name_of(first);
        let mut out = Vec::new();
        let reply = self.reply;
        // CLIENT CACHING says what the next command does, whatever it is.
        let caching_now = name == "client" && args.get(1).is_some_and(|a| name_of(a) == "caching");
        let caching = match caching_now {
            true => None,
            false => self.tracking.as_mut().and_then(|t| t.caching.take()),
        };
        if self.must_auth
            && !self.authenticated
            && !matches!(name.as_str(), "auth" | "hello" | "quit" | "reset")
        {
            reply.error(&mut out, "NOAUTH Authentication required.");
            return Action::Answer(out);
        }
        if self.subscribed
            && !reply.resp3()
            && !matches!(
                name.as_str(),
                "subscribe"
                    | "unsubscribe"
                    | "psubscribe"
                    | "punsubscribe"
                    | "ssubscribe"
                    | "sunsubscribe"
                    | "ping"
                    | "quit"
                    | "reset"
            )
        {
            reply.error(&mut out, &format!("ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context", shown(name.as_bytes())));
            return Action::Answer(out);
        }
        if let Some(arity) = SERVED.iter().find(|c| c.name == name).map(|c| c.arity) {
            let n = args.len() as i64;
            if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
                reply.error(
                    &mut out,
                    &format!("ERR wrong number of arguments for '{name}' command"),
                );
                return Action::Answer(out);
            }
        }
        match name.as_str() {
            "get" | "mget" | "exists" => {
                let kind = match name.as_str() {
                    "get" => ReadKind::Get,
                    "mget" => ReadKind::Mget,
                    _ => ReadKind::Exists,
                };
                match super::read::resolve_all(service, &args[1..]) {
                    Ok(keys) => {
                        let tracked = self.track(&keys, caching);
                        return Action::Read {
                            kind,
                            keys,
                            reply,
                            tracked,
                        };
                    }
                    Err(message) => reply.error(&mut out, &message),
                }
            }
            // Subscribed in RESP2, a ping is answered as a message would be.
            "ping" if self.subscribed && !reply.resp3() => {
                reply.array(&mut out, 2);
                reply.bulk(&mut out, b"pong");
                reply.bulk(&mut out, args.get(1).map_or(&b""[..], |a| &a[..]));
            }
            "ping" => match args.get(1) {
                Some(text) => reply.bulk(&mut out, text),
                None => reply.simple(&mut out, "PONG"),
            },
            "echo" => reply.bulk(&mut out, &args[1]),
            "select" => match &args[1][..] {
                b"0" => reply.simple(&mut out, "OK"),
                _ => reply.error(&mut out, "ERR DB index is out of range"),
            },
            "quit" => {
                reply.simple(&mut out, "OK");
                return Action::Close(out);
            }
            "reset" => {
                self.stop_tracking();
                self.subscribed = false;
                self.reply = Reply(2);
                self.authenticated = false;
                (self.name, self.lib_name, self.lib_ver) = (None, None, None);
                self.reply.simple(&mut out, "RESET");
            }
            "subscribe" => self.subscribe(&args[1..], &mut out),
            "unsubscribe" => self.unsubscribe(&args[1..], &mut out),
            "auth" => {
                let (user, password) = match args.len() {
                    2 => (&b"default"[..], &args[1]),
                    3 => (&args[1][..], &args[2]),
                    _ => {
                        reply.error(&mut out, "ERR syntax error");
                        return Action::Answer(out);
                    }
                };
                match self.auth(user, password) {
                    Ok(()) => reply.simple(&mut out, "OK"),
                    Err(e) => reply.error(&mut out, &e),
                }
            }
            "hello" => self.hello(&args[1..], &mut out),
            "client" => self.client(&args[1..], &mut out),
            "command" => command(reply, &args[1..], &mut out),
            "info" => self.info(service, &args[1..], &mut out),
            other if WRITES.contains(&other) => reply.error(
                &mut out,
                "READONLY cacheward serves reads only: write through cacheward's JSON-RPC socket (upsert, update, delete, put, rename) or to PostgreSQL",
            ),
            _ => reply.error(&mut out, &unknown(args)),
        }
        Action::Answer(out)
    }

    fn auth(&mut self, user: &[u8], password: &[u8]) -> Result<(), String> {
        let Some(file) = &self.password else {
            return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into());
        };
        if let Some((guard, ip)) = &self.guard {
            if !guard.may_try(*ip) {
                return Err(super::guard::REFUSED.into());
            }
        }
        let expected = file.read().map_err(|e| {
            tracing::warn!(error = %e, "resp.password_file unreadable: AUTH refused");
            "ERR the password cannot be checked now".to_owned()
        })?;
        match user == b"default" && constant_time_eq(expected.as_bytes(), password) {
            true => {
                self.authenticated = true;
                Ok(())
            }
            false => {
                if let Some((guard, ip)) = &self.guard {
                    guard.failed(*ip);
                }
                Err("WRONGPASS invalid username-password pair or user is disabled.".into())
            }
        }
    }

    fn hello(&mut self, args: &[Bytes], out: &mut Vec<u8>) {
        let mut proto = self.reply.0;
        let mut rest = args;
        if let Some(version) = rest.first() {
            match &version[..] {
                b"2" => proto = 2,
                b"3" => proto = 3,
                _ => match std::str::from_utf8(version)
                    .ok()
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    Some(_) => {
                        return self
                            .reply
                            .error(out, "NOPROTO unsupported protocol version")
                    }
                    None => {
                        return self.reply.error(
                            out,
                            "ERR Protocol version is not an integer or out of range",
                        )
                    }
                },
            }
            rest = &rest[1..];
        }
        let mut name = None;
        while let Some(option) = rest.first() {
            match (name_of(option).as_str(), rest.len()) {
                ("auth", 3..) => {
                    if let Err(e) = self.auth(&rest[1], &rest[2]) {
                        return self.reply.error(out, &e);
                    }
                    rest = &rest[3..];
                }
                ("setname", 2..) => {
                    match client_name(&rest[1]) {
                        Ok(n) => name = Some(n),
                        Err(e) => return self.reply.error(out, &e),
                    }
                    rest = &rest[2..];
                }
                (option, _) => {
                    return self
                        .reply
                        .error(out, &format!("ERR Syntax error in HELLO option '{option}'"))
                }
            }
        }
        if self.must_auth && !self.authenticated {
            return self.reply.error(out, "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
        }
        if let Some(name) = name {
            self.name = name;
        }
        self.reply = Reply(proto);
        let reply = self.reply;
        reply.map(out, 7);
        for (key, value) in [("server", "redis"), ("version", REDIS_VERSION)] {
            reply.bulk(out, key.as_bytes());
            reply.bulk(out, value.as_bytes());
        }
        reply.bulk(out, b"proto");
        reply.int(out, proto.into());
        reply.bulk(out, b"id");
        reply.int(out, self.id as i64);
        for (key, value) in [("mode", "standalone"), ("role", "master")] {
            reply.bulk(out, key.as_bytes());
            reply.bulk(out, value.as_bytes());
        }
        reply.bulk(out, b"modules");
        reply.array(out, 0);
    }

    /// `CLIENT INFO`'s line.
    pub(super) fn info_line(&self) -> String {
        format!(
            "id={} addr={} name={} db=0 resp={} lib-name={} lib-ver={}\n",
            self.id,
            self.addr,
            self.name.as_deref().unwrap_or(""),
            self.reply.0,
            self.lib_name.as_deref().unwrap_or(""),
            self.lib_ver.as_deref().unwrap_or(""),
        )
    }

    fn info(&self, service: &Service, args: &[Bytes], out: &mut Vec<u8>) {
        let wanted: Vec<String> = args.iter().map(|a| name_of(a)).collect();
        let all = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
        let want = |section: &str| all || wanted.iter().any(|w| w == section);
        let stats = service.stats_report(false);
        let mut text = String::new();
        if want("server") {
            text.push_str(&format!(
                "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nserver_name:cacheward\r\ncacheward_version:{}\r\nprocess_id:{}\r\nuptime_in_seconds:{}\r\n\r\n",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                stats.uptime_secs,
            ));
        }
        if want("clients") {
            text.push_str(&format!(
                "# Clients\r\nconnected_clients:{}\r\n\r\n",
                stats.resp.connections
            ));
        }
        if want("stats") {
            text.push_str(&format!(
                "# Stats\r\ntotal_commands_processed:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\n\r\n",
                stats.requests, stats.cache_hits, stats.cache_misses,
            ));
        }
        if want("keyspace") {
            text.push_str("# Keyspace\r\n\r\n");
        }
        self.reply.bulk(out, text.trim_end().as_bytes());
    }
}

/// A client name as `CLIENT SETNAME` takes it (empty: none).
pub(super) fn client_name(name: &[u8]) -> Result<Option<String>, String> {
    let text = std::str::from_utf8(name)
        .ok()
        .filter(|n| n.len() <= MAX_NAME && n.bytes().all(|b| (b'!'..=b'~').contains(&b)));
    match text {
        Some("") => Ok(None),
        Some(name) => Ok(Some(name.to_owned())),
        None => {
            Err("ERR Client names cannot contain spaces, newlines or special characters.".into())
        }
    }
}

/// Compares in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_tracking();
        if let Some(tracker) = &self.tracker {
            tracker.close(self.id);
        }
    }
}
