//! docs/operations.md cannot drift from the code: every event the source logs at `info` or above
//! is listed there with the same level, and every listed event is still logged.

use std::collections::BTreeMap;
use std::path::Path;

/// (event name, level) of every `tracing::info!` / `warn!` / `error!` in `src/`.
fn logged_events() -> BTreeMap<String, String> {
    let mut events = BTreeMap::new();
    let mut files = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for level in ["info", "warn", "error"] {
            let opener = format!("tracing::{level}!(");
            let mut rest = text.as_str();
            while let Some(at) = rest.find(&opener) {
                let body = &rest[at + opener.len()..];
                // The macro's arguments: up to the parenthesis that closes it (strings skipped).
                let (mut depth, mut in_string, mut escaped, mut end) = (1, false, false, 0);
                for (i, c) in body.char_indices() {
                    match (in_string, c) {
                        (true, '\\') if !escaped => {
                            escaped = true;
                            continue;
                        }
                        (true, '"') if !escaped => in_string = false,
                        (false, '"') => in_string = true,
                        (false, '(') => depth += 1,
                        (false, ')') => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        _ => {}
                    }
                    escaped = false;
                }
                let args = &body[..end];
                // The event's name is its message: the last string literal.
                let close = args.rfind('"').unwrap_or_else(|| {
                    panic!("{}: an event without a message: {args}", path.display())
                });
                let open = args[..close].rfind('"').expect("an opening quote");
                let name = args[open + 1..close].to_owned();
                if let Some(old) = events.insert(name.clone(), level.to_owned()) {
                    assert_eq!(old, level, "{name} is logged at two levels");
                }
                rest = &body[end..];
            }
        }
    }
    events
}

/// (event name, level) of the events table.
fn documented_events() -> BTreeMap<String, String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("` | "))
        .filter_map(|(name, rest)| {
            let level = rest.split(" |").next()?.trim();
            matches!(level, "info" | "warn" | "error").then(|| (name.to_owned(), level.to_owned()))
        })
        .collect()
}

#[test]
fn every_event_logged_at_info_or_above_is_documented_with_its_level() {
    let logged = logged_events();
    let documented = documented_events();
    assert!(logged.len() > 40, "the scan found too little: {logged:?}");
    let mut problems = Vec::new();
    for (name, level) in &logged {
        match documented.get(name) {
            None => problems.push(format!("`{name}` ({level}) is not in docs/operations.md")),
            Some(doc) if doc != level => problems.push(format!(
                "`{name}` is logged at {level}, documented as {doc}"
            )),
            Some(_) => {}
        }
    }
    for name in documented.keys() {
        if !logged.contains_key(name) {
            problems.push(format!("`{name}` is documented but never logged"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
