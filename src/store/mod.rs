//! The two backends behind one door each: [`db`] (PostgreSQL: the pool and every named query,
//! reached as [`connect`] says) and [`cache`] (Redis: reads of live entries, and the one
//! versioned-write script with its fence).

pub mod cache;
pub mod connect;
pub mod db;
pub mod db_error;
pub mod near;
pub mod topology;
