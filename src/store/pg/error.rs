//! Why a PostgreSQL call failed: a kind, asked of the driver's error (its SQLSTATE, whether the
//! connection closed, the I/O and TLS errors in its chain), never read from its text; and the
//! error itself, kept as the source.

use std::sync::Arc;

use tokio_postgres::error::SqlState;

use crate::model::user::RowError;
use crate::support::error::{self as causes, Cause, Message};

/// What kind of failure a PostgreSQL call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// Nothing answered at the address (connection refused, no such host): retryable.
    Refused,
    /// The connection broke, or the server is shutting down or out of resources: retryable.
    Lost,
    /// A TLS handshake or certificate was refused: the server is unreachable as configured.
    Tls,
    /// The call did not finish in time (statement timeout or the client-side bound).
    Timeout,
    /// The server refused the credentials, or the password file cannot be read (a rotation may
    /// be under way): retried, reported.
    Credentials,
    /// A unique constraint refused the change (rename onto an existing name).
    Conflict,
    /// A row that cannot be served (see `User::from_row`): fails only the request that asked
    /// for it.
    Row,
    /// A pooler in front of PostgreSQL refused what a session needs: retrying cannot help.
    Pooler,
    /// The configuration cannot work (a URL it cannot use, a setting missing): retrying cannot
    /// help.
    Config,
    /// The server refused the query (missing schema, bad SQL) or answered what cannot be.
    Server,
}

/// Why a database call failed.
#[derive(Debug, Clone)]
pub struct DbError {
    kind: DbErrorKind,
    /// What failed, said by cacheward ("find users", "cdc connect"), or empty.
    what: Arc<str>,
    source: Cause,
}

impl DbError {
    /// A failure of `kind`, caused by `source`, while doing `what`.
    pub fn new(kind: DbErrorKind, what: impl Into<Arc<str>>, source: Cause) -> DbError {
        DbError {
            kind,
            what: what.into(),
            source,
        }
    }

    /// A failure of cacheward's own making, said in words.
    pub fn said(kind: DbErrorKind, text: impl Into<String>) -> DbError {
        DbError::new(kind, "", Arc::new(Message(text.into())))
    }

    /// A call that did not finish within `bound`.
    pub fn timeout(what: impl Into<Arc<str>>, bound: std::time::Duration) -> DbError {
        let text = format!("took longer than {bound:?}");
        DbError::new(DbErrorKind::Timeout, what, Arc::new(Message(text)))
    }

    /// The driver's error, classified; `what` says what was being done.
    pub fn from_driver(what: impl Into<Arc<str>>, e: tokio_postgres::Error) -> DbError {
        let kind = classify(&e);
        DbError::new(kind, what, Arc::new(e))
    }

    pub fn kind(&self) -> DbErrorKind {
        self.kind
    }

    /// Whether PostgreSQL is down or unreachable as configured (the health state follows it).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind,
            DbErrorKind::Refused | DbErrorKind::Lost | DbErrorKind::Tls
        )
    }

    /// Whether retrying cannot help until the configuration changes.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self.kind, DbErrorKind::Pooler | DbErrorKind::Config)
    }

    /// The row that cannot be served, for an error of kind [`DbErrorKind::Row`].
    pub fn row(&self) -> Option<&RowError> {
        self.source.downcast_ref::<RowError>()
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let kind = match self.kind {
            DbErrorKind::Refused => "postgres refused the connection",
            DbErrorKind::Lost => "postgres unavailable",
            DbErrorKind::Tls => "postgres TLS failed",
            DbErrorKind::Timeout => "postgres timed out",
            DbErrorKind::Credentials => "postgres credentials failed",
            DbErrorKind::Conflict => "unique violation",
            DbErrorKind::Row => return write!(f, "{}", self.source),
            DbErrorKind::Pooler => "a pooler refused the session",
            DbErrorKind::Config => "postgres cannot be used as configured",
            DbErrorKind::Server => "postgres error",
        };
        let cause = match self.source.downcast_ref::<tokio_postgres::Error>() {
            // The server's own message, not the driver's "db error: ERROR: …" wrapping.
            Some(e) if e.as_db_error().is_some() => {
                e.as_db_error().expect("checked").message().to_owned()
            }
            _ => causes::with_causes(&*self.source),
        };
        match self.what.is_empty() {
            true => write!(f, "{kind}: {cause}"),
            false => write!(f, "{kind}: {}: {cause}", self.what),
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// What PgBouncer says when a client sends a startup parameter it does not pass on.
const POOLER_REFUSES_OPTIONS: &str = "unsupported startup parameter";

/// Whether `e` is a pooler refusing cacheward's startup options.
pub fn refused_options(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.message().contains(POOLER_REFUSES_OPTIONS))
}

fn classify(e: &tokio_postgres::Error) -> DbErrorKind {
    if refused_options(e) {
        return DbErrorKind::Pooler;
    }
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbErrorKind::Conflict,
        Some(c) if *c == SqlState::QUERY_CANCELED => DbErrorKind::Timeout,
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            DbErrorKind::Credentials
        }
        Some(c)
            if c.code().starts_with("08")
                || c.code().starts_with("57P")
                || c.code().starts_with("53")
                || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            DbErrorKind::Lost
        }
        Some(_) => DbErrorKind::Server,
        // No SQLSTATE: the connection itself failed (refused, closed, I/O, TLS).
        None if causes::is_tls(e) => DbErrorKind::Tls,
        None => match causes::io_kind(e) {
            Some(std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
                DbErrorKind::Refused
            }
            _ => DbErrorKind::Lost,
        },
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::from_driver("", e)
    }
}

impl From<RowError> for DbError {
    fn from(e: RowError) -> Self {
        DbError::new(DbErrorKind::Row, "", Arc::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::from(e),
            deadpool_postgres::PoolError::Timeout(_) => {
                DbError::new(DbErrorKind::Timeout, "a pool connection", Arc::new(e))
            }
            other => DbError::new(DbErrorKind::Lost, "a pool connection", Arc::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_keeps_its_cause_and_says_its_kind() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = DbError::new(DbErrorKind::Refused, "cdc connect", Arc::new(io));
        let said = e.to_string();
        assert!(
            said.starts_with("postgres refused the connection: cdc connect: "),
            "{said}"
        );
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.is::<std::io::Error>());
        assert!(e.is_unavailable() && !e.is_misconfiguration());
        // Clones share the cause: one failed read answers every waiter.
        let clone = e.clone();
        assert!(Arc::ptr_eq(&clone.source, &e.source));
        assert!(DbError::said(DbErrorKind::Pooler, "set cdc.url").is_misconfiguration());
        assert!(!DbError::timeout("x", std::time::Duration::from_secs(1)).is_unavailable());
    }
}
