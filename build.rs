//! Tells the tests whether they are built as root (`cfg(as_root)`): the tests that must become
//! another user are then run, and otherwise listed as ignored with the reason, never passed
//! without running.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(as_root)");
    println!("cargo::rerun-if-changed=build.rs");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            // Real, effective, saved, filesystem: the effective one decides.
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false);
    if root {
        println!("cargo::rustc-cfg=as_root");
    }
}
