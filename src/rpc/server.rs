//! The Unix socket: binding (never stealing a live daemon's socket), the accept loop with its
//! connection limit, and one task per connection that frames lines, runs pipelined requests
//! concurrently within its limits and answers them in order.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::rpc::encode::{encode_error, Id};
use crate::rpc::error::{ErrorKind, RpcError};
use crate::rpc::framing::{Frame, LineBuffer};
use crate::rpc::inflight::{Idle, Inflight};
use crate::rpc::methods::{self, get, Call};
use crate::rpc::peers::{Peers, RateLimited, WARN_EVERY};
use crate::rpc::protocol::{self, Incoming};
use crate::service::Service;
use crate::support::time::Backoff;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process answers on the path: a live daemon, whose socket is never taken over.
    #[error("another cacheward is already listening on {0}")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path; it is left alone.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot set up socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A listening socket and the identity of the file it created, so that shutdown removes that file
/// and not one a successor may have put at the same path.
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl BoundSocket {
    /// The next connection.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn remove_file(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove socket file");
                }
            }
            _ => {}
        }
    }
}

/// Binds the socket at `config.socket.path` with `config.socket.mode`. A socket file left by a
/// crashed daemon (nobody answers on it) is replaced; a live one is an error.
pub fn bind(config: &Config) -> Result<BoundSocket, BindError> {
    bind_at(&config.socket.path, config.socket.mode.0)
}

/// [`bind`] at `path` with `mode`.
pub fn bind_at(path: &Path, mode: u32) -> Result<BoundSocket, BindError> {
    let path = path.to_owned();
    let io_err = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Directories it creates are 0750 (the umask may only tighten that); existing ones are left
    // as they are.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(parent)
        .map_err(io_err)?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(BindError::NotASocket(path)),
        Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => return Err(BindError::InUse(path)),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::NotFound =>
            {
                tracing::info!(path = %path.display(), "replacing stale socket file");
                std::fs::remove_file(&path)
                    .or_else(|e| match e.kind() {
                        io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    })
                    .map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = bind_private(parent, &path, mode).map_err(io_err)?;
    let meta = std::fs::symlink_metadata(&path).map_err(io_err)?;
    Ok(BoundSocket {
        listener,
        path,
        inode: (meta.dev(), meta.ino()),
    })
}

/// Binds the socket where nobody else can reach it, gives it `mode`, and only then moves it to
/// `path`: never, not for an instant, is it reachable with wider permissions than configured,
/// whatever the process umask. The private directory (0700, in `parent`, so the move is a rename
/// on one file system) is removed again. The move never replaces a file that appeared at `path`
/// meanwhile.
fn bind_private(parent: &Path, path: &Path, mode: u32) -> io::Result<UnixListener> {
    let private = tempfile::Builder::new()
        .prefix(".cacheward-bind-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    rename_no_replace(&staged, path)?;
    Ok(listener)
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to` (Linux `renameat2` with
/// `RENAME_NOREPLACE`; a plain rename where the file system does not support it).
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => std::fs::rename(from, to),
        _ => Err(e),
    }
}

/// Serves connections until `shutdown` fires, then stops accepting, removes the socket file and
/// waits up to `drain` for the open connections to finish their in-flight requests. A connection
/// holds one of `permits` (`socket.max_connections`, shared with the RESP front end).
pub async fn serve(
    socket: BoundSocket,
    service: Arc<Service>,
    config: Arc<Config>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let connections = TaskTracker::new();
    let mut next_id: u64 = 0;
    let peers = Peers::new(&config);
    let mut refusals = RateLimited::new(WARN_EVERY);
    let accept = || socket.accept();
    accept_loop(&permits, &shutdown, accept, |stream, permit| {
        let Some(may_write) = peers.admit(&stream, &mut refusals) else {
            return;
        };
        next_id += 1;
        let span = tracing::debug_span!("connection", conn = next_id);
        let (service, config, shutdown) = (service.clone(), config.clone(), shutdown.clone());
        connections.spawn(
            async move {
                service.stats.connections.fetch_add(1, Relaxed);
                if let Err(e) = Connection::new(&config, service.clone(), shutdown, may_write)
                    .run(stream)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                service.stats.connections.fetch_sub(1, Relaxed);
                drop(permit);
            }
            .instrument(span),
        );
    })
    .await;
    socket.remove_file();
    drop(socket);
    crate::support::systemd::stopping(&format!(
        "stopping: draining {} connections",
        connections.len()
    ));
    drain_connections(connections, drain, "socket").await;
}

/// Accepts connections until `shutdown` fires, each once it holds a permit of `permits` (at the
/// limit, new clients wait in the listen queue), and hands it to `handle` with its permit, which
/// it must hold as long as the connection lives. An accept that fails (EMFILE and friends) is said
/// once in a while, not once per failure, and retried after a wait that grows while it lasts.
pub async fn accept_loop<S, F, Fut>(
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    mut accept: F,
    mut handle: impl FnMut(S, OwnedSemaphorePermit),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let mut accept_failures = RateLimited::new(WARN_EVERY);
    let mut accept_retry = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = accept() => match accepted {
                Ok(stream) => {
                    accept_retry.reset();
                    stream
                }
                Err(e) => {
                    accept_failures.say(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    });
                    if !accept_retry.wait(shutdown).await {
                        break;
                    }
                    continue;
                }
            },
        };
        handle(stream, permit);
    }
}

/// Waits up to `drain` for `connections` to finish their in-flight requests (`what`: which
/// listener's, as the events say).
pub async fn drain_connections(connections: TaskTracker, drain: Duration, what: &'static str) {
    connections.close();
    let open = connections.len();
    tracing::info!(
        connections = open,
        listener = what,
        "stopped accepting; draining connections"
    );
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            listener = what,
            "drain timed out; closing remaining connections"
        );
    }
}

/// Request bytes a connection parses before it lets the other tasks run.
pub const PARSE_SLICE: usize = 64 * 1024;
/// Answer bytes buffered per connection before they are written.
pub const WRITE_BUFFER: usize = 16 * 1024;

/// Gets read together, answered together: (id, username, min_version), `None` id for a
/// notification, and the request bytes they hold.
#[derive(Default)]
struct Gets {
    items: Vec<get::GetItem>,
    bytes: usize,
}

/// One client connection.
struct Connection {
    lines: LineBuffer,
    service: Arc<Service>,
    shutdown: CancellationToken,
    max_inflight: usize,
    max_request_bytes: usize,
    /// Request bytes read but not yet answered, past which the connection is not read.
    max_inflight_bytes: usize,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    /// Whether the peer may call `put`, `rename` and `delete`.
    may_write: bool,
    /// Requests running, answered in arrival order.
    inflight: Inflight,
}

/// Why a connection was closed by the daemon.
pub fn stalled(what: &str, after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} for {after:?}: closing the connection"),
    )
}

/// Writes an answer; a client that does not read it within `socket.write_timeout_secs` loses its
/// connection (and its slot).
pub async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    tokio::time::timeout(timeout, writer.write_all(bytes))
        .await
        .map_err(|_| stalled("answers could not be written", timeout))?
}

pub async fn flush<W: AsyncWrite + Unpin>(writer: &mut W, timeout: Duration) -> io::Result<()> {
    tokio::time::timeout(timeout, writer.flush())
        .await
        .map_err(|_| stalled("answers could not be written", timeout))?
}

impl Connection {
    fn new(
        config: &Config,
        service: Arc<Service>,
        shutdown: CancellationToken,
        may_write: bool,
    ) -> Self {
        Connection {
            lines: LineBuffer::new(config.socket.max_request_bytes),
            service,
            shutdown,
            max_inflight: config.socket.max_inflight,
            max_request_bytes: config.socket.max_request_bytes,
            max_inflight_bytes: config.socket.max_inflight_bytes,
            idle_timeout: config.idle_timeout(),
            write_timeout: config.write_timeout(),
            may_write,
            inflight: Inflight::default(),
        }
    }

    async fn run(mut self, stream: UnixStream) -> io::Result<()> {
        let (mut reader, writer) = stream.into_split();
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
        let write_timeout = self.write_timeout;
        let mut reading = true;
        let mut unflushed = false;
        // Only a complete request line (or an answer) moves it: a trickle of bytes that never
        // ends a line does not keep the connection.
        let mut idle = Idle::new(self.idle_timeout);
        let shutdown = self.shutdown.clone();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            // Start every buffered request the in-flight limits allow, a slice at a time.
            if reading {
                let mut gets = Gets::default();
                let mut started = false;
                let mut parsed = 0;
                while self.inflight.requests() + gets.items.len() < self.max_inflight
                    && self.inflight.held() < self.max_inflight_bytes
                    && parsed < PARSE_SLICE
                {
                    match self.lines.next_frame() {
                        Some(frame) => {
                            started = true;
                            parsed += match &frame {
                                Frame::Line(line) => line.len() + 1,
                                Frame::TooLong => self.max_request_bytes,
                            };
                            self.start(frame, &mut gets)
                        }
                        None => break,
                    }
                }
                self.start_gets(gets);
                if started {
                    idle.touch();
                }
                if parsed >= PARSE_SLICE {
                    // Parsing costs CPU that no I/O accounts for: let every other task (the Redis
                    // connection's answers first of all) run before the next slice, so that a
                    // flood of large requests on some connections cannot starve the others.
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            if !reading && self.inflight.is_empty() {
                break;
            }
            let can_read = reading
                && self.inflight.requests() < self.max_inflight
                && self.inflight.held() + self.lines.buffered() < self.max_inflight_bytes;
            tokio::select! {
                biased;
                _ = &mut cancelled, if reading => {
                    // Finish what is in flight, read nothing more.
                    reading = false;
                }
                bytes = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !bytes.is_empty() {
                        write(&mut writer, &bytes, write_timeout).await?;
                        unflushed = true;
                    }
                    // Idle counts from the last answer too, not only the last request.
                    idle.touch();
                }
                read = reader.read_buf(self.lines.spare()), if can_read => {
                    match read {
                        Ok(0) => {
                            reading = false;
                            if let Some(frame) = self.lines.finish() {
                                let mut gets = Gets::default();
                                self.start(frame, &mut gets);
                                self.start_gets(gets);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Lowest priority: flush once nothing else is ready, so pipelined answers leave in
                // one write.
                flushed = flush(&mut writer, write_timeout), if unflushed => {
                    flushed?;
                    unflushed = false;
                }
                _ = idle.expired(), if idle.enabled() && self.inflight.is_empty() && reading => {
                    tracing::debug!("closing idle connection");
                    reading = false;
                }
            }
        }
        flush(&mut writer, write_timeout).await?;
        writer.shutdown().await.ok();
        Ok(())
    }

    /// Turns one frame into a pending answer, queued behind the earlier ones. Gets are collected
    /// in `gets` instead, to be read from Redis together; anything else first starts them, so
    /// that answers keep the order of the requests.
    fn start(&mut self, frame: Frame, gets: &mut Gets) {
        let line = match frame {
            Frame::Line(line) => line,
            Frame::TooLong => {
                let error = RpcError::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "invalid request: line longer than socket.max_request_bytes ({} bytes); discarded",
                        self.max_request_bytes
                    ),
                );
                self.service.stats.requests.fetch_add(1, Relaxed);
                self.service.stats.errors.fetch_add(1, Relaxed);
                self.start_gets(std::mem::take(gets));
                self.inflight.push_ready(encode_error(&Id::Null, &error));
                return;
            }
        };
        let Some(incoming) = protocol::parse_line(&line, &self.service.tables) else {
            return;
        };
        let size = line.len() + 1;
        let stats = &self.service.stats;
        stats.requests.fetch_add(1, Relaxed);
        match incoming {
            Incoming::Reject { id, error } => {
                stats.errors.fetch_add(1, Relaxed);
                tracing::debug!(kind = error.kind.name(), message = %error.message, "request rejected");
                self.start_gets(std::mem::take(gets));
                self.inflight.push_ready(encode_error(&id, &error));
            }
            Incoming::Ignore => {
                stats.errors.fetch_add(1, Relaxed);
            }
            // A get the near cache answers, with no get ahead of it to wait for: answered now,
            // with the others answered so.
            Incoming::Call {
                id: Some(id),
                call:
                    Call::Get {
                        target: get::Target::Key(key),
                        min_version: None,
                    },
            } if gets.items.is_empty()
                && self
                    .inflight
                    .answer_now(|out| get::near(&self.service, &id, &key, out)) => {}
            Incoming::Call {
                id,
                call:
                    Call::Get {
                        target,
                        min_version,
                    },
            } => {
                self.inflight.flush_ready();
                gets.items.push((id, target, min_version));
                gets.bytes += size;
            }
            Incoming::Call { id, call } if call.writes() && !self.may_write => {
                let error = RpcError::new(
                    ErrorKind::Forbidden,
                    format!("forbidden: this peer may not {}", call.method()),
                );
                methods::failed(&self.service, call.method(), &error);
                self.start_gets(std::mem::take(gets));
                if let Some(id) = id {
                    self.inflight.push_ready(encode_error(&id, &error));
                }
            }
            Incoming::Call { id, call } => {
                self.start_gets(std::mem::take(gets));
                let service = self.service.clone();
                self.inflight.push(
                    1,
                    size,
                    Box::pin(async move { (1, methods::run(&service, id, call).await) }),
                );
            }
        }
    }

    /// Starts the gets collected so far as one batch: one Redis read, one answer write.
    fn start_gets(&mut self, gets: Gets) {
        // Answers made at once go first: they answer requests read before any of `gets`.
        self.inflight.flush_ready();
        if gets.items.is_empty() {
            return;
        }
        let service = self.service.clone();
        let (requests, bytes) = (gets.items.len(), gets.bytes);
        self.inflight.push(
            requests,
            bytes,
            Box::pin(async move { (requests, get::batch(&service, gets.items).await) }),
        );
    }
}
