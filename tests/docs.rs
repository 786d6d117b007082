//! The documentation cannot drift from the code: every event the source logs at `info` or above
//! is listed in docs/operations.md with the same level, and every listed event is still logged;
//! every configuration key is in docs/reference.md's table, and the table names no other; nothing
//! in the repository sends its reader to a file outside it.

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

/// Every `section.key` the configuration has, read off the defaults as the loader reads them.
fn configuration_keys() -> std::collections::BTreeSet<String> {
    let defaults = serde_json::to_value(cacheward::config::Config::default()).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for (section, values) in defaults.as_object().unwrap() {
        for key in values.as_object().unwrap().keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

/// The `section.key` names in the first column of docs/reference.md's configuration table
/// (a row may name two: `` `socket.allow_uids`, `socket.allow_gids` ``).
fn documented_keys() -> std::collections::BTreeSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md"))
            .unwrap();
    let table = doc
        .split("| key | default | meaning |")
        .nth(1)
        .expect("docs/reference.md has the configuration table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|row| {
            let first = row.split('|').nth(1).unwrap_or_default();
            first
                .split(',')
                .map(|k| k.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_configuration_key_is_in_the_reference_and_no_other() {
    let keys = configuration_keys();
    let documented = documented_keys();
    assert!(keys.len() > 30, "the defaults gave too little: {keys:?}");
    let missing: Vec<_> = keys.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&keys).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "not in docs/reference.md: {missing:?}; documented but not a key: {stale:?}"
    );
}

#[test]
fn nothing_points_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut paths = vec![root.to_path_buf()];
    while let Some(path) = paths.pop() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "fuzz") || path == root {
                paths.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // This file names what it looks for.
        if path.ends_with("tests/docs.rs") {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if line.contains("../shared") || line.contains("DESIGN.md") || line.contains("DESIGN ")
            {
                found.push(format!("{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn every_file_the_documentation_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    for doc in [
        "README.md",
        "docs/reference.md",
        "docs/operations.md",
        "deploy/README.md",
    ] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for word in text.split(|c: char| c.is_whitespace() || "`()[]<>'\",;".contains(c)) {
            let word = word.split('#').next().unwrap_or(word);
            let word = word.trim_end_matches([':', '.']);
            let named = ["src/", "sql/", "tests/", "benches/", "docs/", "scripts/"]
                .iter()
                .any(|dir| word.starts_with(dir))
                && word.rsplit('/').next().is_some_and(|f| f.contains('.'));
            if named && !word.contains(['*', '{']) && !root.join(word).exists() {
                missing.push(format!("{doc}: {word}"));
            }
        }
    }
    assert!(missing.is_empty(), "named but missing: {missing:?}");
}
