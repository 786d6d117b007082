//! The two backends behind one door each: [`db`] (PostgreSQL: the pool and every named query) and
//! [`cache`] (Redis: reads of live entries, and the one versioned-write script with its fence).

pub mod cache;
pub mod db;
