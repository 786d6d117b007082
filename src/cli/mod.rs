//! The command line's own work besides `serve`: [`client`] (one request to a running daemon) and
//! [`verify`] (every cached entry against its row).

pub mod check;
pub mod client;
pub mod verify;
