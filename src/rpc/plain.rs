//! The request fast path: a plain `get` (a user's, or a declared table's row by key or lookup)
//! read by a scanner made for that one shape, in one pass over the line, borrowing every string.
//! Anything else — an escape in a string, a value of another type, a member it does not know or
//! names twice, invalid JSON — is `None`, and the general path reads the line again and gives it
//! the same meaning or the precise error. (serde's derive spent twice as long on a table's get as
//! on a user's, most of it in the machinery of nested objects: that difference was the whole gap
//! between the two in the hit benchmark.)

use super::encode::Id;
use super::methods::get::Target;
use super::methods::params::validate_username;
use crate::model::key::Key;
use crate::model::registry::Tables;
use crate::model::table::Scalar;

/// A valid plain `get`: its id, the key it names (resolved against the checked tables) and its
/// `min_version`; `None` for any other line, a valid one included.
pub fn parse_plain_get(line: &[u8], tables: &Tables) -> Option<(Id, Target, Option<i64>)> {
    // Checked as UTF-8 once, here: every string is then a slice of it (cut at ASCII quotes).
    let text = std::str::from_utf8(line).ok()?;
    let mut scan = Scan { text, at: 0 };
    let (mut jsonrpc, mut id, mut method, mut params) = (None, None, None, None);
    scan.members(|s, name| {
        let twice = match name {
            "jsonrpc" => jsonrpc.replace(s.plain_str()?).is_some(),
            "id" => id.replace(s.id()?).is_some(),
            "method" => method.replace(s.plain_str()?).is_some(),
            "params" => params.replace(s.params()?).is_some(),
            _ => return None,
        };
        (!twice).then_some(())
    })?;
    scan.skip_space();
    if scan.at != line.len() || jsonrpc? != "2.0" || method? != "get" {
        return None;
    }
    let params = params?;
    if params.min_version.is_some_and(|v| v < 0) {
        return None;
    }
    Some((
        id?,
        Target::Key(plain_key(&params, tables)?),
        params.min_version,
    ))
}

/// A plain get's params.
#[derive(Default)]
struct Params<'a> {
    username: Option<&'a str>,
    table: Option<&'a str>,
    lookup: Option<&'a str>,
    /// The key object's members, in the order given.
    key: Option<Vec<(&'a str, Scalar<'a>)>>,
    min_version: Option<i64>,
}

/// The key `p` names: a user's, or a declared table's row's (its key object resolved against the
/// checked table). `None` for anything else, an error included.
fn plain_key(p: &Params, tables: &Tables) -> Option<Key> {
    match (p.username, p.table, &p.key) {
        (Some(username), None, None) if p.lookup.is_none() => {
            validate_username(username).ok()?;
            Some(Key::user(username))
        }
        (None, Some(table), Some(key)) => tables.with_ready(table, |table| {
            let by = match p.lookup {
                None => None,
                Some(name) => Some(table.lookup(name)?),
            };
            Some(table.key(&table.key_of_scalars(key, by)?))
        })?,
        _ => None,
    }
}

/// A cursor over a request line.
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Past JSON's whitespace.
    fn skip_space(&mut self) {
        let rest = &self.bytes()[self.at..];
        self.at += rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.bytes().get(self.at).copied()
    }

    /// Consumes `byte`, after whitespace, or fails.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// An object, each member handed to `member` with its name (which reads the value).
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let name = self.plain_str()?;
            self.eat(b':')?;
            member(self, name)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string without escapes (nor the control characters JSON refuses raw), borrowed.
    fn plain_str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let len = self.bytes()[start..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        self.at = start + len;
        (self.bytes()[self.at] == b'"').then_some(())?;
        self.at += 1;
        Some(&self.text[start..start + len])
    }

    /// An integer within `i64`: `-?(0|[1-9][0-9]*)`, not followed by a fraction or exponent;
    /// not `-0`, which serde_json reads as a float.
    fn int(&mut self) -> Option<i64> {
        self.skip_space();
        let start = self.at;
        let negative = self.bytes().get(self.at) == Some(&b'-');
        self.at += usize::from(negative);
        let rest = &self.bytes()[self.at..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || (rest[0] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        self.at += digits;
        if matches!(self.bytes().get(self.at), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.text[start..self.at].parse().ok()
    }

    /// An id: a string (escapes allowed) or a number, its text read as serde_json reads it.
    fn id(&mut self) -> Option<Id> {
        self.skip_space();
        let start = self.at;
        let bytes = self.bytes();
        match bytes.get(self.at)? {
            b'"' => {
                self.at += 1;
                loop {
                    match bytes.get(self.at)? {
                        b'"' => break,
                        b'\\' => self.at += 2,
                        _ => self.at += 1,
                    }
                }
                self.at += 1;
            }
            b'-' | b'0'..=b'9' => {
                let number = |b: &u8| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9');
                self.at += bytes[self.at..].iter().take_while(|b| number(b)).count();
            }
            _ => return None,
        }
        serde_json::from_str(self.text.get(start..self.at)?).ok()
    }

    /// A plain get's params: each member it may have, once, of the type it must have.
    fn params(&mut self) -> Option<Params<'a>> {
        let mut p = Params::default();
        self.members(|s, name| {
            let twice = match name {
                "username" => p.username.replace(s.plain_str()?).is_some(),
                "table" => p.table.replace(s.plain_str()?).is_some(),
                "lookup" => p.lookup.replace(s.plain_str()?).is_some(),
                "key" => p.key.replace(s.scalars()?).is_some(),
                "min_version" => p.min_version.replace(s.int()?).is_some(),
                _ => return None,
            };
            (!twice).then_some(())
        })?;
        Some(p)
    }

    /// A key object: members whose values are strings without escapes or integers (at most 16:
    /// no key has more columns).
    fn scalars(&mut self) -> Option<Vec<(&'a str, Scalar<'a>)>> {
        let mut given = Vec::with_capacity(2);
        self.members(|s, name| {
            if given.len() == 16 {
                return None;
            }
            let value = match s.peek()? {
                b'"' => Scalar::Str(s.plain_str()?),
                _ => Scalar::Int(s.int()?),
            };
            given.push((name, value));
            Some(())
        })?;
        Some(given)
    }
}
