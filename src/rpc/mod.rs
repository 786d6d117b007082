//! The socket side of a request: [`protocol`] (pure JSON-RPC parsing and encoding), [`server`]
//! (the Unix socket, framing, peers and limits) and [`dispatch`] (a method call → its use case).

pub mod dispatch;
pub mod protocol;
pub mod server;
