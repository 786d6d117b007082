//! cacheward keeps a Redis cache of a PostgreSQL `users` table correct: cache-aside reads and
//! write-through writes over a JSON-RPC Unix socket, with versioned cache writes that never let an
//! older value overwrite a newer one. See DESIGN.md for the contracts.

pub mod batch;
pub mod cache;
pub mod cdc;
pub mod client;
pub mod config;
pub mod daemon;
pub mod db;
pub mod dev;
pub mod fuzzing;
pub mod loads;
pub mod metrics;
pub mod protocol;
pub mod secrets;
pub mod server;
pub mod service;
pub mod supervisor;
pub mod telemetry;
pub mod user;
pub mod verify;
