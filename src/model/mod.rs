//! The domain, pure: what a cached row is ([`user`]) and the rules every cache entry obeys
//! ([`entry`]: live or tombstone, and which version wins). No I/O here.

pub mod entry;
pub mod user;
