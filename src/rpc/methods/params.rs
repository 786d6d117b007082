//! Reading a method's named parameters: each taken once, typed, checked; the username rule.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::model::registry::{TableLookup, Tables};
use crate::model::table::Table;
use crate::rpc::error::ErrorKind;
use crate::service::Service;

use crate::rpc::error::RpcError;

/// Longest username, in Unicode scalar values.
pub const MAX_USERNAME_CHARS: usize = 64;

/// A method's named parameters.
pub type Params = Map<String, Value>;

pub use crate::model::table::type_name;

pub fn take_username(params: &mut Params, name: &str) -> Result<String, RpcError> {
    match params.remove(name) {
        Some(Value::String(s)) => {
            validate_username(&s)
                .map_err(|why| RpcError::invalid_params(format!("invalid params: {name} {why}")))?;
            Ok(s)
        }
        Some(other) => Err(RpcError::invalid_params(format!(
            "invalid params: {name} must be a string, got {}",
            type_name(&other)
        ))),
        None => Err(RpcError::invalid_params(format!(
            "invalid params: missing {name}"
        ))),
    }
}

/// An optional version: an integer from 0 to 2^63 - 1 (`null` is as if it were absent).
pub fn take_version(params: &mut Params, name: &str) -> Result<Option<i64>, RpcError> {
    match params.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v >= 0) => Ok(n.as_i64()),
        Some(other) => Err(RpcError::invalid_params(format!(
            "invalid params: {name} must be an integer from 0 to {}, got {}",
            i64::MAX,
            match &other {
                Value::Number(n) => n.to_string(),
                other => type_name(other).to_owned(),
            }
        ))),
    }
}

/// Checks the protocol's username rule: 1–64 Unicode scalar values, no control characters, no whitespace
/// at either end. Returns the reason as a phrase that follows the parameter's name.
pub fn validate_username(name: &str) -> Result<(), String> {
    let count = name.chars().count();
    if count == 0 {
        return Err("must not be empty".into());
    }
    if count > MAX_USERNAME_CHARS {
        return Err(format!(
            "must be at most {MAX_USERNAME_CHARS} characters, got {count}"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        ));
    }
    let starts = name.chars().next().is_some_and(char::is_whitespace);
    let ends = name.chars().next_back().is_some_and(char::is_whitespace);
    if starts || ends {
        return Err("must not start or end with whitespace".into());
    }
    Ok(())
}

/// A string parameter; `None` when absent.
pub fn take_string(params: &mut Params, name: &str) -> Result<Option<String>, RpcError> {
    match params.remove(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RpcError::invalid_params(format!(
            "invalid params: {name} must be a string, got {}",
            type_name(&other)
        ))),
    }
}

/// An object parameter (column → value), required.
pub fn take_object(params: &mut Params, name: &str) -> Result<Params, RpcError> {
    match params.remove(name) {
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(RpcError::invalid_params(format!(
            "invalid params: {name} must be an object of column: value, got {}",
            type_name(&other)
        ))),
        None => Err(RpcError::invalid_params(format!(
            "invalid params: missing {name}"
        ))),
    }
}

/// The declared table named `name`, or why a request cannot use it: not declared
/// (`invalid_params`), not checked against the catalog yet (`unavailable`).
pub fn table(tables: &Tables, name: &str) -> Result<Arc<Table>, RpcError> {
    let shown: String = name.chars().take(64).collect();
    tables.named(name).map_err(|why| match why {
        TableLookup::Unknown => {
            RpcError::invalid_params(format!("invalid params: no table {shown:?} is declared"))
        }
        TableLookup::Unchecked => RpcError::new(
            ErrorKind::Unavailable,
            format!(
                "table {shown} is not available yet: PostgreSQL has not been reached since start"
            ),
        ),
        TableLookup::Unavailable(why) => RpcError::new(
            ErrorKind::Unavailable,
            format!("table {shown} is unavailable: {why}"),
        ),
    })
}

/// The declared table named `name`, if the daemon may write it.
pub fn writable_table(service: &Service, name: &str) -> Result<Arc<Table>, RpcError> {
    let table = table(&service.tables, name)?;
    match table.writable {
        true => Ok(table),
        false => Err(RpcError::new(
            ErrorKind::Forbidden,
            format!(
                "forbidden: table {} is not writable through the daemon",
                table.name
            ),
        )),
    }
}

/// The text of the key `key` (column → value) names in `table`, by its key or by `lookup`.
pub fn key_text(table: &Table, key: &Params, lookup: Option<&str>) -> Result<String, RpcError> {
    let by = match lookup {
        None => None,
        Some(name) => Some(table.lookup(name).ok_or_else(|| {
            let shown: String = name.chars().take(64).collect();
            RpcError::invalid_params(format!(
                "invalid params: table {} has no lookup {shown:?}",
                table.name
            ))
        })?),
    };
    table.key_of(key, by).map_err(|e| {
        let column: String = e.column.chars().take(64).collect();
        RpcError::invalid_params(format!(
            "invalid params: table {}: key column {column:?} {}",
            table.name, e.reason
        ))
    })
}
