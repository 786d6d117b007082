//! Why a PostgreSQL call failed, classified once for every caller: down (retry), timed out, a
//! unique violation, a row that cannot be served, or anything else.

use tokio_postgres::error::SqlState;

use crate::model::user::RowError;

/// Why a database call failed, classified once here for every caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The server cannot be reached or the connection broke: retryable.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish in time (statement timeout or the client-side bound).
    #[error("postgres timed out: {0}")]
    Timeout(String),
    /// A unique constraint refused the change (rename onto an existing name).
    #[error("unique violation: {0}")]
    Conflict(String),
    /// A row that cannot be served (see `User::from_row`): fails only the request that asked
    /// for it.
    #[error(transparent)]
    Row(#[from] RowError),
    /// Anything else (missing schema, bad SQL): not fixed by retrying.
    #[error("postgres error: {0}")]
    Other(String),
}

impl DbError {
    fn classify(e: &tokio_postgres::Error) -> DbError {
        let text = match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => {
                // "error connecting to server" alone hides why: append the causes.
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    text.push_str(": ");
                    text.push_str(&c.to_string());
                    cause = c.source();
                }
                text
            }
        };
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbError::Conflict(text),
            Some(c) if *c == SqlState::QUERY_CANCELED => {
                DbError::Timeout(format!("statement timeout: {text}"))
            }
            Some(c)
                if c.code().starts_with("08")
                    || c.code().starts_with("57P")
                    || c.code().starts_with("53")
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                DbError::Unavailable(text)
            }
            Some(_) => DbError::Other(text),
            // No SQLSTATE: the connection itself failed (refused, closed, I/O).
            None => DbError::Unavailable(text),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::classify(&e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::classify(&e),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}
