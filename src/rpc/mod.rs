//! The socket side of a request: [`server`] (the Unix socket, connections and their limits) cuts
//! lines with [`framing`], admits peers with [`peers`], parses with [`protocol`] (pure JSON-RPC
//! parsing and encoding) and hands each call to [`dispatch`] (a method call → its use case).

pub mod dispatch;
pub mod framing;
pub mod fuzzing;
pub mod peers;
pub mod protocol;
pub mod server;
