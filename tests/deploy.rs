//! The deployment files are checked with the tools operators use on them: the systemd units with
//! `systemd-analyze verify` (no output allowed) against the built binary, and their sandboxing
//! with `systemd-analyze security --offline`.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cacheward");
const UNITS: [&str; 2] = ["cacheward.service", "cacheward-migrate.service"];

/// The units, with ExecStart pointing at the binary under test, in a temp dir.
fn units(dir: &Path) -> Vec<std::path::PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    UNITS
        .iter()
        .map(|unit| {
            let text = std::fs::read_to_string(source.join(unit)).expect("unit file");
            assert!(text.contains("/usr/local/bin/cacheward"), "{unit}");
            let path = dir.join(unit);
            std::fs::write(&path, text.replace("/usr/local/bin/cacheward", BIN)).unwrap();
            path
        })
        .collect()
}

#[test]
fn systemd_units_verify_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units(dir.path()))
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (scripts/install-deps installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_service_is_sandboxed() {
    let dir = tempfile::tempdir().unwrap();
    let service = &units(dir.path())[0];
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(service)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cacheward.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // 0 is fully locked down, 10 is unprotected; systemd calls up to 2.0 "OK".
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
}
