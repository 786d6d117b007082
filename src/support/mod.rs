//! Cross-cutting pieces every room may use and that use no room: [`secrets`] (nothing secret
//! reaches a log), [`tls`] (rustls for both backends), [`workqueue`] (batched work),
//! [`systemd`] (`sd_notify`), [`time`] (timeouts and backoff), [`ids`] (random identities). They import nothing of the crate outside `support`.

#[cfg(test)]
pub mod captured;
pub mod error;
pub mod ids;
pub mod secrets;
pub mod systemd;
pub mod time;
pub mod tls;
pub mod workqueue;
