//! The domain, pure: what a cached row is ([`user`]) and the rules every cache entry obeys
//! ([`entry`]: live or tombstone, and which version wins), and the [`key`] every path carries. No
//! I/O here.

pub mod entry;
pub mod key;
pub mod user;
