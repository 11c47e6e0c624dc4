//! Operating the gateway: metrics, logs, systemd integration.

pub mod fd;
pub mod file;
pub mod histogram;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod process;
pub mod systemd;
