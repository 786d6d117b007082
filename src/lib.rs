//! cacheward keeps a Redis cache of a PostgreSQL `users` table correct: cache-aside reads and
//! write-through writes over a JSON-RPC Unix socket, with versioned cache writes that never let an
//! older value overwrite a newer one. See DESIGN.md for the contracts.
//!
//! Two data paths, each a walk through the rooms below:
//! - a request: [`rpc::server`] (socket, framing, limits) → [`rpc::dispatch`] (method → use case)
//!   → [`service`] (reads in [`service::read`], writes in `service`) → [`store`] (PostgreSQL in
//!   [`store::db`], Redis in [`store::cache`]);
//! - an out-of-band change: the trigger (`sql/0002_cdc.sql`) → [`cdc::outbox`] (read a batch) →
//!   [`cdc::plan`] → [`cdc::apply`] → [`store::cache`], with the position kept by
//!   [`cdc::cursor`].
//!
//! Around them: [`daemon`] wires the tasks, [`monitor`] watches the backends, [`signals`] stops and
//! reloads, [`systemd`] and [`metrics`] report.

pub mod cdc;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod fuzzing;
pub mod metrics;
pub mod monitor;
pub mod rpc;
pub mod secrets;
pub mod service;
pub mod signals;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod user;
pub mod verify;
pub mod workqueue;
