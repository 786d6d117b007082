//! What the daemon believes about its two backends: up or down, ever reached, and the readiness
//! latch. Written by the health monitor and by failing requests, read by every request.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The two backends, as named in logs and `health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Redis => "redis",
        }
    }
}

/// What the daemon currently believes about its backends. Written by the health monitor and by
/// failing requests, read by every request.
#[derive(Debug, Default)]
pub struct Health {
    postgres_up: AtomicBool,
    redis_up: AtomicBool,
    postgres_seen: AtomicBool,
    redis_seen: AtomicBool,
    /// Latched once both backends were reached while the socket listens (docs/reference.md: stays true while
    /// degraded).
    ready: AtomicBool,
}

impl Health {
    pub fn is_up(&self, backend: Backend) -> bool {
        match backend {
            Backend::Postgres => self.postgres_up.load(Relaxed),
            Backend::Redis => self.redis_up.load(Relaxed),
        }
    }

    /// Records a backend's state; logs `backend up` / `backend down` on a change. Returns true when
    /// this call brought the backend up.
    pub fn set(&self, backend: Backend, up: bool, reason: &str) -> bool {
        let (flag, seen) = match backend {
            Backend::Postgres => (&self.postgres_up, &self.postgres_seen),
            Backend::Redis => (&self.redis_up, &self.redis_seen),
        };
        let was = flag.swap(up, Relaxed);
        if up && !was {
            let first = !seen.swap(true, Relaxed);
            if first {
                tracing::info!(backend = backend.name(), "backend reached");
            } else {
                tracing::warn!(backend = backend.name(), "backend up");
                self.report_status();
            }
            return true;
        }
        if !up && was {
            tracing::warn!(backend = backend.name(), reason, "backend down");
            self.report_status();
        }
        false
    }

    /// Tells systemd (STATUS=) what the daemon is doing now.
    fn report_status(&self) {
        let down: Vec<&str> = [Backend::Postgres, Backend::Redis]
            .into_iter()
            .filter(|b| !self.is_up(*b))
            .map(Backend::name)
            .collect();
        crate::support::systemd::status(&match down.is_empty() {
            true => "serving".to_owned(),
            false => format!("degraded: {} down", down.join(" and ")),
        });
    }

    /// Marks a backend up after a call to it succeeded; a load when it already is.
    pub fn saw_up(&self, backend: Backend) {
        if !self.is_up(backend) {
            self.set(backend, true, "");
        }
    }

    /// Whether `backend` was ever reached.
    pub fn ever_reached(&self, backend: Backend) -> bool {
        match backend {
            Backend::Postgres => self.postgres_seen.load(Relaxed),
            Backend::Redis => self.redis_seen.load(Relaxed),
        }
    }

    /// Both backends were reached at least once; the caller then latches readiness.
    pub fn both_seen(&self) -> bool {
        self.postgres_seen.load(Relaxed) && self.redis_seen.load(Relaxed)
    }

    pub fn set_ready(&self) -> bool {
        !self.ready.swap(true, Relaxed)
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Relaxed)
    }
}
