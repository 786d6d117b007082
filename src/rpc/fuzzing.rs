//! The fuzz targets' bodies (`fuzz/` runs them under libFuzzer; `tests/fuzz_smoke.rs` runs them over
//! the seed corpus in every `cargo test`): the request parser and the line framer, fed arbitrary
//! bytes. Each checks the invariants a hostile client must not break, and panics if one fails.

use crate::model::key::TableId;
use crate::model::registry::declared_fixture;
use crate::rpc::encode::{encode_error, encode_user_into, Id};
use crate::rpc::framing::{Frame, LineBuffer};
use crate::rpc::methods::get::Target;
use crate::rpc::methods::{params::validate_username, Call};
use crate::rpc::protocol::{self, Incoming};

/// One request line, as any client may send it: parsing never panics, the fast path agrees with
/// the general one, a key resolved at once decodes to the key or lookup it was read from, and every answer it leads to (an error, or a
/// result for a parsed call) is one line of valid JSON-RPC.
pub fn request(data: &[u8]) {
    let tables = declared_fixture();
    // The fast path reads a plain get exactly as the general path does, or leaves it to it.
    if let Some(fast) = protocol::parse_plain_get(data, tables) {
        let general = protocol::resolved(protocol::parse_general(data), tables);
        assert_eq!(fast, general, "{:?}", String::from_utf8_lossy(data));
    }
    let Some(incoming) = protocol::parse_line(data, tables) else {
        assert!(
            data.iter().all(u8::is_ascii_whitespace),
            "only a blank line is skipped"
        );
        return;
    };
    let answer = match incoming {
        Incoming::Reject { id, error } => encode_error(&id, &error),
        Incoming::Ignore => return,
        Incoming::Call { id, call } => {
            if let Call::Get {
                target: Target::User(username),
                ..
            }
            | Call::Put { username } = &call
            {
                assert!(validate_username(username).is_ok(), "{username:?}");
            }
            if let Call::Get {
                target: Target::Key(key),
                ..
            } = &call
            {
                match key.table() {
                    TableId::USERS => assert!(validate_username(key.as_str()).is_ok(), "{key:?}"),
                    id => {
                        let table = tables.get(id).expect("a declared table's key");
                        let (lookup, parts) = table.decode(key.as_str()).expect("it decodes");
                        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                        let again = match lookup {
                            Some(l) => crate::model::table::encode_lookup(&l.name, &parts),
                            None => table.key_text(&parts),
                        };
                        assert_eq!(again, key.as_str(), "{key:?} encodes what it decodes to");
                    }
                }
            }
            let id: Id = id.unwrap_or(serde_json::Value::Null);
            let mut out = Vec::new();
            encode_user_into(&mut out, &id, r#"{"id":1}"#, "cache");
            out
        }
    };
    assert_eq!(answer.last(), Some(&b'\n'), "an answer ends its line");
    assert!(
        !answer[..answer.len() - 1].contains(&b'\n'),
        "an answer is one line"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&answer).expect("every answer is JSON");
    assert_eq!(parsed["jsonrpc"], "2.0");
}

/// A byte stream cut into reads of the sizes the first bytes choose, framed with a small
/// `max_request_bytes`: the buffer never holds more than the limit plus one read, every frame
/// is a line without `\n` no longer than the limit or a `TooLong`, and every complete line that
/// fits comes out exactly, in order.
pub fn framer(data: &[u8]) {
    const MAX: usize = 64;
    let (sizes, stream) = data.split_at(data.len().min(4));
    let chunk = |i: usize| 1 + sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7) as usize;
    let mut lines = LineBuffer::new(MAX);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let end = (at + chunk(i)).min(stream.len());
        lines.spare().extend_from_slice(&stream[at..end]);
        at = end;
        i += 1;
        while let Some(frame) = lines.next_frame() {
            frames.push(frame);
        }
        assert!(
            lines.buffered() <= MAX + 256,
            "buffer grew to {}",
            lines.buffered()
        );
    }
    frames.extend(lines.finish());
    // What the frames must be: the stream's lines, those over the limit reported as too long.
    let mut expected = Vec::new();
    let mut pieces: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let last = pieces.pop().unwrap_or_default();
    for line in pieces {
        if line.len() > MAX {
            expected.push(None);
        } else {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            expected.push(Some(line.to_vec()));
        }
    }
    if !last.is_empty() && last.len() <= MAX {
        expected.push(Some(last.to_vec()));
    } else if last.len() > MAX {
        expected.push(None);
    }
    let got: Vec<Option<Vec<u8>>> = frames
        .into_iter()
        .map(|f| match f {
            Frame::Line(line) => {
                assert!(line.len() <= MAX && !line.contains(&b'\n'));
                Some(line.to_vec())
            }
            Frame::TooLong => None,
        })
        .collect();
    assert_eq!(got, expected, "frames of {stream:?}");
}
