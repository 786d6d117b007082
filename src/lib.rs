//! cacheward keeps a Redis cache of a PostgreSQL `users` table correct: cache-aside reads and
//! write-through writes over a JSON-RPC Unix socket, with versioned cache writes that never let an
//! older value overwrite a newer one. The contracts are in `docs/reference.md`.
//!
//! Two data paths, each a walk through the rooms below:
//! - a request: [`rpc::server`] (socket, framing, limits) → [`rpc::methods`] (method → use case)
//!   → [`service`] (reads in [`service::read`], writes in `service`) → [`store`] (PostgreSQL in
//!   [`store::pg`], Redis behind [`store::redis::Cache`]); a Redis client's read takes [`resp`]
//!   (the read-only Redis-protocol front end) to the same read path;
//! - an out-of-band change: the trigger (`sql/0002_cdc.sql`) → [`cdc::outbox`] (read a batch) →
//!   [`cdc::plan`] → [`cdc::apply`] → [`store::redis::Cache`], with the position kept by
//!   [`cdc::cursor`].
//!
//! Both carry the domain's values and rules from [`model`]. Around them: [`runtime`] (the daemon's
//! wiring, the health monitor, signals, logs, metrics), [`cli`] (the client commands and
//! `verify`), [`config`], and [`support`] (pieces that use no room: secrets, TLS, timeouts,
//! systemd). The throwaway servers of `serve --dev`, the tests and the benchmark are in `dev`, built only
//! with the `dev` feature (on by default, off in release artefacts).

pub mod cdc;
pub mod cli;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod model;
pub mod resp;
pub mod rpc;
pub mod runtime;
pub mod service;
pub mod store;
pub mod support;
