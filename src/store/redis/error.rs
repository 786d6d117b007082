//! Why a Redis call failed, said once for every caller, and how a reply is read as a value.

use std::time::Duration;

/// Why a Redis call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// Redis cannot be reached or the connection broke.
    #[error("redis unavailable: {0}")]
    Down(String),
    /// The call did not answer within `redis.timeout_ms`: Redis is treated as down for this request.
    #[error("redis timed out after {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error (a script error, a wrong type): a bug or a foreign key.
    #[error("redis error: {0}")]
    Server(String),
    /// Redis has no fence (it lost its data): nothing can be fenced off until the health monitor
    /// sets one again.
    #[error("redis has no cache fence yet (it lost its data); retrying once the fence is set")]
    Unfenced,
}

impl From<redis::RedisError> for CacheError {
    fn from(e: redis::RedisError) -> Self {
        if matches!(
            e.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) {
            CacheError::Server(e.to_string())
        } else if is_tls(&e) {
            CacheError::Down(format!("TLS: {e}"))
        } else {
            CacheError::Down(e.to_string())
        }
    }
}

/// Whether a TLS failure (a handshake or certificate refused) is behind `e`: said as such, since
/// the driver's text ("received fatal alert: …") does not. The driver keeps its I/O errors behind
/// an opaque `Arc`, so rustls's own wording is what can be recognised.
fn is_tls(e: &redis::RedisError) -> bool {
    const RUSTLS_SAYS: [&str; 5] = [
        "received fatal alert",
        "invalid peer certificate",
        "peer is incompatible",
        "peer misbehaved",
        "TLS handshake",
    ];
    let text = e.to_string();
    RUSTLS_SAYS.iter().any(|says| text.contains(says))
}

/// A call whose answer was never handed back (its pipeline task went away).
pub fn abandoned() -> CacheError {
    CacheError::Down("the Redis call was abandoned".into())
}

/// `value` as a `T`; a server error in its place is [`CacheError::Server`].
pub fn decode<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, CacheError> {
    if let redis::Value::ServerError(e) = value {
        return Err(CacheError::Server(e.to_string()));
    }
    redis::from_redis_value(value).map_err(|e| CacheError::Server(e.to_string()))
}
