//! The process around the two data paths: [`daemon`] wires the tasks, [`monitor`] watches the
//! backends, [`signals`] stops and reloads, [`telemetry`] logs and [`metrics`] serves Prometheus.

pub mod daemon;
pub mod metrics;
pub mod monitor;
pub mod signals;
pub mod telemetry;
