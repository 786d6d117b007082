//! Connections whose answers are bounded in size: the sentinels'. A sentinel is asked for two
//! words and tells of a failover in one line, but the driver buffers whatever a server sends, so a
//! hostile or broken sentinel could make the daemon hold any amount (a 50 MB answer cost 143 MB).
//! Here the daemon makes the connection itself (TCP, TLS or a Unix socket, as the URL says) and
//! the driver reads it through [`Bounded`]: past [`ANSWER_LIMIT`] bytes since the last request
//! (and, on a subscription, past what [`REFILL_PER_SEC`] allows), the read fails and the
//! connection is dropped, naming the bound.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{ConnectionAddr, ConnectionInfo, RedisResult};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Config;
use crate::support::tls::{PgTls, Roots, SslMode};

/// The most a sentinel may send in answer to one request (or at once on a subscription).
pub const ANSWER_LIMIT: usize = 64 * 1024;
/// What a subscription may receive per second once [`ANSWER_LIMIT`] is spent: a failover is one
/// line of some 60 bytes.
pub const REFILL_PER_SEC: usize = 4 * 1024;

/// A stream whose reads are bounded: at most [`ANSWER_LIMIT`] bytes after each write, refilled at
/// [`REFILL_PER_SEC`] while nothing is written.
pub struct Bounded<S> {
    inner: S,
    /// Bytes that may still be read.
    allowed: usize,
    refilled: Instant,
}

impl<S> Bounded<S> {
    pub fn new(inner: S) -> Bounded<S> {
        Bounded {
            inner,
            allowed: ANSWER_LIMIT,
            refilled: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * REFILL_PER_SEC as f64;
        if earned >= 1.0 {
            self.allowed = (self.allowed + earned as usize).min(ANSWER_LIMIT);
            self.refilled = now;
        }
    }
}

fn past_limit() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the sentinel sent more than {ANSWER_LIMIT} bytes at once: connection dropped"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.refill();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                match this.allowed.checked_sub(read) {
                    Some(left) => {
                        this.allowed = left;
                        Poll::Ready(Ok(()))
                    }
                    None => Poll::Ready(Err(past_limit())),
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            // A request: its answer may take the whole bound again.
            this.allowed = ANSWER_LIMIT;
            this.refilled = Instant::now();
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A byte stream to a server, whichever transport the URL names.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the server `info` names, as the driver would: TLS with `redis.tls_*` (the roots of
/// `redis.tls_ca_file`, else the system's; the host name checked unless the URL says
/// `#insecure`), and `redis.tls_cert_file` / `redis.tls_key_file` as the client's certificate.
async fn connect(config: &Config, info: &ConnectionInfo) -> RedisResult<Box<dyn Io>> {
    Ok(match info.addr() {
        ConnectionAddr::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
        ConnectionAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            ..
        } => {
            let tls = tls_config(config, *insecure).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "tls", e))
            })?;
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "tls host name",
                    e.to_string(),
                ))
            })?;
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
            Box::new(connector.connect(name, stream).await?)
        }
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "an address of a kind not supported",
                format!("{other:?}"),
            )))
        }
    })
}

/// The rustls configuration of `redis.tls_*` (see [`connect`]).
fn tls_config(config: &Config, insecure: bool) -> Result<rustls::ClientConfig, String> {
    let r = &config.redis;
    let tls = PgTls {
        // `require` with no roots checks nothing: what `#insecure` asks for.
        mode: match insecure {
            true => SslMode::Require,
            false => SslMode::VerifyFull,
        },
        roots: r.tls_ca_file.clone().map_or(Roots::System, Roots::File),
        roots_given: !insecure,
        client: r.tls_cert_file.clone().zip(r.tls_key_file.clone()),
    };
    tls.client_config().map_err(|e| e.to_string())
}

/// A connection to the server `info` names whose answers are bounded (see [`Bounded`]), and the
/// task that drives it (poll it beside the calls, or spawn it).
pub async fn connection(
    config: &Config,
    info: &ConnectionInfo,
) -> RedisResult<(MultiplexedConnection, BoxFuture<'static, ()>)> {
    let stream = Bounded::new(connect(config, info).await?);
    let settings = redis::AsyncConnectionConfig::default();
    let (conn, driver) =
        MultiplexedConnection::new_with_config(info.redis_settings(), stream, settings).await?;
    Ok((conn, driver.boxed()))
}

/// A subscription connection to the server `info` names, its messages bounded (see
/// [`Bounded`]).
pub async fn pubsub(config: &Config, info: &ConnectionInfo) -> RedisResult<PubSub> {
    let stream = Bounded::new(connect(config, info).await?);
    PubSub::new(info.redis_settings(), stream).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn answers_are_bounded_per_request_and_subscriptions_per_second() {
        let (client, mut server) = tokio::io::duplex(4 * ANSWER_LIMIT);
        let mut client = Bounded::new(client);
        let mut buf = vec![0u8; 4 * ANSWER_LIMIT];
        // A whole bound's worth is read.
        server.write_all(&vec![b'x'; ANSWER_LIMIT]).await.unwrap();
        let mut read = 0;
        while read < ANSWER_LIMIT {
            read += client.read(&mut buf).await.unwrap();
        }
        // One byte more, with no request in between: refused.
        server.write_all(b"y").await.unwrap();
        let e = client.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("more than 65536 bytes"), "{e}");

        // A request gives the next answer the whole bound again.
        let (client, mut server) = tokio::io::duplex(4 * ANSWER_LIMIT);
        let mut client = Bounded::new(client);
        server.write_all(&vec![b'x'; ANSWER_LIMIT]).await.unwrap();
        client.read_exact(&mut buf[..ANSWER_LIMIT]).await.unwrap();
        client.write_all(b"PING\r\n").await.unwrap();
        server.write_all(&vec![b'x'; ANSWER_LIMIT]).await.unwrap();
        client.read_exact(&mut buf[..ANSWER_LIMIT]).await.unwrap();

        // On a subscription (nothing written), the bound comes back at REFILL_PER_SEC.
        client.refilled = Instant::now() - std::time::Duration::from_secs(1);
        server.write_all(&vec![b'x'; REFILL_PER_SEC]).await.unwrap();
        client.read_exact(&mut buf[..REFILL_PER_SEC]).await.unwrap();
        server.write_all(b"y").await.unwrap();
        assert!(client.read(&mut buf).await.is_err());
    }
}
