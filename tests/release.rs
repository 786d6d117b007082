//! Release artefacts carry no dev harness: built without default features (as the container image
//! and the packages are), the binary has no `serve --dev` and none of the installer that runs
//! `apt-get` (the embedded `scripts/install-deps`), and still does everything else. The Debian
//! package made of that build installs, works, upgrades, and goes away as Debian packages do.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use cacheward::dev::install::{self, Tool};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The target directory of the release-like builds: the tests' own `target/debug/cacheward` must
/// stay the dev build.
fn target_dir() -> PathBuf {
    Path::new(ROOT).join("target").join("no-dev-features")
}

/// Builds the binary as release artefacts are built (`--no-default-features`), once per test
/// binary, with the `artefact-test` profile (unoptimized: the tests check what it carries, not
/// how fast it runs).
fn build_without_dev() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .current_dir(ROOT)
            .args([
                "build",
                "--locked",
                "--no-default-features",
                "--profile",
                "artefact-test",
                "--bin",
                "cacheward",
            ])
            .arg("--target-dir")
            .arg(target_dir())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --no-default-features failed");
        target_dir().join("artefact-test").join("cacheward")
    })
}

#[test]
fn a_build_without_the_dev_feature_has_no_dev_harness() {
    let binary = build_without_dev();
    // `serve --dev` is not an option there: clap refuses it before anything starts.
    let out = Command::new(binary)
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
    let bytes = std::fs::read(binary).expect("read the binary");
    let has = |text: &str| bytes.windows(text.len()).any(|w| w == text.as_bytes());
    assert!(!has(marker), "the release binary embeds the installer");
    // The dev build does embed it (so the check above can see it when it is there).
    let dev = Path::new(env!("CARGO_BIN_EXE_cacheward"));
    let dev_bytes = std::fs::read(dev).expect("read the dev binary");
    assert!(dev_bytes
        .windows(marker.len())
        .any(|w| w == marker.as_bytes()));
    // Everything else is there: the daemon, migrate, verify and the client commands.
    let help = Command::new(binary).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for command in [
        "serve", "migrate", "verify", "get", "put", "stats", "health",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    let serve = Command::new(binary)
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert!(!String::from_utf8_lossy(&serve.stdout).contains("--dev"));
}

/// Runs `program` as root: directly when the tests run as root, else through sudo.
fn as_root(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Command::new(program);
    }
    let mut sudo = Command::new("sudo");
    sudo.arg("-n").arg(program);
    sudo
}

/// Runs `command`, stdin closed (a prompt fails instead of waiting), and returns what it printed,
/// after asserting it succeeded.
fn run(what: &str, command: &mut Command) -> String {
    let out = command.stdin(Stdio::null()).output().expect(what);
    let said = said(&out);
    assert!(out.status.success(), "{what}: {}\n{said}", out.status);
    said
}

/// Everything a tool printed, stdout then stderr.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dpkg's state of the package: `installed`, `config-files`, or `not-installed`.
fn dpkg_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "cacheward"])
        .output()
        .expect("dpkg-query");
    match out.status.success() {
        true => String::from_utf8_lossy(&out.stdout).into_owned(),
        // Purged: dpkg no longer knows the package.
        false => "not-installed".into(),
    }
}

/// Purges the package when the test ends, whatever happened: the machine keeps no trace of it.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = as_root("dpkg")
            .args(["--purge", "cacheward"])
            .stdin(Stdio::null())
            .output();
    }
}

const TOML: &str = "/etc/cacheward/cacheward.toml";
const ENV: &str = "/etc/cacheward/env";
const UNITS: [&str; 2] = [
    "/usr/lib/systemd/system/cacheward.service",
    "/usr/lib/systemd/system/cacheward-migrate.service",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debian_package_is_lintian_clean_installs_works_and_purges() {
    build_without_dev();
    for tool in [Tool::CargoDeb, Tool::Lintian, Tool::SystemdAnalyze] {
        install::ensure(tool).expect("packaging tools");
    }
    // The package of the build above (Cargo.toml's [package.metadata.deb]).
    let out = tempfile::tempdir().unwrap();
    run(
        "cargo deb",
        Command::new(install::cargo_deb())
            .current_dir(ROOT)
            .env("CARGO_TARGET_DIR", target_dir())
            .args(["deb", "--no-build", "--profile", "artefact-test", "--fast"])
            .arg("--output")
            .arg(out.path()),
    );
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb made a .deb");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("cacheward_{}-1_", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );
    let changelog = std::fs::read_to_string(Path::new(ROOT).join("deploy/debian/changelog"))
        .expect("deploy/debian/changelog");
    assert!(
        changelog.starts_with(&format!("cacheward ({}-1) ", env!("CARGO_PKG_VERSION"))),
        "the changelog's first entry is not this version's"
    );

    // The maintainer scripts start nothing and enable nothing: an upgrade restarts what runs
    // (try-restart), removal stops it.
    let control = out.path().join("control");
    run(
        "dpkg-deb -e",
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("a postinst");
    let invoked: Vec<&str> = postinst
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("deb-systemd-invoke") || l.starts_with("systemctl"))
        .collect();
    assert_eq!(
        invoked,
        [
            "systemctl --system daemon-reload >/dev/null || true",
            "deb-systemd-invoke try-restart cacheward-migrate.service cacheward.service >/dev/null || true"
        ],
        "{postinst}"
    );
    assert!(
        postinst.contains("if deb-systemd-helper --quiet was-enabled cacheward.service; then"),
        "enabling is only ever restoring what the operator enabled:\n{postinst}"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).expect("a prerm");
    assert!(
        prerm.contains("deb-systemd-invoke stop cacheward-migrate.service cacheward.service"),
        "{prerm}"
    );

    // lintian: no error, no warning; an override that no longer matches anything is one too.
    let lint = Command::new("lintian")
        .args(["--info", "--display-level", ">=info"])
        .arg(&deb)
        .output()
        .expect("lintian");
    let findings = said(&lint);
    let bad: Vec<&str> = findings
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: ") || l.contains("unused-override"))
        .collect();
    assert!(lint.status.success() && bad.is_empty(), "{findings}");

    // The test installs and purges its own package: it must not take an operator's with it.
    assert_eq!(
        dpkg_status(),
        "not-installed",
        "cacheward is installed on this machine (or its configuration is left): the package test \
         would replace and purge it; run `dpkg --purge cacheward` first, or test elsewhere"
    );
    assert!(
        !Path::new("/etc/cacheward").exists(),
        "/etc/cacheward exists on this machine: the package test would purge it; move it away first"
    );
    // Installed with dpkg: the binary, the units, the user and group, the conffiles; nothing
    // enabled or started.
    let _purge = Installed;
    run("dpkg -i", as_root("dpkg").arg("-i").arg(&deb));
    assert_eq!(dpkg_status(), "installed");
    let conffiles = run(
        "dpkg-query",
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "cacheward"]),
    );
    for file in [TOML, ENV] {
        assert!(
            conffiles.contains(file),
            "{file} is no conffile:\n{conffiles}"
        );
    }
    let mode = |path: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(ENV), 0o600, "the env file holds passwords");
    for entry in ["passwd", "group"] {
        run(
            &format!("the cacheward {entry} entry"),
            Command::new("getent").args([entry, "cacheward"]),
        );
    }
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/cacheward.service").exists(),
        "installing enabled the service"
    );
    assert!(Path::new("/usr/share/man/man1/cacheward.1.gz").is_file());
    let version = run(
        "cacheward --version",
        Command::new("/usr/bin/cacheward").arg("--version"),
    );
    assert_eq!(
        version.trim(),
        format!("cacheward {}", env!("CARGO_PKG_VERSION"))
    );

    // The installed units, as installed: they verify without a word, and their sandboxing rates
    // as well as today (1.2).
    let verify = run(
        "systemd-analyze verify",
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(UNITS),
    );
    assert!(verify.trim().is_empty(), "{verify}");
    for unit in UNITS {
        let text = run(
            "systemd-analyze security",
            Command::new("systemd-analyze").args(["security", "--offline=true", unit]),
        );
        let exposure: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {text}"));
        assert!(exposure <= 1.2, "{unit}: exposure {exposure}:\n{text}");
    }

    // The installed binary with the installed configuration: `check --connect` finds nothing
    // wrong, `serve` serves, its client commands reach it, SIGTERM stops it cleanly.
    let env = common::TestEnv::start().await;
    let backends = [
        ("DATABASE_URL", env.db_url.as_str()),
        ("REDIS_URL", env.redis_url.as_str()),
    ];
    let checked = run(
        "cacheward check --connect",
        Command::new("/usr/bin/cacheward")
            .args(["check", "--connect", "--config", TOML])
            .envs(backends),
    );
    assert!(checked.contains("config: ok"), "{checked}");
    assert!(!checked.contains("problem:"), "{checked}");
    let socket = env.dir.path().join("installed.sock");
    let log = env.dir.path().join("installed.log");
    let mut daemon = Command::new("/usr/bin/cacheward")
        .args(["serve", "--config", TOML, "--socket"])
        .arg(&socket)
        .envs(backends)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("/usr/bin/cacheward serve");
    common::ready_at(&socket).await;
    let client = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("/usr/bin/cacheward")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("the installed client");
        assert!(out.status.success(), "{args:?}: {}", said(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    assert_eq!(client(&["put", "alice"])["created"], true);
    assert_eq!(client(&["get", "alice"])["user"]["username"], "alice");
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = common::wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(
        status.success(),
        "{status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Reinstalling (an upgrade to the same version) keeps an edited conffile without asking.
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(TOML).unwrap()
    );
    std::fs::write(TOML, &edited).unwrap();
    run("dpkg -i again", as_root("dpkg").arg("-i").arg(&deb));
    assert_eq!(std::fs::read_to_string(TOML).unwrap(), edited);

    // --remove takes the program and keeps the configuration; --purge takes that too.
    run(
        "dpkg --remove",
        as_root("dpkg").args(["--remove", "cacheward"]),
    );
    assert_eq!(dpkg_status(), "config-files");
    assert!(!Path::new("/usr/bin/cacheward").exists());
    for unit in UNITS {
        assert!(!Path::new(unit).exists(), "{unit} outlived --remove");
    }
    assert_eq!(std::fs::read_to_string(TOML).unwrap(), edited);
    assert!(Path::new(ENV).exists());
    run(
        "dpkg --purge",
        as_root("dpkg").args(["--purge", "cacheward"]),
    );
    assert_eq!(dpkg_status(), "not-installed");
    for gone in [TOML, ENV, "/etc/cacheward"] {
        assert!(!Path::new(gone).exists(), "{gone} outlived --purge");
    }
}
