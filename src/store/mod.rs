//! The two backends behind one door each: [`pg`] (PostgreSQL: the pool and every named query,
//! reached as [`pg::connect`] says) and [`redis`] (the cache: reads of live entries, and the one
//! versioned-write script with its fence, behind [`redis::Cache`]).

pub mod pg;
pub mod redis;
