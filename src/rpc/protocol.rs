//! JSON-RPC 2.0 as docs/reference.md fixes it: a request line read into its id, method and
//! parameters (members checked, named twice refused), with a fast path for a plain `get`. Each
//! method reads its own parameters (`methods`). No I/O here.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::encode::Id;
use super::error::{ErrorKind, RpcError};
use super::methods::get::Target;
use super::methods::params::type_name;
use super::methods::{self, Call};
use crate::model::registry::Tables;

/// What one request line turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A valid call. `id: None` marks a notification, which is executed but never answered.
    Call { id: Option<Id>, call: Call },
    /// A line that must be answered with an error (`id` is null when none could be read).
    Reject { id: Id, error: RpcError },
    /// A notification that failed: nothing is answered.
    Ignore,
}

/// Parses one request line (without its `\n`). Blank lines are `None`. `tables`: the declared
/// tables, whose keys a plain get's key object is resolved against at once.
pub fn parse_line(line: &[u8], tables: &Tables) -> Option<Incoming> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    if let Some(get) = parse_plain_get(line, tables) {
        return Some(get);
    }
    Some(parse_general(line))
}

/// A request line read by the general path alone (serde_json, every method, the precise errors).
pub fn parse_general(line: &[u8]) -> Incoming {
    let value: Value = match serde_json::from_slice::<Strict>(line) {
        Ok(Strict(v)) => v,
        // Valid JSON, but an object names a member twice: which one is meant is anyone's guess.
        Err(e) if e.is_data() => {
            return Incoming::Reject {
                id: Value::Null,
                error: RpcError::new(ErrorKind::InvalidRequest, format!("invalid request: {e}")),
            }
        }
        Err(e) => {
            return Incoming::Reject {
                id: Value::Null,
                error: RpcError::new(ErrorKind::ParseError, format!("parse error: {e}")),
            }
        }
    };
    parse_request(value)
}

/// `incoming` with a get's target resolved to its key by the resolver `get` runs
/// ([`get::key_of`](super::methods::get::key_of); left as it is when it names none): what the
/// fast path's answer is compared with
/// ([`parse_plain_get`] against [`parse_general`]).
pub fn resolved(incoming: Incoming, tables: &Tables) -> Incoming {
    let Incoming::Call {
        id,
        call: Call::Get {
            target,
            min_version,
        },
    } = incoming
    else {
        return incoming;
    };
    let target = match super::methods::get::key_of(tables, &target) {
        Ok(key) => Target::Key(key),
        Err(_) => target,
    };
    Incoming::Call {
        id,
        call: Call::Get {
            target,
            min_version,
        },
    }
}

/// A JSON value in which no object names a member twice (serde_json alone keeps the last).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if object.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(serde::de::Error::custom(format!(
                    "member \"{shown}\" appears twice"
                )));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A valid plain `get`, read by the fast path ([`super::plain`]); anything else is `None`.
pub fn parse_plain_get(line: &[u8], tables: &Tables) -> Option<Incoming> {
    let (id, target, min_version) = super::plain::parse_plain_get(line, tables)?;
    Some(Incoming::Call {
        id: Some(id),
        call: Call::Get {
            target,
            min_version,
        },
    })
}

fn parse_request(value: Value) -> Incoming {
    let reject = |id: Id, message: String| Incoming::Reject {
        id,
        error: RpcError::new(ErrorKind::InvalidRequest, message),
    };
    let mut object = match value {
        Value::Object(o) => o,
        Value::Array(_) => {
            return reject(
                Value::Null,
                "invalid request: batches are not supported".into(),
            )
        }
        other => {
            return reject(
                Value::Null,
                format!(
                    "invalid request: expected a JSON-RPC request object, got {}",
                    type_name(&other)
                ),
            )
        }
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(other) => {
            return reject(
                Value::Null,
                format!(
                    "invalid request: id must be a string, number or null, got {}",
                    type_name(&other)
                ),
            )
        }
    };
    let answer_id = id.clone().unwrap_or(Value::Null);
    match object.get("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        Some(other) => {
            return reject(
                answer_id,
                format!("invalid request: jsonrpc must be \"2.0\", got {other}"),
            )
        }
        None => {
            return reject(
                answer_id,
                "invalid request: missing \"jsonrpc\": \"2.0\"".into(),
            )
        }
    }
    let method = match object.remove("method") {
        Some(Value::String(m)) => m,
        Some(other) => {
            return reject(
                answer_id,
                format!(
                    "invalid request: method must be a string, got {}",
                    type_name(&other)
                ),
            )
        }
        None => return reject(answer_id, "invalid request: missing method".into()),
    };
    if let Some(extra) = object.keys().find(|k| *k != "jsonrpc" && *k != "params") {
        return reject(
            answer_id,
            format!("invalid request: unexpected member \"{extra}\""),
        );
    }
    match methods::parse(&method, object.remove("params")) {
        Ok(call) => Incoming::Call { id, call },
        Err(_) if id.is_none() => Incoming::Ignore,
        Err(error) => Incoming::Reject {
            id: answer_id,
            error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key::Key;
    use crate::model::registry::declared_fixture as declared;
    use crate::rpc::encode::{encode_error, encode_result, encode_user_into};
    use crate::rpc::methods::get::Target;
    use crate::rpc::methods::params::validate_username;
    use serde::Serialize;
    use serde_json::json;
    use serde_json::value::RawValue;

    /// The result of `get`, as serde would write it: what [`encode_user_into`] writes by hand.
    #[derive(Serialize)]
    struct GetResult<'a> {
        user: &'a RawValue,
        source: &'static str,
    }

    #[test]
    fn a_member_named_twice_is_an_invalid_request() {
        for line in [
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","username":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"get","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"put","method":"delete","params":{"username":"a"}}"#,
        ] {
            match parse_line(line.as_bytes(), declared()) {
                Some(Incoming::Reject { error, .. }) => {
                    assert_eq!(error.kind, ErrorKind::InvalidRequest, "{line}");
                    assert!(error.message.contains("appears twice"), "{}", error.message);
                }
                other => panic!("{line} -> {other:?}"),
            }
        }
        // Not JSON at all stays a parse error; the same member in two objects is fine.
        assert!(matches!(
            parse_line(b"{\"a\":", declared()),
            Some(Incoming::Reject {
                error: RpcError {
                    kind: ErrorKind::ParseError,
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            parse_line(
                br#"{"jsonrpc":"2.0","id":{"x":1},"method":"get","params":{"x":1}}"#,
                declared()
            ),
            Some(Incoming::Reject {
                error: RpcError {
                    kind: ErrorKind::InvalidRequest,
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            parse_line(br#"{"jsonrpc":"2.0","id":7,"method":"rename","params":{"username":"a","new_username":"b"}}"#, declared()),
            Some(Incoming::Call { .. })
        ));
    }

    fn parse(text: &str) -> Incoming {
        parse_line(text.as_bytes(), declared()).expect("not blank")
    }

    fn rejected(text: &str) -> (Id, ErrorKind) {
        match parse(text) {
            Incoming::Reject { id, error } => (id, error.kind),
            other => panic!("{text} was not rejected: {other:?}"),
        }
    }

    #[test]
    fn the_plain_get_path_agrees_with_the_general_one() {
        let lines = [
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a"}}"#,
            r#" {"jsonrpc":"2.0","id":"x","method":"get","params":{"username":"a"}} "#,
            r#"{"params":{"username":"a"},"method":"get","id":-7.5,"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"get","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"2.0","method":"get","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":["a"]}"#,
            r#"["2.0",1,"get",{"username":"a"}]"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a\u0062"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":" a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","x":1}}"#,
            r#"{"jsonrpc":"2.0","id":[1],"method":"get","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"get","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"put","params":{"username":"a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a"},"extra":0}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"eu:1=%","id":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"id":" 7","region":"x"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","lookup":"by_ref","key":{"ref":"{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}"},"min_version":3}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"eu\u003a1","id":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":true,"id":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":1.5}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":1,"note":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","lookup":"by_x","key":{"ref":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"nope","key":{"id":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","lookup":null,"key":{"id":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":[1]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":1},"min_version":-1}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","username":"a","key":{}}}"#,
            // The fast path's own scanner: whitespace anywhere, an id with escapes, numbers at
            // their edges.
            " { \"jsonrpc\" : \"2.0\" ,\t\"id\" : \"a\\\"b\" , \"method\" : \"get\" , \"params\" : { \"table\" : \"orders\" , \"key\" : { \"region\" : \"x\" , \"id\" : 0 } , \"min_version\" : 0 } } ",
            r#"{"jsonrpc":"2.0","id":1E2,"method":"get","params":{"table":"orders","key":{"region":"x","id":-9223372036854775808}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":-0}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":9223372036854775808}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":1e0}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","min_version":null}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","min_version":-0}}"#,
        ];
        let mut plain = 0;
        for line in lines {
            let general = resolved(
                parse_request(serde_json::from_str(line).unwrap()),
                declared(),
            );
            if let Some(fast) = parse_plain_get(line.as_bytes(), declared()) {
                plain += 1;
                assert!(
                    matches!(
                        &fast,
                        Incoming::Call {
                            call: Call::Get {
                                target: Target::Key(_),
                                ..
                            },
                            ..
                        }
                    ),
                    "{line}: {fast:?}"
                );
                assert_eq!(fast, general, "{line}");
            }
            assert_eq!(resolved(parse(line), declared()), general, "{line}");
        }
        assert_eq!(
            plain, 8,
            "three users' gets and five tables' take the plain path"
        );
        // Invalid JSON (a leading zero, a raw control character, trailing bytes) is the
        // general path's to refuse.
        for invalid in [
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"region":"x","id":01}}}"#,
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{\"username\":\"a\u{1}\"}}",
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a"}}}"#,
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a"},}"#,
                r#"{"jsonrpc":"2.0","id":01,"method":"get","params":{"username":"a"}}"#,
        ] {
            assert_eq!(parse_plain_get(invalid.as_bytes(), declared()), None, "{invalid}");
            assert!(matches!(parse(invalid), Incoming::Reject { .. }), "{invalid}");
        }
        // A key naming a column twice is refused by the fast path's own strict reading too.
        for twice in [
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"id":1,"id":2}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"table":"orders","key":{"id":1,"region":"x","id":2}}}"#,
        ] {
            assert_eq!(parse_plain_get(twice.as_bytes(), declared()), None);
            assert!(matches!(parse(twice), Incoming::Reject { .. }));
        }
    }

    #[test]
    fn row_results_are_cut_from_the_entry_or_parsed_alike() {
        use crate::rpc::encode::encode_row_into;
        let answer = |entry: &str| {
            let mut out = Vec::new();
            encode_row_into(&mut out, &json!(7), entry, "cache");
            assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            serde_json::from_slice::<Value>(&out).unwrap()
        };
        let expected = json!({"jsonrpc":"2.0","id":7,"result":{"row":{"a":[1,"x}"]},"version":3,"source":"cache"}});
        for entry in [
            r#"{"version":3,"row":{"a":[1,"x}"]}}"#,
            r#"{ "version": 3, "row": {"a": [1, "x}"]} }"#,
            "{\"row\":{\"a\":[1,\n\"x}\"]},\"version\":3}",
        ] {
            assert_eq!(answer(entry), expected, "{entry}");
        }
        assert_eq!(answer("garbage")["result"]["row"], Value::Null);
    }

    #[test]
    fn user_results_embed_the_stored_json_on_one_line() {
        let user = r#"{"id":1,"username":"a"}"#;
        for id in [json!(1), json!("x\"y"), Value::Null] {
            let mut out = Vec::new();
            encode_user_into(&mut out, &id, user, "cache");
            let raw = RawValue::from_string(user.to_owned()).unwrap();
            let expected = encode_result(
                &id,
                GetResult {
                    user: &raw,
                    source: "cache",
                },
            );
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
        let mut out = Vec::new();
        encode_user_into(&mut out, &json!(2), "{\n  \"id\": 1\r\n}", "db");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"user\":{\"id\":1},\"source\":\"db\"}}\n"
        );
    }

    #[test]
    fn parses_every_method() {
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"user01"}}"#,
                Call::Get {
                    target: Target::Key(Key::user("user01")),
                    min_version: None,
                },
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","min_version":42}}"#,
                Call::Get {
                    target: Target::Key(Key::user("a")),
                    min_version: Some(42),
                },
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"min_version":null,"username":"a"}}"#,
                Call::Get {
                    target: Target::Key(Key::user("a")),
                    min_version: None,
                },
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"put","params":{"username":"a"}}"#,
                Call::Put {
                    username: "a".into(),
                },
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"rename","params":{"username":"a","new_username":"b"}}"#,
                Call::Rename {
                    username: "a".into(),
                    new_username: "b".into(),
                },
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"delete","params":{"username":"a"}}"#,
                Call::Delete {
                    username: "a".into(),
                },
            ),
            (r#"{"jsonrpc":"2.0","id":1,"method":"stats"}"#, Call::Stats),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"health","params":{}}"#,
                Call::Health,
            ),
        ];
        for (text, call) in cases {
            assert_eq!(
                resolved(parse(text), declared()),
                Incoming::Call {
                    id: Some(json!(1)),
                    call
                }
            );
        }
    }

    #[test]
    fn notifications_have_no_id_and_never_fail_loudly() {
        let n = parse(r#"{"jsonrpc":"2.0","method":"get","params":{"username":"a"}}"#);
        assert_eq!(
            n,
            Incoming::Call {
                id: None,
                call: Call::Get {
                    target: Target::User("a".into()),
                    min_version: None,
                }
            }
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","method":"nope"}"#),
            Incoming::Ignore
        );
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","method":"get","params":{"username":""}}"#),
            Incoming::Ignore
        );
    }

    #[test]
    fn null_id_is_a_request_not_a_notification() {
        assert_eq!(
            parse(r#"{"jsonrpc":"2.0","id":null,"method":"stats"}"#),
            Incoming::Call {
                id: Some(Value::Null),
                call: Call::Stats
            }
        );
    }

    #[test]
    fn malformed_lines_get_the_designed_errors() {
        assert_eq!(rejected("{"), (Value::Null, ErrorKind::ParseError));
        assert_eq!(
            rejected("\u{1}\u{2}garbage"),
            (Value::Null, ErrorKind::ParseError)
        );
        assert_eq!(
            parse_line(b"\xff\xfe{", declared()).map(|i| matches!(i, Incoming::Reject { .. })),
            Some(true)
        );
        // A plain get but for one byte that is not UTF-8, in a value or in a member's name.
        for line in [
            &b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{\"username\":\"a\xffb\"}}"[..],
            &b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get\",\"params\":{\"user\xffname\":\"ab\"}}"[..],
        ] {
            assert!(
                matches!(
                    parse_line(line, declared()),
                    Some(Incoming::Reject { error, .. }) if error.kind == ErrorKind::ParseError
                ),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(rejected("[]"), (Value::Null, ErrorKind::InvalidRequest));
        assert_eq!(
            rejected(r#"[{"jsonrpc":"2.0","id":1,"method":"stats"}]"#),
            (Value::Null, ErrorKind::InvalidRequest)
        );
        assert_eq!(rejected("42"), (Value::Null, ErrorKind::InvalidRequest));
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":3}"#),
            (json!(3), ErrorKind::InvalidRequest)
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":3,"method":7}"#),
            (json!(3), ErrorKind::InvalidRequest)
        );
        assert_eq!(
            rejected(r#"{"id":3,"method":"stats"}"#),
            (json!(3), ErrorKind::InvalidRequest)
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":[1],"method":"stats"}"#),
            (Value::Null, ErrorKind::InvalidRequest)
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":"x","method":"fly"}"#),
            (json!("x"), ErrorKind::MethodNotFound)
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":1,"method":"get"}"#).1,
            ErrorKind::InvalidParams
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":1,"method":"get","params":["a"]}"#).1,
            ErrorKind::InvalidParams
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":5}}"#).1,
            ErrorKind::InvalidParams
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":1,"method":"get","params":{"username":"a","x":1}}"#)
                .1,
            ErrorKind::InvalidParams
        );
        assert_eq!(
            rejected(r#"{"jsonrpc":"2.0","id":1,"method":"rename","params":{"username":"a"}}"#).1,
            ErrorKind::InvalidParams
        );
        for bad in ["-1", "1.5", "\"7\"", "true", "9223372036854775808", "[1]"] {
            let line = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"get","params":{{"username":"a","min_version":{bad}}}}}"#
            );
            let Incoming::Reject { error, .. } = parse(&line) else {
                panic!("{line} must be rejected");
            };
            assert_eq!(error.kind, ErrorKind::InvalidParams, "{line}");
            assert!(error.message.contains("min_version"), "{}", error.message);
        }
        assert!(parse_line(b"   \r", declared()).is_none());
    }

    #[test]
    fn usernames_follow_the_rule() {
        assert!(validate_username("user01").is_ok());
        assert!(validate_username(&"é".repeat(64)).is_ok());
        assert!(validate_username("with inner space").is_ok());
        assert!(validate_username("").is_err());
        assert!(validate_username(&"a".repeat(65))
            .unwrap_err()
            .contains("65"));
        assert!(validate_username("a\u{0}b").unwrap_err().contains("U+0000"));
        assert!(validate_username("a\nb").is_err());
        assert!(validate_username(" a").is_err());
        assert!(validate_username("a\u{3000}").is_err());
    }

    #[test]
    fn responses_are_single_lines_with_code_and_kind() {
        let line = encode_error(
            &json!(7),
            &RpcError::new(ErrorKind::NotFound, "user 'x' not found"),
        );
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":7,"error":{"code":-32001,"message":"user 'x' not found","data":{"kind":"not_found"}}})
        );
        let raw = RawValue::from_string(r#"{"id":1,"username":"a"}"#.into()).unwrap();
        let line = encode_result(
            &json!("q"),
            GetResult {
                user: &raw,
                source: "cache",
            },
        );
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":\"q\",\"result\":{\"user\":{\"id\":1,\"username\":\"a\"},\"source\":\"cache\"}}\n"
        );
    }
}
