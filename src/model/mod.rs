//! The domain, pure: what a cached row is ([`user`]) and the rules every cache entry obeys
//! ([`entry`]: live or tombstone, and which version wins), the [`key`] every path carries, and a
//! declared [`table`] compiled from its section and the catalog. No I/O here.

pub mod entry;
pub mod key;
pub mod registry;
pub mod table;
pub mod user;
