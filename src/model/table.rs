//! A declared table, compiled once from its `[tables.NAME]` section and the catalog: its key and
//! lookups with their column types, its projection, and the encoding of a key into the text that
//! follows its prefix in Redis (`docs/reference.md`, "Declared tables").
//!
//! Key and lookup columns are of types whose text form is canonical (one value, one text): the
//! integers, `text`, `varchar` and `uuid`. A client's JSON value is turned into that text here,
//! as PostgreSQL's input and output functions would, so that a cache hit needs no database round
//! trip; a value PostgreSQL would refuse is refused here too, naming the column.

use serde_json::{Map, Value};

use super::key::{Key, TableId};

/// A key or lookup column: its name and the kind of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: KeyType,
}

/// A lookup: another unique key reads may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub name: String,
    pub columns: Vec<Column>,
}

/// A declared table, checked against the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub id: TableId,
    /// Its name in cacheward (the section's).
    pub name: String,
    /// The table in PostgreSQL, schema-qualified and quoted as SQL needs it.
    pub source: String,
    pub prefix: String,
    pub ttl_secs: u64,
    pub writable: bool,
    pub key: Vec<Column>,
    pub lookups: Vec<Lookup>,
    /// The columns cached and served, in the table's order.
    pub projection: Vec<String>,
    /// Their types (`pg_type.typname`), at the same index: a column whose type changed changes
    /// the rows' JSON.
    pub types: Vec<String>,
    /// The projected `timestamptz` (true) and `timestamp` (false) columns, rewritten in ROW as
    /// `USER`'s timestamps are.
    pub timestamps: Vec<(String, bool)>,
}

/// A key given by a client that names no row this table can have: which column, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub column: String,
    pub reason: String,
}

impl Table {
    /// Whether a one-column text key is written as it is (no lookups to tell it from).
    fn plain(&self) -> bool {
        self.lookups.is_empty()
    }

    /// The text following the prefix for the row whose key columns print as `parts`.
    pub fn key_text(&self, parts: &[&str]) -> String {
        encode_key(parts, self.plain())
    }

    /// The text following the prefix for a client's key object (column → JSON value), or
    /// which column is missing, extra or of a value its type refuses.
    pub fn key_of(
        &self,
        given: &Map<String, Value>,
        lookup: Option<&Lookup>,
    ) -> Result<String, KeyError> {
        let columns = lookup.map_or(&self.key, |l| &l.columns);
        if let Some(extra) = given
            .keys()
            .find(|k| !columns.iter().any(|c| &c.name == *k))
        {
            return Err(KeyError {
                column: extra.clone(),
                reason: "is not a column of this key".into(),
            });
        }
        self.encode_columns(lookup, |name| given.get(name).map(Scalar::of))
    }

    /// [`Table::key_of`] for a key object read as scalars (the request fast path's): `None`
    /// unless it names exactly the key's (or `lookup`'s) columns, each once, with values the
    /// columns take.
    pub fn key_of_scalars(
        &self,
        given: &[(&str, Scalar)],
        lookup: Option<&Lookup>,
    ) -> Option<String> {
        let columns = lookup.map_or(&self.key, |l| &l.columns);
        if given.len() != columns.len() {
            return None;
        }
        let found = |name: &str| given.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        self.encode_columns(lookup, found).ok()
    }

    /// The key text of the columns of the key (or of `lookup`) whose values `value` gives by
    /// name, encoded as [`encode_key`] and [`encode_lookup`] do, written in one pass.
    fn encode_columns<'v>(
        &self,
        lookup: Option<&Lookup>,
        value: impl Fn(&str) -> Option<Scalar<'v>>,
    ) -> Result<String, KeyError> {
        let columns = lookup.map_or(&self.key, |l| &l.columns);
        let escape = lookup.is_some() || !(self.plain() && columns.len() == 1);
        let mut out = String::with_capacity(32);
        if let Some(l) = lookup {
            out.push_str(&l.name);
            out.push('=');
        }
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            let value = value(&column.name).ok_or_else(|| KeyError {
                column: column.name.clone(),
                reason: "is missing".into(),
            })?;
            column
                .kind
                .canonical_into(value, &mut out, escape)
                .map_err(|reason| KeyError {
                    column: column.name.clone(),
                    reason,
                })?;
        }
        Ok(out)
    }

    /// A key text as a client wrote it (a Redis key after the prefix), checked to be the one the
    /// row it names is cached under: `Ok` with that text, or which column's value no row can have
    /// (`column` is empty when the text is no key of this table at all) — a text that
    /// PostgreSQL would convert to another key's value (`007` for an integer) is refused with
    /// the key it would be.
    pub fn checked_text(&self, text: &str) -> Result<(), KeyError> {
        self.canonical_parts(text).map(drop)
    }

    /// What a key's text names, as [`Table::decode`] reads it, when it is the text the row it
    /// names is cached under (see [`Table::checked_text`]); `None` for any other text. A Redis
    /// key or an outbox row's key that no row can have (`x` for an integer) is never cast.
    pub fn decode_canonical(&self, text: &str) -> Option<(Option<&Lookup>, Vec<String>)> {
        self.canonical_parts(text).ok()
    }

    fn canonical_parts(&self, text: &str) -> Result<(Option<&Lookup>, Vec<String>), KeyError> {
        let (lookup, parts) = self.decode(text).ok_or_else(|| KeyError {
            column: String::new(),
            reason: match self.lookups.is_empty() {
                true => format!("is not {} key columns joined by ':'", self.key.len()),
                false => "is not a key or a lookup (NAME=...) of this table".into(),
            },
        })?;
        let columns = lookup.map_or(&self.key, |l| &l.columns);
        let canonical = self.encode_columns(lookup, |name| {
            let at = columns.iter().position(|c| c.name == name)?;
            Some(Scalar::Str(&parts[at]))
        })?;
        match canonical == text {
            true => Ok((lookup, parts)),
            false => Err(KeyError {
                column: String::new(),
                reason: format!("is written {canonical:?} in its Redis key"),
            }),
        }
    }

    pub fn lookup(&self, name: &str) -> Option<&Lookup> {
        self.lookups.iter().find(|l| l.name == name)
    }

    /// The key of the entry whose text is `text`.
    pub fn key(&self, text: &str) -> Key {
        Key::new(self.id, text)
    }

    /// What a key's text names: the lookup (`None`: the table's key) and each column's text, as
    /// [`Table::key_text`] or [`encode_lookup`] encoded them. `None` for a text no key of this
    /// table encodes to.
    pub fn decode(&self, text: &str) -> Option<(Option<&Lookup>, Vec<String>)> {
        if self.plain() && self.key.len() == 1 {
            return Some((None, vec![text.to_owned()]));
        }
        let (lookup, rest) = match text.split_once('=') {
            Some((name, rest)) => (Some(self.lookup(name)?), rest),
            None => (None, text),
        };
        let parts: Option<Vec<String>> = rest.split(':').map(unescape).collect();
        let parts = parts?;
        let width = lookup.map_or(self.key.len(), |l| l.columns.len());
        (parts.len() == width).then_some((lookup, parts))
    }
}

/// The type of a key or lookup column, as far as its text form goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Int2,
    Int4,
    Int8,
    Text,
    Uuid,
}

impl KeyType {
    /// The kind of a column of the type PostgreSQL names `typname` (`pg_type.typname`), if keys
    /// may be of it.
    pub fn of(typname: &str) -> Option<KeyType> {
        Some(match typname {
            "int2" => KeyType::Int2,
            "int4" => KeyType::Int4,
            "int8" => KeyType::Int8,
            "text" | "varchar" => KeyType::Text,
            "uuid" => KeyType::Uuid,
            _ => return None,
        })
    }

    /// The type's name in SQL, to cast a key's text back to it.
    pub fn sql(self) -> &'static str {
        match self {
            KeyType::Int2 => "int2",
            KeyType::Int4 => "int4",
            KeyType::Int8 => "int8",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    /// What keys may be, for error messages.
    pub const ALLOWED: &'static str = "smallint, integer, bigint, text, varchar or uuid";

    /// The column's text as PostgreSQL would print the value `value` converts to, or why
    /// PostgreSQL would refuse it.
    pub fn canonical(self, value: &Value) -> Result<String, String> {
        let mut out = String::new();
        self.canonical_into(Scalar::of(value), &mut out, false)?;
        Ok(out)
    }

    /// [`KeyType::canonical`] written at the end of `out`, percent-encoded as a key's part when
    /// `escape` (only text can need it: integers and uuids print none of `%`, `:`, `=`).
    pub fn canonical_into(
        self,
        value: Scalar,
        out: &mut String,
        escape: bool,
    ) -> Result<(), String> {
        use std::fmt::Write;
        let integer = |min: i64, max: i64, name: &str| -> Result<i64, String> {
            let parsed = match value {
                Scalar::Int(n) => n,
                Scalar::Str(s) => s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("invalid input syntax for type {name}: {s:?}"))?,
                Scalar::Json(Value::Number(n)) => return Err(format!("{n} is not a {name}")),
                Scalar::Json(other) => {
                    return Err(format!("expected a {name}, got {}", type_name(other)))
                }
            };
            match (min..=max).contains(&parsed) {
                true => Ok(parsed),
                false => Err(format!("{parsed} is out of range for type {name}")),
            }
        };
        let n = match self {
            KeyType::Int2 => integer(i16::MIN.into(), i16::MAX.into(), "smallint")?,
            KeyType::Int4 => integer(i32::MIN.into(), i32::MAX.into(), "integer")?,
            KeyType::Int8 => integer(i64::MIN, i64::MAX, "bigint")?,
            KeyType::Text => {
                match value {
                    Scalar::Str(s) if s.contains('\0') => {
                        return Err("text cannot hold the character NUL".into())
                    }
                    Scalar::Str(s) if escape => escape_into(out, s),
                    Scalar::Str(s) => out.push_str(s),
                    Scalar::Int(n) => out.push_str(itoa::Buffer::new().format(n)),
                    // A number's or a boolean's text needs no escaping either.
                    Scalar::Json(Value::Number(n)) => {
                        write!(out, "{n}").expect("a String takes any text")
                    }
                    Scalar::Json(Value::Bool(b)) => {
                        write!(out, "{b}").expect("a String takes any text")
                    }
                    Scalar::Json(other) => {
                        return Err(format!("expected text, got {}", type_name(other)))
                    }
                }
                return Ok(());
            }
            KeyType::Uuid => {
                return match value {
                    Scalar::Str(s) => match uuid(s) {
                        Some(text) => {
                            out.push_str(&text);
                            Ok(())
                        }
                        None => Err(format!("invalid uuid: {s:?}")),
                    },
                    Scalar::Int(_) => Err("expected a uuid, got a number".into()),
                    Scalar::Json(other) => {
                        Err(format!("expected a uuid, got {}", type_name(other)))
                    }
                }
            }
        };
        out.push_str(itoa::Buffer::new().format(n));
        Ok(())
    }
}

/// A key column's value as a client gave it: a string or an integer, read without building a
/// JSON value (the request fast path), or any other JSON value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    Str(&'a str),
    Int(i64),
    Json(&'a Value),
}

impl<'a> Scalar<'a> {
    pub fn of(value: &'a Value) -> Scalar<'a> {
        match value {
            Value::String(s) => Scalar::Str(s),
            Value::Number(n) => n.as_i64().map_or(Scalar::Json(value), Scalar::Int),
            other => Scalar::Json(other),
        }
    }
}

/// What kind of JSON value `value` is, for an error message.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A uuid as PostgreSQL's input takes it (hex digits, optionally braced, a hyphen allowed after
/// any group of four digits), printed as its output does: lowercase, 8-4-4-4-12.
fn uuid(text: &str) -> Option<String> {
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let mut digits = String::with_capacity(32);
    let mut since_hyphen = 0;
    for c in inner.chars() {
        if c == '-' {
            // PostgreSQL: a hyphen only after a group of four digits, never first or doubled.
            if since_hyphen == 0 || since_hyphen % 4 != 0 {
                return None;
            }
            since_hyphen = 0;
            continue;
        }
        if !c.is_ascii_hexdigit() {
            return None;
        }
        digits.push(c.to_ascii_lowercase());
        since_hyphen += 1;
    }
    if digits.len() != 32 || inner.ends_with('-') {
        return None;
    }
    Some(format!(
        "{}-{}-{}-{}-{}",
        &digits[..8],
        &digits[8..12],
        &digits[12..16],
        &digits[16..20],
        &digits[20..]
    ))
}

/// The text that follows a table's prefix for a key whose columns have the texts `parts`: one
/// text part as it is when the table has no lookups (as `users` has it); otherwise each part
/// with `%`, `:`, `=` and control characters percent-encoded, joined with `:`. Injective: no two
/// keys share a text, and no primary key's text is a lookup's (those hold a raw `=`).
pub fn encode_key(parts: &[&str], plain: bool) -> String {
    if plain && parts.len() == 1 {
        return parts[0].to_owned();
    }
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        escape_into(&mut out, part);
    }
    out
}

/// A lookup's text: its name, `=`, then its values encoded as a key's are.
pub fn encode_lookup(lookup: &str, parts: &[&str]) -> String {
    let mut out = format!("{lookup}=");
    out.push_str(&encode_key(parts, false));
    out
}

fn escape_into(out: &mut String, part: &str) {
    for c in part.chars() {
        if c == '%' || c == ':' || c == '=' || c.is_control() {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                out.push('%');
                out.push(HEX[(byte >> 4) as usize] as char);
                out.push(HEX[(byte & 15) as usize] as char);
            }
        } else {
            out.push(c);
        }
    }
}

/// One part of a key text, its percent-encoding undone; `None` if it is not what
/// [`escape_into`] writes.
fn unescape(part: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(part.len());
    let mut rest = part.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_are_read_as_postgresql_reads_them() {
        let int4 = KeyType::Int4;
        assert_eq!(int4.canonical(&json!(42)).unwrap(), "42");
        assert_eq!(int4.canonical(&json!(" +042 ")).unwrap(), "42");
        assert_eq!(int4.canonical(&json!(-7)).unwrap(), "-7");
        assert!(int4
            .canonical(&json!(2_147_483_648i64))
            .unwrap_err()
            .contains("out of range"));
        assert!(int4.canonical(&json!(1.5)).is_err());
        assert!(int4
            .canonical(&json!("4x"))
            .unwrap_err()
            .contains("integer"));
        assert!(int4.canonical(&json!(null)).unwrap_err().contains("null"));
        assert!(KeyType::Int2.canonical(&json!(40000)).is_err());
        assert_eq!(
            KeyType::Int8.canonical(&json!(i64::MAX)).unwrap(),
            i64::MAX.to_string()
        );
    }

    #[test]
    fn text_is_taken_as_it_is_and_uuids_printed_as_postgresql_prints_them() {
        assert_eq!(
            KeyType::Text.canonical(&json!(" a:b=c ")).unwrap(),
            " a:b=c "
        );
        assert_eq!(KeyType::Text.canonical(&json!(12)).unwrap(), "12");
        assert!(KeyType::Text.canonical(&json!("a\u{0}b")).is_err());
        assert!(KeyType::Text.canonical(&json!([1])).is_err());
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for given in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(
                KeyType::Uuid.canonical(&json!(given)).unwrap(),
                canonical,
                "{given}"
            );
        }
        for bad in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11-",
            "a0e-ebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "g0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert!(KeyType::Uuid.canonical(&json!(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_encode_injectively_and_never_as_a_lookup() {
        assert_eq!(encode_key(&["user01"], true), "user01");
        assert_eq!(encode_key(&["a:b=c%"], true), "a:b=c%");
        assert_eq!(encode_key(&["a:b=c%"], false), "a%3Ab%3Dc%25");
        assert_eq!(encode_key(&["eu", "42"], false), "eu:42");
        assert_eq!(encode_key(&["e:u", "4\n2"], false), "e%3Au:4%0A2");
        assert_eq!(encode_key(&["\u{85}"], false), "%C2%85");
        // ("a:b", "c") and ("a", "b:c") would both be a:b:c unencoded.
        assert_ne!(
            encode_key(&["a:b", "c"], false),
            encode_key(&["a", "b:c"], false)
        );
        assert_eq!(encode_lookup("by_email", &["a=b@x"]), "by_email=a%3Db@x");
        // A key's text never holds a raw `=`, a lookup's always does.
        assert!(!encode_key(&["by_email=a"], false).contains('='));
    }

    fn table(key: &[&str], lookups: &[(&str, &[&str])]) -> Table {
        let column = |name: &&str| Column {
            name: name.to_string(),
            kind: KeyType::Text,
        };
        Table {
            id: TableId(1),
            name: "t".into(),
            source: "t".into(),
            prefix: "t:".into(),
            ttl_secs: 60,
            writable: true,
            key: key.iter().map(column).collect(),
            lookups: lookups
                .iter()
                .map(|(name, columns)| Lookup {
                    name: name.to_string(),
                    columns: columns.iter().map(column).collect(),
                })
                .collect(),
            projection: vec![],
            types: vec![],
            timestamps: vec![],
        }
    }

    #[test]
    fn a_key_text_decodes_to_what_encoded_it() {
        let plain = table(&["id"], &[]);
        assert_eq!(
            plain.decode("a:b=c%"),
            Some((None, vec!["a:b=c%".to_owned()]))
        );
        let t = table(&["region", "id"], &[("by_email", &["email"])]);
        let key = t
            .key_of(
                &serde_json::from_value(json!({"region": "e:u=%", "id": "4\n2"})).unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(key, "e%3Au%3D%25:4%0A2");
        assert_eq!(
            t.decode(&key),
            Some((None, vec!["e:u=%".to_owned(), "4\n2".to_owned()]))
        );
        let by = t.lookup("by_email");
        let text = t
            .key_of(
                &serde_json::from_value(json!({"email": "a=b:c\u{85}"})).unwrap(),
                by,
            )
            .unwrap();
        let (lookup, parts) = t.decode(&text).unwrap();
        assert_eq!(
            (lookup.map(|l| l.name.as_str()), parts),
            (Some("by_email"), vec!["a=b:c\u{85}".to_owned()])
        );
        for bad in ["a", "a:b:c", "by_nothing=x", "a:%zz", "%C3:b"] {
            assert_eq!(t.decode(bad), None, "{bad}");
        }
        let error = t
            .key_of(
                &serde_json::from_value(json!({"region": "x"})).unwrap(),
                None,
            )
            .unwrap_err();
        assert_eq!(
            (error.column.as_str(), error.reason.as_str()),
            ("id", "is missing")
        );
        let error = t
            .key_of(
                &serde_json::from_value(json!({"region": "x", "id": "1", "z": 1})).unwrap(),
                None,
            )
            .unwrap_err();
        assert_eq!(error.column, "z");
    }
}
