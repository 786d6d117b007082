//! The errors a client is told, with their JSON-RPC codes and `data.kind` names, and how a use
//! case's failure becomes one.

use crate::service::ServiceError;

/// The `data.kind` of an error, with its JSON-RPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    NotFound,
    Conflict,
    Unavailable,
    /// The peer may not call this method (`socket.readonly_uids` / `readonly_gids`).
    Forbidden,
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> i32 {
        match self {
            ErrorKind::ParseError => -32700,
            ErrorKind::InvalidRequest => -32600,
            ErrorKind::MethodNotFound => -32601,
            ErrorKind::InvalidParams => -32602,
            ErrorKind::NotFound => -32001,
            ErrorKind::Conflict => -32002,
            ErrorKind::Unavailable => -32003,
            ErrorKind::Forbidden => -32004,
            ErrorKind::Internal => -32603,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ParseError => "parse_error",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::MethodNotFound => "method_not_found",
            ErrorKind::InvalidParams => "invalid_params",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RpcError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RpcError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError::new(ErrorKind::InvalidParams, message)
    }
}

/// What the client is told of a use case that failed.
impl From<ServiceError> for RpcError {
    fn from(e: ServiceError) -> Self {
        let kind = match &e {
            ServiceError::NotFound(_) | ServiceError::RowNotFound { .. } => ErrorKind::NotFound,
            ServiceError::Conflict(_) | ServiceError::RowConflict(_) => ErrorKind::Conflict,
            ServiceError::InvalidRow(_) => ErrorKind::InvalidParams,
            e if e.unavailable() => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        let message = match &e {
            ServiceError::Postgres(_) | ServiceError::Redis(_) if kind == ErrorKind::Internal => {
                format!("internal error: {e}")
            }
            _ => e.to_string(),
        };
        RpcError::new(kind, message)
    }
}
