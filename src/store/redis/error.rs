//! Why a Redis call failed: a kind, asked of the driver's error (`is_connection_refusal`, the TLS
//! error in its chain), never read from its text; the error itself kept as the source. And how a
//! reply is read as a value.

use std::sync::Arc;
use std::time::Duration;

use crate::support::error::{self as causes, Cause, Message};

/// What kind of failure a Redis call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheErrorKind {
    /// Nothing answered at the address: Redis is down.
    Refused,
    /// The connection broke or could not be made: Redis is down for now.
    Lost,
    /// A TLS handshake or certificate was refused: Redis is unreachable as configured.
    Tls,
    /// The call did not answer within its bound: Redis is treated as down for this request.
    Timeout,
    /// Redis answered with an error (a script error, a wrong type) or with what cannot be: a bug
    /// or a foreign key.
    Server,
    /// Redis has no fence (it lost its data): nothing can be fenced off until the health monitor
    /// sets one again.
    Unfenced,
    /// The daemon gave up on the call itself (its pipeline task went away): Redis said nothing.
    Abandoned,
    /// The connection cannot be made as configured (a URL, a file): retrying cannot help.
    Config,
    /// The node's connection was made since the health monitor last looked at the process behind
    /// it (a restart, a promoted replica): its answers wait for that look (see `confirm`).
    Unconfirmed,
    /// The node does not serve the key now (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`,
    /// `MASTERDOWN`, `READONLY`): the topology is changing, which the monitor's next look sees.
    Elsewhere,
}

/// Whether a Redis error code says the node does not serve the key now (see
/// [`CacheErrorKind::Elsewhere`]), rather than that the command was wrong.
pub fn is_elsewhere(code: &str) -> bool {
    matches!(
        code,
        "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "READONLY"
    )
}

/// Why a Redis call failed.
#[derive(Debug, Clone)]
pub struct CacheError {
    kind: CacheErrorKind,
    source: Cause,
    /// The bound a [`CacheErrorKind::Timeout`] ran into.
    bound: Option<Duration>,
}

impl CacheError {
    pub fn new(kind: CacheErrorKind, source: Cause) -> CacheError {
        CacheError {
            kind,
            source,
            bound: None,
        }
    }

    /// A failure of cacheward's own making, said in words.
    pub fn said(kind: CacheErrorKind, text: impl Into<String>) -> CacheError {
        CacheError::new(kind, Arc::new(Message(text.into())))
    }

    /// A call that did not answer within `bound`.
    pub fn timeout(bound: Duration) -> CacheError {
        CacheError {
            bound: Some(bound),
            ..CacheError::said(CacheErrorKind::Timeout, format!("after {bound:?}"))
        }
    }

    /// The bound a timed-out call ran into.
    pub fn bound(&self) -> Option<Duration> {
        self.bound
    }

    /// What Redis answered as an error in place of a value.
    pub fn server(e: redis::ServerError) -> CacheError {
        let kind = match is_elsewhere(e.code()) {
            true => CacheErrorKind::Elsewhere,
            false => CacheErrorKind::Server,
        };
        CacheError::new(kind, Arc::new(e))
    }

    pub fn kind(&self) -> CacheErrorKind {
        self.kind
    }

    /// Whether Redis is down or unreachable as configured (the health state follows it).
    pub fn is_down(&self) -> bool {
        matches!(
            self.kind,
            CacheErrorKind::Refused | CacheErrorKind::Lost | CacheErrorKind::Tls
        )
    }
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let kind = match self.kind {
            CacheErrorKind::Refused => "redis refused the connection",
            CacheErrorKind::Lost => "redis unavailable",
            CacheErrorKind::Tls => "redis unavailable: TLS failed",
            CacheErrorKind::Timeout => "redis timed out",
            CacheErrorKind::Server => "redis error",
            CacheErrorKind::Unfenced => return f.write_str(
                "redis has no cache fence yet (it lost its data); retrying once the fence is set",
            ),
            CacheErrorKind::Abandoned => "the redis call was abandoned",
            CacheErrorKind::Config => "redis cannot be used as configured",
            CacheErrorKind::Unconfirmed => "redis not looked at since it connected",
            CacheErrorKind::Elsewhere => "redis does not serve that key now",
        };
        write!(f, "{kind}: {}", causes::with_causes(&*self.source))
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        let kind = if e.code().is_some_and(is_elsewhere) {
            CacheErrorKind::Elsewhere
        } else if matches!(
            e.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) {
            CacheErrorKind::Server
        } else if causes::is_tls(&e) {
            CacheErrorKind::Tls
        } else if e.is_connection_refusal() {
            CacheErrorKind::Refused
        } else {
            // The driver's own response bound too: a connection that does not answer fails fast
            // (Redis down until the monitor's next look answers), rather than every request
            // waiting out its bound while writes hang (a `CLIENT PAUSE WRITE`, a partition).
            CacheErrorKind::Lost
        };
        CacheError::new(kind, Arc::new(e))
    }
}

/// A call whose answer was never handed back (its pipeline task went away).
pub fn abandoned() -> CacheError {
    CacheError::said(
        CacheErrorKind::Abandoned,
        "its answer was never handed back",
    )
}

/// `value` as a `T`; a server error in its place is [`CacheErrorKind::Server`].
pub fn decode<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, CacheError> {
    if let redis::Value::ServerError(e) = value {
        return Err(CacheError::server(e));
    }
    redis::from_redis_value(value).map_err(|e| CacheError::new(CacheErrorKind::Server, Arc::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_are_classified_by_asking_and_keep_their_source() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = CacheError::from(redis::RedisError::from(refused));
        assert_eq!(e.kind(), CacheErrorKind::Refused);
        assert!(e.is_down());
        assert!(std::error::Error::source(&e).is_some());
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = CacheError::from(redis::RedisError::from(tls));
        assert_eq!(e.kind(), CacheErrorKind::Tls);
        assert!(e.to_string().contains("TLS"), "{e}");
        let slow = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert!(CacheError::from(redis::RedisError::from(slow)).is_down());
        // An abandoned call is the daemon's own doing: Redis is not down for it.
        assert!(!abandoned().is_down());
        assert_eq!(
            decode::<Vec<i64>>(redis::Value::SimpleString("no".into()))
                .unwrap_err()
                .kind(),
            CacheErrorKind::Server
        );
    }
}
