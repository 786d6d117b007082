//! `CLIENT` and its subcommands, and what client-side caching adds to a connection: `CLIENT
//! TRACKING` (on this connection in RESP3, or with `REDIRECT` to another connection, which takes
//! them as RESP3 pushes or, subscribed in RESP2, as messages on `__redis__:invalidate`), `CLIENT
//! CACHING`, `CLIENT TRACKINGINFO`, and `SUBSCRIBE` / `UNSUBSCRIBE` to that one channel.

use std::sync::Arc;

use bytes::Bytes;

use super::commands::name_of;
use super::frame::shown;
use super::session::{client_name, Session, Tracking, MAX_NAME};
use super::tracking::{Mode, Sink, CHANNEL};

impl Session {
    /// `CLIENT TRACKING ON|OFF [REDIRECT id] [PREFIX p]… [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`.
    fn client_tracking(&mut self, args: &[Bytes]) -> Result<(), String> {
        let on = match name_of(&args[0]).as_str() {
            "on" => true,
            "off" => false,
            _ => return Err("ERR syntax error".into()),
        };
        let (mut broadcast, mut optin, mut optout, mut prefixes, mut redirect) =
            (false, false, false, Vec::new(), None);
        let mut rest = &args[1..];
        while let Some(option) = rest.first() {
            match name_of(option).as_str() {
                "bcast" => broadcast = true,
                "optin" => optin = true,
                "optout" => optout = true,
                // Its clients cannot write: no change is ever theirs.
                "noloop" => {}
                "prefix" if rest.len() > 1 => {
                    prefixes.push(rest[1].clone());
                    rest = &rest[1..];
                }
                "redirect" if rest.len() > 1 => {
                    let id = std::str::from_utf8(&rest[1])
                        .ok()
                        .and_then(|id| id.parse::<u64>().ok());
                    redirect =
                        Some(id.ok_or("ERR value is not an integer or out of range".to_owned())?);
                    rest = &rest[1..];
                }
                _ => return Err("ERR syntax error".into()),
            }
            rest = &rest[1..];
        }
        if !on {
            self.stop_tracking();
            return Ok(());
        }
        if !prefixes.is_empty() && !broadcast {
            return Err("ERR PREFIX option requires BCAST mode to be enabled".into());
        }
        if optin && optout {
            return Err("ERR You can't use OPTIN and OPTOUT at the same time".into());
        }
        if broadcast && (optin || optout) {
            return Err("ERR OPTIN and OPTOUT are not compatible with BCAST".into());
        }
        let (Some(tracker), Some(inbox)) = (self.tracker.clone(), self.inbox.clone()) else {
            return Err("ERR CLIENT TRACKING needs the near cache (cache.local_max_bytes > 0): it is what tells this daemon of changes".into());
        };
        let redirect = match redirect {
            Some(id) => match tracker.inbox(id) {
                Some(to) => Some((id, to)),
                None => return Err("ERR The client ID you want redirect to does not exist".into()),
            },
            None if !self.reply.resp3() => {
                return Err("ERR CLIENT TRACKING in RESP2 needs REDIRECT to a connection subscribed to __redis__:invalidate (or HELLO 3 for pushes on this connection)".into())
            }
            None => None,
        };
        // What a previous REDIRECT still owes goes to its target first.
        self.stop_tracking();
        let sink = match redirect {
            Some(_) => Arc::new(Sink::default()),
            None => inbox,
        };
        let mode = match broadcast {
            true => Mode::Broadcast(prefixes.clone()),
            false => Mode::Reads,
        };
        tracker.start(self.id, sink.clone(), mode);
        self.tracking = Some(Tracking {
            sink,
            redirect,
            broadcast,
            optin,
            optout,
            prefixes,
            caching: None,
        });
        Ok(())
    }

    /// Stops tracking; what a redirected tracking still owes is sent to its target now.
    pub(super) fn stop_tracking(&mut self) {
        let (Some(tracking), Some(tracker)) = (self.tracking.take(), &self.tracker) else {
            return;
        };
        tracker.stop(self.id);
        if let Some((_, to)) = &tracking.redirect {
            if let Some(to) = to.upgrade() {
                for push in tracking.sink.take_ready(u64::MAX) {
                    to.owe(push);
                }
            }
        }
    }

    /// `CLIENT GETREDIR`: -1 when not tracking, 0 when not redirecting, else the target's id.
    fn redirect_id(&self) -> i64 {
        match &self.tracking {
            None => -1,
            Some(t) => t.redirect.as_ref().map_or(0, |(id, _)| *id as i64),
        }
    }

    /// `CLIENT TRACKINGINFO`: flags, redirect, prefixes.
    fn tracking_info(&self, out: &mut Vec<u8>) {
        let reply = self.reply;
        let mut flags = Vec::new();
        match &self.tracking {
            None => flags.push("off"),
            Some(t) => {
                flags.push("on");
                for (set, flag) in [
                    (t.broadcast, "bcast"),
                    (t.optin, "optin"),
                    (t.optout, "optout"),
                ] {
                    if set {
                        flags.push(flag);
                    }
                }
                match t.caching {
                    Some(true) => flags.push("caching-yes"),
                    Some(false) => flags.push("caching-no"),
                    None => {}
                }
                if t.redirect
                    .as_ref()
                    .is_some_and(|(_, to)| to.strong_count() == 0)
                {
                    flags.push("broken_redirect");
                }
            }
        }
        reply.map(out, 3);
        reply.bulk(out, b"flags");
        reply.set(out, flags.len());
        for flag in flags {
            reply.bulk(out, flag.as_bytes());
        }
        reply.bulk(out, b"redirect");
        reply.int(out, self.redirect_id());
        reply.bulk(out, b"prefixes");
        let prefixes = self.tracking.as_ref().map_or(&[][..], |t| &t.prefixes[..]);
        reply.array(out, prefixes.len());
        for prefix in prefixes {
            reply.bulk(out, prefix);
        }
    }

    /// `SUBSCRIBE channel…`: only [`CHANNEL`], where the invalidations redirected to this
    /// connection arrive (nothing else is ever published).
    pub(super) fn subscribe(&mut self, channels: &[Bytes], out: &mut Vec<u8>) {
        if let Some(other) = channels.iter().find(|c| &c[..] != CHANNEL) {
            return self.reply.error(out, &format!("ERR cacheward publishes nothing on '{}': the only channel is __redis__:invalidate (CLIENT TRACKING ... REDIRECT)", shown(other)));
        }
        if self.inbox.is_none() {
            return self.reply.error(out, "ERR __redis__:invalidate needs the near cache (cache.local_max_bytes > 0): it is what tells this daemon of changes");
        }
        self.subscribed = true;
        for channel in channels {
            self.subscription(b"subscribe", Some(channel), out);
        }
    }

    /// `UNSUBSCRIBE [channel…]`.
    pub(super) fn unsubscribe(&mut self, channels: &[Bytes], out: &mut Vec<u8>) {
        if channels.is_empty() {
            let was = std::mem::take(&mut self.subscribed);
            return self.subscription(b"unsubscribe", was.then_some(CHANNEL), out);
        }
        for channel in channels {
            if &channel[..] == CHANNEL {
                self.subscribed = false;
            }
            self.subscription(b"unsubscribe", Some(channel), out);
        }
    }

    /// One (un)subscription's confirmation: a push in RESP3, an array in RESP2.
    fn subscription(&self, kind: &[u8], channel: Option<&[u8]>, out: &mut Vec<u8>) {
        let reply = self.reply;
        match reply.resp3() {
            true => reply.push(out, 3),
            false => reply.array(out, 3),
        }
        reply.bulk(out, kind);
        match channel {
            Some(channel) => reply.bulk(out, channel),
            None => reply.nil(out),
        }
        reply.int(out, self.subscribed as i64);
    }

    pub(super) fn client(&mut self, args: &[Bytes], out: &mut Vec<u8>) {
        let reply = self.reply;
        let sub = name_of(&args[0]);
        match (sub.as_str(), args.len()) {
            ("id", 1) => reply.int(out, self.id as i64),
            ("setname", 2) => match client_name(&args[1]) {
                Ok(name) => {
                    self.name = name;
                    reply.simple(out, "OK");
                }
                Err(e) => reply.error(out, &e),
            },
            ("getname", 1) => match &self.name {
                Some(name) => reply.bulk(out, name.as_bytes()),
                None => reply.nil(out),
            },
            ("setinfo", 3) => {
                let value = String::from_utf8_lossy(&args[2]);
                if value.len() > MAX_NAME
                    || value
                        .chars()
                        .any(|c| c == ' ' || c == '\n' || c.is_control())
                {
                    return reply.error(out, "ERR CLIENT SETINFO values may not contain spaces, newlines or control characters");
                }
                match name_of(&args[1]).as_str() {
                    "lib-name" => self.lib_name = Some(value.into_owned()),
                    "lib-ver" => self.lib_ver = Some(value.into_owned()),
                    other => {
                        return reply.error(out, &format!("ERR Unrecognized option '{other}'"))
                    }
                }
                reply.simple(out, "OK");
            }
            ("info", 1) => {
                let line = self.info_line();
                reply.bulk(out, line.as_bytes());
            }
            ("getredir", 1) => reply.int(out, self.redirect_id()),
            ("trackinginfo", 1) => self.tracking_info(out),
            ("tracking", 2..) => match self.client_tracking(&args[1..]) {
                Ok(()) => reply.simple(out, "OK"),
                Err(e) => reply.error(out, &e),
            },
            ("caching", 2) => {
                let yes = match name_of(&args[1]).as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return reply.error(out, "ERR syntax error"),
                };
                match &mut self.tracking {
                    Some(t) if yes && t.optin => t.caching = Some(true),
                    Some(t) if !yes && t.optout => t.caching = Some(false),
                    _ if yes => return reply.error(out, "ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode."),
                    _ => return reply.error(out, "ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode."),
                }
                reply.simple(out, "OK");
            }
            (other, _)
                if matches!(
                    other,
                    "id" | "setname"
                        | "getname"
                        | "setinfo"
                        | "info"
                        | "getredir"
                        | "trackinginfo"
                        | "tracking"
                        | "caching"
                ) =>
            {
                reply.error(
                    out,
                    &format!("ERR wrong number of arguments for 'client|{other}' command"),
                )
            }
            (other, _) => reply.error(
                out,
                &format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    shown(other.as_bytes())
                ),
            ),
        }
    }
}
