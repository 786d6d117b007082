//! Response lines, `\n` included: a success, an error, and the `get` answer that embeds the
//! stored JSON without re-encoding it. No I/O here.

use serde::Serialize;
use serde_json::Value;

use super::error::RpcError;

/// A request id as the client sent it (string, number or null), echoed back verbatim.
pub type Id = Value;

#[derive(Serialize)]
struct SuccessFrame<'a, T: Serialize> {
    jsonrpc: &'static str,
    id: &'a Id,
    result: T,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    jsonrpc: &'static str,
    id: &'a Id,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: i32,
    message: &'a str,
    data: ErrorData,
}

#[derive(Serialize)]
struct ErrorData {
    kind: &'static str,
}

/// A success response line, `\n` included.
pub fn encode_result<T: Serialize>(id: &Id, result: T) -> Vec<u8> {
    let frame = SuccessFrame {
        jsonrpc: "2.0",
        id,
        result,
    };
    let mut out = serde_json::to_vec(&frame).expect("responses always serialize");
    out.push(b'\n');
    out
}

/// Appends the success response carrying a user (`get`), `\n` included, to `out`. `user` is the
/// user's JSON as stored, embedded without re-encoding; it is only rewritten compactly if it
/// spans lines, which would break the framing.
pub fn encode_user_into(out: &mut Vec<u8>, id: &Id, user: &str, source: &str) {
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    serde_json::to_writer(&mut *out, id).expect("ids always serialize");
    out.extend_from_slice(br#","result":{"user":"#);
    if user.bytes().any(|b| b == b'\n' || b == b'\r') {
        match serde_json::from_str::<Value>(user) {
            Ok(value) => serde_json::to_writer(&mut *out, &value).expect("values serialize"),
            Err(_) => out.extend_from_slice(b"null"),
        }
    } else {
        out.extend_from_slice(user.as_bytes());
    }
    out.extend_from_slice(br#","source":""#);
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(b"\"}}\n");
}

/// `{"version":N,"row":ROW}` as `TableRow::entry` writes it: N and ROW, when ROW is on one line.
/// Anything else (another writer's spacing, a row spanning lines) is `None`, and parsed.
fn cut_entry(entry: &str) -> Option<(&str, &str)> {
    let rest = entry.strip_prefix(r#"{"version":"#)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '-')?;
    let version = &rest[..digits];
    version.parse::<i64>().ok()?;
    let row = rest[digits..]
        .strip_prefix(r#","row":"#)?
        .strip_suffix('}')?;
    let whole = row.starts_with('{') && row.ends_with('}');
    (whole && !row.bytes().any(|b| b == b'\n' || b == b'\r')).then_some((version, row))
}

/// ROW out of an entry `{"version":N,"row":ROW}`: cut where cacheward wrote it, else parsed
/// (another writer's spacing); `None` for anything that is not an entry.
pub fn row_of(entry: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some((_, row)) = cut_entry(entry) {
        return Some(row.into());
    }
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        #[serde(borrow)]
        row: &'a serde_json::value::RawValue,
    }
    let row = serde_json::from_str::<Entry>(entry).ok()?.row.get();
    Some(row.to_owned().into())
}

/// A declared table's `get` answer line: `{"row":ROW,"version":N,"source":S}` from its entry
/// `{"version":N,"row":ROW}` as stored, `\n` included.
pub fn encode_row_into(out: &mut Vec<u8>, id: &Id, entry: &str, source: &str) {
    #[derive(serde::Deserialize)]
    struct Entry<'a> {
        version: i64,
        #[serde(borrow)]
        row: &'a serde_json::value::RawValue,
    }
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    serde_json::to_writer(&mut *out, id).expect("ids always serialize");
    out.extend_from_slice(br#","result":{"row":"#);
    // Entries cacheward wrote (`TableRow::entry`) are cut where they say, without parsing the row.
    if let Some((version, row)) = cut_entry(entry) {
        out.extend_from_slice(row.as_bytes());
        out.extend_from_slice(br#","version":"#);
        out.extend_from_slice(version.as_bytes());
        out.extend_from_slice(br#","source":""#);
        out.extend_from_slice(source.as_bytes());
        out.extend_from_slice(b"\"}}\n");
        return;
    }
    let version = match serde_json::from_str::<Entry>(entry) {
        Ok(e) => {
            // A raw value may span lines; an answer is one line.
            let row = e.row.get();
            if row.bytes().any(|b| b == b'\n' || b == b'\r') {
                let value: Value = serde_json::from_str(row).unwrap_or(Value::Null);
                serde_json::to_writer(&mut *out, &value).expect("values serialize");
            } else {
                out.extend_from_slice(row.as_bytes());
            }
            e.version
        }
        Err(_) => {
            out.extend_from_slice(b"null");
            0
        }
    };
    out.extend_from_slice(format!(r#","version":{version},"source":""#).as_bytes());
    out.extend_from_slice(source.as_bytes());
    out.extend_from_slice(b"\"}}\n");
}

/// An error response line, `\n` included.
pub fn encode_error(id: &Id, error: &RpcError) -> Vec<u8> {
    let frame = ErrorFrame {
        jsonrpc: "2.0",
        id,
        error: ErrorBody {
            code: error.kind.code(),
            message: &error.message,
            data: ErrorData {
                kind: error.kind.name(),
            },
        },
    };
    let mut out = serde_json::to_vec(&frame).expect("responses always serialize");
    out.push(b'\n');
    out
}
