//! The front end's listeners (`resp.socket`, `resp.listen`) and one task per connection, which
//! reads requests, runs the reads a client pipelined as one batch, and answers in order, within
//! the JSON-RPC socket's limits (`socket.*`: request size, in-flight requests and bytes, idle and
//! write timeouts, and `max_connections`, whose permits both front ends share).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::frame::{Reply, Requests};
use super::guard::AuthGuard;
use super::read::{self, ReadKind, Reads};
use super::session::{Action, Session};
use super::tracking::{self, Tracker};
use crate::config::Config;
use crate::rpc::inflight::{Idle, Inflight};
use crate::rpc::peers::{Peers, RateLimited, WARN_EVERY};
use crate::rpc::server::{
    accept_loop, bind_at, drain_connections, flush, write, BindError, BoundSocket, PARSE_SLICE,
    WRITE_BUFFER,
};
use crate::service::Service;
use crate::support::secrets::PasswordFile;

/// The front end's listeners, bound.
pub struct Listeners {
    socket: Option<BoundSocket>,
    tcp: Option<TcpListener>,
}

/// Binds what `resp.socket` and `resp.listen` name (nothing when neither is set).
pub async fn bind(config: &Config) -> Result<Listeners, BindError> {
    let socket = match &config.resp.socket {
        Some(path) => Some(bind_at(path, config.resp.mode.0)?),
        None => None,
    };
    let tcp = match config.resp.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError::Io {
                    path: addr.to_string().into(),
                    source,
                })?,
        ),
        None => None,
    };
    Ok(Listeners { socket, tcp })
}

impl Listeners {
    /// What is listened on, for the `starting` event.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(socket) = &self.socket {
            parts.push(socket.path().display().to_string());
        }
        if let Some(addr) = self.tcp.as_ref().and_then(|t| t.local_addr().ok()) {
            parts.push(addr.to_string());
        }
        parts.join(" ")
    }
}

/// Serves both listeners until `shutdown` fires, then removes the socket file and waits up to
/// `drain` for the open connections.
pub async fn serve(
    listeners: Listeners,
    service: Arc<Service>,
    config: Arc<Config>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    if listeners.socket.is_none() && listeners.tcp.is_none() {
        return;
    }
    let connections = TaskTracker::new();
    let ids = AtomicU64::new(0);
    let password = config
        .resp
        .password_file
        .as_ref()
        .map(|path| PasswordFile::new("resp.password_file", path));
    let tracker = Tracker::new(
        service.cache(),
        config.resp.tracking_max_keys,
        service.stats.clone(),
    );
    let guard = Arc::new(AuthGuard::default());
    let start = |stream: Box<dyn Stream>, addr: String, tcp: bool, permit| {
        let id = ids.fetch_add(1, Relaxed) + 1;
        // Over TCP with a password, clients AUTH, and wrong passwords count per address.
        let guard = match tcp && password.is_some() {
            true => {
                let ip = addr
                    .parse::<std::net::SocketAddr>()
                    .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
                Some((guard.clone(), ip))
            }
            false => None,
        };
        let session = Session::new(id, addr, password.clone(), guard, tracker.clone());
        let (service, config, shutdown) = (service.clone(), config.clone(), shutdown.clone());
        connections.spawn(
            async move {
                service.stats.resp.connections.fetch_add(1, Relaxed);
                if let Err(e) = Connection::new(&config, service.clone(), session, shutdown)
                    .run(stream)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                service.stats.resp.connections.fetch_sub(1, Relaxed);
                drop(permit);
            }
            .instrument(tracing::debug_span!("resp connection", conn = id)),
        );
    };
    let unix = async {
        let Some(socket) = &listeners.socket else {
            return;
        };
        let peers = Peers::new(&config);
        let mut refusals = RateLimited::new(WARN_EVERY);
        accept_loop(
            &permits,
            &shutdown,
            || socket.accept(),
            |stream, permit| {
                if peers.admit(&stream, &mut refusals).is_some() {
                    start(Box::new(stream), "unix".into(), false, permit);
                }
            },
        )
        .await;
        socket.remove_file();
    };
    let tcp = async {
        let Some(listener) = &listeners.tcp else {
            return;
        };
        let accept = || async { listener.accept().await };
        accept_loop(&permits, &shutdown, accept, |(stream, addr), permit| {
            let _ = stream.set_nodelay(true);
            start(Box::new(stream), addr.to_string(), true, permit);
        })
        .await;
    };
    tokio::join!(unix, tcp);
    drain_connections(connections, drain, "resp").await;
}

/// Resolves when a push is owed to the session's inbox, or to its redirected tracking.
async fn owed(session: &Session) {
    let inbox = async {
        match session.inbox() {
            Some(inbox) => inbox.owed().await,
            None => std::future::pending().await,
        }
    };
    let redirected = async {
        match session.redirected() {
            Some((sink, _, _)) => sink.owed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = inbox => {}
        _ = redirected => {}
    }
}

/// A connection's byte stream: a Unix or a TCP socket.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin> Stream for S {}

struct Connection {
    service: Arc<Service>,
    session: Session,
    requests: Requests,
    shutdown: CancellationToken,
    max_inflight: usize,
    max_inflight_bytes: usize,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    inflight: Inflight,
    /// No more requests are read (QUIT, a protocol error, shutdown, the peer's end).
    reading: bool,
    /// Requests read so far (each is answered once: `Inflight::answered` counts the same).
    seen: u64,
}

impl Connection {
    fn new(
        config: &Config,
        service: Arc<Service>,
        session: Session,
        shutdown: CancellationToken,
    ) -> Connection {
        Connection {
            service,
            session,
            requests: Requests::new(config.socket.max_request_bytes),
            shutdown,
            max_inflight: config.socket.max_inflight,
            max_inflight_bytes: config.socket.max_inflight_bytes,
            idle_timeout: config.idle_timeout(),
            write_timeout: config.write_timeout(),
            inflight: Inflight::default(),
            reading: true,
            seen: 0,
        }
    }

    async fn run(mut self, stream: Box<dyn Stream>) -> io::Result<()> {
        let (mut reader, writer) = tokio::io::split(stream);
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
        let write_timeout = self.write_timeout;
        let mut unflushed = false;
        // Only a complete request (or an answer) moves it.
        let mut idle = Idle::new(self.idle_timeout);
        let shutdown = self.shutdown.clone();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut peer_done = false;
        loop {
            if self.reading {
                let mut reads = (Reads::default(), 0);
                let mut parsed = 0;
                while self.reading
                    && self.inflight.requests() + reads.0.items.len() < self.max_inflight
                    && self.inflight.held() < self.max_inflight_bytes
                    && parsed < PARSE_SLICE
                {
                    match self.requests.next_request() {
                        Ok(Some((args, size))) => {
                            parsed += size;
                            self.start(&args, size, &mut reads);
                            self.requests.recycle(args);
                        }
                        Ok(None) => {
                            // The peer's last requests are all answered; an unfinished one is not.
                            if peer_done {
                                self.reading = false;
                            }
                            break;
                        }
                        Err(e) => {
                            self.start_reads(std::mem::take(&mut reads));
                            let mut out = Vec::new();
                            self.session
                                .reply
                                .error(&mut out, &format!("ERR Protocol error: {}", e.0));
                            self.service.stats.resp.errors.fetch_add(1, Relaxed);
                            tracing::debug!(error = %e.0, "protocol error: closing the connection");
                            self.inflight.push_ready(out);
                            self.reading = false;
                        }
                    }
                }
                self.start_reads(reads);
                // Answers made at once are queued by the next push, or here.
                self.inflight.flush_ready();
                if parsed > 0 {
                    idle.touch();
                }
                if parsed >= PARSE_SLICE {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            if !self.reading && self.inflight.is_empty() {
                break;
            }
            let can_read = self.reading
                && !peer_done
                && self.inflight.requests() < self.max_inflight
                && self.inflight.held() + self.requests.buffered() < self.max_inflight_bytes;
            tokio::select! {
                biased;
                _ = &mut cancelled, if self.reading => self.reading = false,
                bytes = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !bytes.is_empty() {
                        write(&mut writer, &bytes, write_timeout).await?;
                        unflushed = true;
                    }
                    let pushes = self.pushes_ready();
                    if !pushes.is_empty() {
                        write(&mut writer, &pushes, write_timeout).await?;
                        unflushed = true;
                    }
                    idle.touch();
                }
                _ = owed(&self.session), if self.session.takes_pushes() => {
                    let pushes = self.pushes_ready();
                    if !pushes.is_empty() {
                        write(&mut writer, &pushes, write_timeout).await?;
                        unflushed = true;
                    }
                }
                read = reader.read_buf(self.requests.spare()), if can_read => {
                    if read? == 0 {
                        peer_done = true;
                    }
                }
                flushed = flush(&mut writer, write_timeout), if unflushed => {
                    flushed?;
                    unflushed = false;
                }
                _ = idle.expired(), if idle.enabled() && self.inflight.is_empty() && self.reading => {
                    tracing::debug!("closing idle connection");
                    self.reading = false;
                }
            }
        }
        flush(&mut writer, write_timeout).await?;
        writer.shutdown().await.ok();
        Ok(())
    }

    /// Runs one request, or adds it to the reads collected so far (`reads`: them and their
    /// request bytes); anything else first starts those, so that answers keep the requests' order.
    fn start(&mut self, args: &[Bytes], size: usize, reads: &mut (Reads, usize)) {
        self.service.stats.resp.requests.fetch_add(1, Relaxed);
        self.seen += 1;
        self.session.saw(self.seen);
        match self.session.handle(&self.service, args) {
            Action::Get { reply } => self.start_get(&args[1], reply, size, reads),
            Action::Many { kind, reply } => self.start_many(kind, &args[1..], reply, size, reads),
            Action::Read {
                kind,
                keys,
                reply,
                tracked,
            } => {
                self.inflight.flush_ready();
                reads.0.push(kind, reply, keys, tracked);
                reads.1 += size;
            }
            Action::Answer(bytes) => self.answer(bytes, reads),
            Action::Close(bytes) => {
                self.start_reads(std::mem::take(reads));
                self.inflight.push_ready(bytes);
                self.reading = false;
            }
        }
    }

    /// A plain `GET` of Redis key `key`: answered now if the near cache holds it and no read is
    /// ahead of it to wait for (its key borrowed from the request, nothing allocated), else added
    /// to the reads collected.
    fn start_get(&mut self, key: &Bytes, reply: Reply, size: usize, reads: &mut (Reads, usize)) {
        let key = match read::resolve_ref(&self.service, key) {
            Ok(key) => key,
            Err(message) => {
                let mut out = Vec::new();
                reply.error(&mut out, &message);
                return self.answer(out, reads);
            }
        };
        let service = &self.service;
        if reads.0.is_empty()
            && self
                .inflight
                .answer_now(|out| read::get_near(service, reply, key, out))
        {
            return;
        }
        self.inflight.flush_ready();
        reads
            .0
            .push(ReadKind::Get, reply, vec![key.to_key()], false);
        reads.1 += size;
    }

    /// A plain `MGET` or `EXISTS` of Redis keys `keys`: answered now if the near cache holds
    /// every one and no read is ahead of it to wait for, else added to the reads collected.
    fn start_many(
        &mut self,
        kind: ReadKind,
        keys: &[Bytes],
        reply: Reply,
        size: usize,
        reads: &mut (Reads, usize),
    ) {
        let service = &self.service;
        if reads.0.is_empty()
            && self
                .inflight
                .answer_now(|out| read::many_near(service, kind, reply, keys, out))
        {
            return;
        }
        match read::resolve_all(service, keys) {
            Ok(keys) => {
                self.inflight.flush_ready();
                reads.0.push(kind, reply, keys, false);
                reads.1 += size;
            }
            Err(message) => {
                let mut out = Vec::new();
                reply.error(&mut out, &message);
                self.answer(out, reads);
            }
        }
    }

    /// Answers `bytes` once the reads collected so far are answered.
    fn answer(&mut self, bytes: Vec<u8>, reads: &mut (Reads, usize)) {
        if bytes.first() == Some(&b'-') {
            self.service.stats.resp.errors.fetch_add(1, Relaxed);
        }
        self.start_reads(std::mem::take(reads));
        self.inflight.push_ready(bytes);
    }

    /// The invalidations owed to this connection that may be written now (after the answers of
    /// every request read before each was heard), encoded; empty when none. Those of a tracking
    /// redirected elsewhere go to the target's inbox at that same point (or, the target gone,
    /// a RESP3 client is told `tracking-redir-broken`, as Redis does).
    fn pushes_ready(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let answered = self.inflight.answered();
        if let Some(inbox) = self.session.inbox() {
            for push in inbox.take_ready(answered) {
                self.session.encode_push(&push, &mut out);
            }
        }
        if let Some((sink, id, to)) = self.session.redirected() {
            let pushes = sink.take_ready(answered);
            match to.upgrade() {
                Some(to) => pushes.into_iter().for_each(|push| to.owe(push)),
                None if !pushes.is_empty() && self.session.reply.resp3() => {
                    tracking::encode_broken_redirect(id, &mut out)
                }
                None => {}
            }
        }
        out
    }

    fn start_reads(&mut self, (mut reads, bytes): (Reads, usize)) {
        if reads.is_empty() {
            return;
        }
        reads.voids = self.session.tracking_sink().cloned();
        let service = self.service.clone();
        let requests = reads.items.len();
        self.inflight.push(
            requests,
            bytes,
            Box::pin(async move { (requests, reads.run(&service).await) }),
        );
    }
}
