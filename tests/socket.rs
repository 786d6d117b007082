//! Guarantee 8, hostile neighbours on the socket: it is never reachable with wider permissions
//! than configured, not even for an instant and whatever the umask; the directories it creates are
//! private. The tests run as root and use a second, real uid (`nobody`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_exit, Rpc, TestEnv, BIN};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

/// Forks a process that becomes `nobody` and tries to connect to `socket` as fast as it can until
/// killed. It writes `x` to the returned pipe for every connection it got, `.` every 1000 tries.
fn nobody_knocking(socket: &Path) -> (libc::pid_t, std::fs::File) {
    let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    let mut fds = [0; 2];
    // SAFETY: a plain pipe(2) into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes system calls (no allocation, no locks) until it is killed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                libc::_exit(2);
            }
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in path.as_bytes().iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let mut tries: u64 = 0;
            loop {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) == 0 {
                    libc::write(fds[1], b"x".as_ptr().cast(), 1);
                }
                libc::close(fd);
                tries += 1;
                if tries % 1000 == 0 {
                    libc::write(fds[1], b".".as_ptr().cast(), 1);
                }
            }
        }
    }
    // SAFETY: closing our copy of the write end; the read end becomes a File we own.
    unsafe { libc::close(fds[1]) };
    let read = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    (pid, read)
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_never_reaches_the_socket_across_restarts_under_umask_000() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to become another uid");
        return;
    }
    let env = TestEnv::start().await;
    // A directory everyone may enter: only the socket's own mode keeps `nobody` out.
    let base = tempfile::Builder::new()
        .prefix("cacheward-perm-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = base.path().join("cw.sock");
    let (pid, mut pipe) = nobody_knocking(&socket);

    let serve = |socket: &Path| {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .current_dir(env.dir.path())
            .env("DATABASE_URL", &env.db_url)
            .env("REDIS_URL", &env.redis_url)
            .env("CACHEWARD__SOCKET__PATH", socket)
            .env("CACHEWARD__SOCKET__MODE", "0600")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: umask(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    };
    for _ in 0..15 {
        let mut child = serve(&socket);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
                drop(stream);
                let health = Rpc::connect(&socket)
                    .await
                    .call("health", Value::Null)
                    .await;
                if health["result"]["ready"] == json!(true) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "daemon never became ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(mode_of(&socket), 0o600);
        // SAFETY: signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_exit(&mut child, Duration::from_secs(15));
    }

    // A socket directory the daemon creates is private, whatever the umask.
    let nested = base.path().join("made/by/daemon/cw.sock");
    let mut child = serve(&nested);
    common::wait_until("nested socket", Duration::from_secs(15), || async {
        nested.exists()
    })
    .await;
    for dir in ["made", "made/by", "made/by/daemon"] {
        let mode = mode_of(&base.path().join(dir));
        assert_eq!(mode & 0o027, 0, "{dir} is {mode:o}: wider than 0750");
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_exit(&mut child, Duration::from_secs(15));

    // A symlink at the socket path is never followed or replaced.
    let link = base.path().join("link.sock");
    std::os::unix::fs::symlink(base.path().join("elsewhere"), &link).unwrap();
    let mut child = serve(&link);
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert!(!status.success());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!base.path().join("elsewhere").exists());

    // SAFETY: our own forked child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let mut seen = Vec::new();
    std::io::Read::read_to_end(&mut pipe, &mut seen).unwrap();
    let connected = seen.iter().filter(|&&b| b == b'x').count();
    let tries = seen.iter().filter(|&&b| b == b'.').count() * 1000;
    assert!(
        tries >= 10_000,
        "nobody barely tried ({tries} connects): the test proves nothing"
    );
    assert_eq!(
        connected, 0,
        "nobody connected {connected} times in {tries} tries"
    );
}
