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
    if !one_line(user) {
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

/// Whether `json` holds no line break (an answer is one line): asked at every hit, so searched a
/// word at a time, not byte by byte.
fn one_line(json: &str) -> bool {
    memchr::memchr2(b'\n', b'\r', json.as_bytes()).is_none()
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
    (whole && one_line(row)).then_some((version, row))
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
            if !one_line(row) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each answer as one line, `\n` last, and the JSON it says.
    fn answer(encode: impl FnOnce(&mut Vec<u8>)) -> Value {
        let mut out = Vec::new();
        encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        let line = text.strip_suffix('\n').expect("ends its line");
        assert!(!line.contains(['\n', '\r']), "one line: {text:?}");
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn stored_json_spanning_lines_is_answered_on_one_line_and_the_rest_as_stored() {
        let id = Value::from(7);
        // As cacheward stores it: embedded as it is (an escaped line break is no line break).
        let user = r#"{"id":1,"username":"a","bio":"x\ny"}"#;
        let said = answer(|out| encode_user_into(out, &id, user, "cache"));
        assert_eq!(said["result"]["user"]["bio"], "x\ny");
        let entry = r#"{"version":3,"row":{"id":1,"note":"a\r\nb"}}"#;
        let said = answer(|out| encode_row_into(out, &id, entry, "cache"));
        assert_eq!(said["result"]["row"]["note"], "a\r\nb");
        assert_eq!(said["result"]["version"], 3);
        // Another writer's spacing, over lines: rewritten compactly.
        let user = "{\n  \"id\": 1,\r\n  \"username\": \"a\"\n}";
        let said = answer(|out| encode_user_into(out, &id, user, "cache"));
        assert_eq!(said["result"]["user"]["username"], "a");
        let entry = "{\"version\":4,\"row\":{\n\"id\": 2}}";
        let said = answer(|out| encode_row_into(out, &id, entry, "cache"));
        assert_eq!(
            (&said["result"]["row"]["id"], &said["result"]["version"]),
            (&Value::from(2), &Value::from(4))
        );
        let entry = "{\"version\":5,\r\"row\":{\"id\": 3}}";
        let said = answer(|out| encode_row_into(out, &id, entry, "cache"));
        assert_eq!(said["result"]["row"]["id"], 3);
    }
}
