//! The layout keeps showing the design: every source file opens with the one `//!` line that says
//! its job, no room (a top-level module) imports from a room that imports from it, and within a
//! room no two sibling modules do either.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its module path (`src/cdc/outbox.rs` → `["cdc", "outbox"]`,
/// `src/cdc/mod.rs` → `["cdc"]`, `src/main.rs` → `["main"]`).
fn modules() -> Vec<(Vec<String>, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module
                .last()
                .is_some_and(|last| last == "mod" || last == "lib")
            {
                module.pop();
            }
            found.push((module, path));
        }
    }
    found.sort();
    found
}

/// The module paths `text` (the source of `module`) refers to: `crate::a::b…` and `super::x…`,
/// including the names inside `super::{x, y::z}` and `crate::{a, b}`.
fn references(module: &[String], is_mod_rs: bool, text: &str) -> Vec<Vec<String>> {
    // A `mod.rs` (or lib.rs) is its module; its `super` is the parent. Any other file's `super` is
    // the module that declares it.
    let parent: Vec<String> = match is_mod_rs {
        true => module[..module.len().saturating_sub(1)].to_vec(),
        false => module[..module.len() - 1].to_vec(),
    };
    let mut refs = Vec::new();
    for (anchor, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = text;
        while let Some(at) = rest.find(anchor) {
            let preceded_by_word = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[at + anchor.len()..];
            if preceded_by_word {
                continue;
            }
            let paths: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(0)]
                    .split(',')
                    .map(str::trim)
                    .collect(),
                None => vec![rest],
            };
            for path in paths {
                let segments: Vec<String> = path
                    .split("::")
                    .map(|s| {
                        s.chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect::<String>()
                    })
                    .take_while(|s| !s.is_empty())
                    .collect();
                let mut full = base.clone();
                full.extend(segments);
                refs.push(full);
            }
        }
    }
    refs
}

/// The first cycle in `edges`, if any.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

/// Room → rooms it imports from, and module → sibling modules it imports from (at every depth:
/// `store::redis::pipeline` → `store::redis::routing`, `store::redis` → `store::pg`).
fn import_graphs() -> (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let modules = modules();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|(m, _)| m.clone()).collect();
    let (mut rooms, mut siblings) = (BTreeMap::new(), BTreeMap::new());
    for (module, path) in &modules {
        if module.is_empty() || module[0] == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let is_mod_rs = path.file_stem().is_some_and(|s| s == "mod");
        for reference in references(module, is_mod_rs, &text) {
            // The longest known module the path names (the rest names an item in it).
            let Some(target) = (1..=reference.len())
                .rev()
                .map(|n| reference[..n].to_vec())
                .find(|m| known.contains(m))
            else {
                continue;
            };
            let room = &module[0];
            if target[0] != *room {
                rooms
                    .entry(room.clone())
                    .or_insert_with(BTreeSet::new)
                    .insert(target[0].clone());
                continue;
            }
            // Within a room, at any depth: where the two paths part, the module's ancestor there
            // imports from its sibling (a module importing from its own ancestor or descendant
            // parts nowhere).
            if let Some(at) = (1..module.len().min(target.len())).find(|&i| module[i] != target[i])
            {
                siblings
                    .entry(module[..=at].join("::"))
                    .or_insert_with(BTreeSet::new)
                    .insert(target[..=at].join("::"));
            }
        }
    }
    (rooms, siblings)
}

#[test]
fn every_source_file_says_its_job_first() {
    for (module, path) in modules() {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("//! "),
            "{} ({}) must open with a `//!` line that says its one job",
            path.display(),
            module.join("::")
        );
    }
}

#[test]
fn no_room_imports_from_a_room_that_imports_from_it() {
    let (rooms, _) = import_graphs();
    // The graph was read: the request path's rooms depend on each other downwards.
    for (from, to) in [("rpc", "service"), ("service", "store"), ("cdc", "store")] {
        assert!(
            rooms.get(from).is_some_and(|t| t.contains(to)),
            "{from} → {to} not seen: {rooms:?}"
        );
    }
    if let Some(found) = cycle(&rooms) {
        panic!("rooms import each other: {}", found.join(" → "));
    }
}

#[test]
fn no_module_imports_from_a_sibling_that_imports_from_it() {
    let (_, siblings) = import_graphs();
    assert!(
        siblings
            .get("cdc::apply")
            .is_some_and(|t| t.contains("cdc::outbox")),
        "cdc::apply → cdc::outbox not seen: {siblings:?}"
    );
    assert!(
        siblings
            .get("store::redis::pipeline")
            .is_some_and(|t| t.contains("store::redis::routing")),
        "store::redis::pipeline → store::redis::routing not seen: {siblings:?}"
    );
    if let Some(found) = cycle(&siblings) {
        panic!("sibling modules import each other: {}", found.join(" → "));
    }
}

/// The most lines a source file may have before its tests.
const MAX_FILE_LINES: usize = 600;

#[test]
fn no_source_file_is_longer_than_a_room_should_be() {
    let mut long = Vec::new();
    for (_, path) in modules() {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = text
            .lines()
            .take_while(|line| !line.starts_with("#[cfg(test)]"))
            .count();
        if lines > MAX_FILE_LINES {
            long.push(format!("{} ({lines} lines)", path.display()));
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines before their tests: split them by responsibility: {long:?}"
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]
    .into();
    assert_eq!(cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    let module = vec!["cdc".to_owned(), "apply".to_owned()];
    let text = "use super::{outbox::Batch, Applier};\nuse crate::store::cache::Write;";
    assert_eq!(
        references(&module, false, text),
        [
            vec!["store", "cache", "Write"],
            vec!["cdc", "outbox", "Batch"],
            vec!["cdc", "Applier"],
        ]
        .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
        .to_vec()
    );
}
