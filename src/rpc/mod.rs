//! The socket side of a request: [`server`] (the Unix socket, connections and their limits) cuts
//! lines with [`framing`], admits peers with [`peers`], reads each line with [`protocol`] (the
//! JSON-RPC envelope; a plain get with [`plain`]) and hands the call to its method in [`methods`] (one file each: parameters,
//! use case, answer), which answers with [`encode`] and says failures as [`error`]s.

pub mod encode;
pub mod error;
pub mod framing;
pub mod fuzzing;
pub mod inflight;
pub mod methods;
pub mod peers;
pub mod plain;
pub mod protocol;
pub mod server;
