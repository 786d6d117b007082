//! Release artefacts carry no dev harness: built without default features (as the container image
//! and the packages are), the binary has no `serve --dev` and none of the installer that runs
//! `apt-get` (the embedded `scripts/install-deps`), and still does everything else.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the binary as release artefacts are built (`--no-default-features`), in a target
/// directory of its own: the tests' own `target/debug/cacheward` must stay the dev build.
fn build_without_dev() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("no-dev-features");
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--locked",
            "--no-default-features",
            "--bin",
            "cacheward",
        ])
        .arg("--target-dir")
        .arg(&target)
        // Nothing here is debugged: less to write, sooner done.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --no-default-features failed");
    target.join("debug").join("cacheward")
}

#[test]
fn a_build_without_the_dev_feature_has_no_dev_harness() {
    let binary = build_without_dev();
    // `serve --dev` is not an option there: clap refuses it before anything starts.
    let out = Command::new(&binary)
        .args(["serve", "--dev"])
        .output()
        .expect("the binary runs");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("unexpected argument '--dev'"), "{said}");
    // The installer script is embedded in dev builds only: its text is not in the binary.
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps"))
            .expect("scripts/install-deps");
    let marker = script
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("the script installs with apt-get")
        .trim();
    let bytes = std::fs::read(&binary).expect("read the binary");
    let has = |text: &str| bytes.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(!has(marker), "the release binary embeds the installer");
    // The dev build does embed it (so the check above can see it when it is there).
    let dev = Path::new(env!("CARGO_BIN_EXE_cacheward"));
    let dev_bytes = std::fs::read(dev).expect("read the dev binary");
    assert!(dev_bytes
        .windows(marker.len())
        .any(|w| w == marker.as_bytes()));
    // Everything else is there: the daemon, migrate, verify and the client commands.
    let help = Command::new(&binary).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for command in [
        "serve", "migrate", "verify", "get", "put", "stats", "health",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    let serve = Command::new(&binary)
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert!(!String::from_utf8_lossy(&serve.stdout).contains("--dev"));
}
