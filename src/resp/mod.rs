//! The read-only Redis-protocol front end (docs/reference.md, "Redis protocol front end"): any
//! Redis client reads rows through cacheward by their Redis keys, over `resp.socket` or
//! `resp.listen`, in RESP2 or RESP3.
//!
//! A request walks [`server`] (listeners, limits, one task per connection) → [`frame`] (requests
//! read, replies written) → [`session`] (what each command does to the connection and answers;
//! [`client`]: `CLIENT`, tracking, `SUBSCRIBE`) and [`commands`] (what is served and refused) → [`read`] (keys resolved and read on the service's read path, as the JSON-RPC `get`).

pub mod client;
pub mod commands;
pub mod frame;
pub mod fuzzing;
pub mod guard;
pub mod read;
pub mod server;
pub mod session;
pub mod tracking;
