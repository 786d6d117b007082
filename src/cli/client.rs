//! The socket client behind `cacheward get|put|rename|delete|upsert|update|stats|health`: one
//! JSON-RPC request, one response.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// `COLUMN=VALUE` pairs as a JSON object of text values (PostgreSQL converts them to the columns'
/// types); the first `=` ends the column's name.
pub fn pairs(args: &[String]) -> Result<serde_json::Map<String, Value>, String> {
    let mut out = serde_json::Map::new();
    for arg in args {
        let (column, value) = arg
            .split_once('=')
            .filter(|(c, _)| !c.is_empty())
            .ok_or_else(|| format!("expected COLUMN=VALUE, got {arg:?}"))?;
        if out.insert(column.to_owned(), json!(value)).is_some() {
            return Err(format!("column {column:?} given twice"));
        }
    }
    Ok(out)
}

/// Why a call did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source} (is `cacheward serve` running? --socket PATH names another socket)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("unreadable response: {0}")]
    Protocol(String),
    /// The daemon answered with a JSON-RPC error; the value is its `error` object.
    #[error("{}", .0["message"].as_str().unwrap_or("error"))]
    Rpc(Value),
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (reader, writer) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(reader),
            writer,
            next_id: 1,
        })
    }

    /// Sends one request and returns its `result`.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .expect("a request always serializes");
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer).await? == 0 {
            return Err(ClientError::Closed);
        }
        let mut response: Value = serde_json::from_str(&answer)
            .map_err(|e| ClientError::Protocol(format!("{e}: {answer}")))?;
        if response["id"] != json!(id) {
            return Err(ClientError::Protocol(format!(
                "response for another request: {answer}"
            )));
        }
        if let Some(error) = response.get_mut("error") {
            return Err(ClientError::Rpc(error.take()));
        }
        match response.get_mut("result") {
            Some(result) => Ok(result.take()),
            None => Err(ClientError::Protocol(format!(
                "neither result nor error: {answer}"
            ))),
        }
    }
}
