//! Redis behind one facade, [`Cache`] (`cache.rs`): what the rest of the daemon sees. Below it,
//! bottom up: [`keys`] (pure: key names, slots), [`client`] / [`cluster`] / [`sentinel`] /
//! [`conn`] (reaching whatever `redis.mode` names; [`bounded`]: the sentinels' answers bounded), [`routing`] (which pipeline a command goes
//! on, every call bounded), [`scripts`] (the Lua scripts, `*.lua`), [`near`] and [`tracking`]
//! (the near cache and what keeps it exact), [`confirm`] (which connections may answer reads), [`reach`] and [`partial`] (partial outages), [`pipeline`] (the request path's queue), [`scan`]
//! and [`admin`] (walking the cache; fences and epochs), [`watch`] (what the health monitor learns
//! each tick, in terms that name no primary) and [`epochs`] (which process and topology the data
//! was written under).

pub mod admin;
pub mod bounded;
pub mod cache;
pub mod cache_near;
pub mod client;
pub mod cluster;
pub mod confirm;
pub mod conn;
pub mod epochs;
pub mod error;
pub mod fenced;
pub mod keys;
pub mod near;
pub mod partial;
pub mod pipeline;
pub mod reach;
pub mod routing;
pub mod scan;
pub mod scripts;
pub mod sentinel;
pub mod tracking;
pub mod watch;

pub use admin::NodeState;
pub use cache::Cache;
pub use error::{CacheError, CacheErrorKind};
pub use keys::Primary;
pub use scan::Stored;
pub use scripts::Outcome;
pub use watch::{Look, Watch};
