//! Who the CDC worker is in the lease table: this daemon's holder id, a random id kept beside its
//! socket (`SOCKET.cdc-id`, in the runtime directory), so that a restarted daemon takes its own
//! lease back at once while two daemons never share one, not even two pods with the same host
//! name and socket path (each has its own runtime directory). The consumer (which cache) is the
//! cache's id in Redis (`Cache::cache_id`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::support::ids::{is_id, random_id};

/// The file that keeps the holder id of the daemon serving `socket`.
pub fn holder_file(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".cdc-id");
    socket.with_file_name(name)
}

/// This daemon's holder id: `HOST/ID`, the id read from [`holder_file`], or made and stored there
/// (if it cannot be stored, it still serves this process).
pub fn holder(socket: &Path) -> String {
    let file = holder_file(socket);
    let id = match std::fs::read_to_string(&file) {
        Ok(text) if is_id(text.trim()) => text.trim().to_owned(),
        _ => {
            let id = random_id();
            if let Err(e) = store(&file, &id) {
                tracing::debug!(file = %file.display(), error = %e, "cdc holder id not kept");
            }
            id
        }
    };
    format!("{}/{id}", hostname())
}

/// Writes `id` to `file` whole (a temporary file renamed over it), mode 0600, in a directory
/// made 0750 if missing (as the socket's).
fn store(file: &Path, id: &str) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    let mut partial = file.as_os_str().to_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    out.write_all(id.as_bytes())?;
    std::fs::rename(&partial, file)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_id_is_kept_beside_the_socket_and_differs_per_socket() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("run/a.sock");
        let first = holder(&a);
        assert_eq!(holder(&a), first, "kept across restarts");
        assert_ne!(holder(&dir.path().join("run/b.sock")), first);
        // Another runtime directory (another pod, same host name and socket path): another id.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(holder(&other.path().join("run/a.sock")), first);
        // A file that holds no id is replaced.
        std::fs::write(holder_file(&a), "garbage").unwrap();
        assert_ne!(holder(&a), first);
    }
}
