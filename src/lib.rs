//! hivegate's modules, as a library: the `hivegate` binary wires them
//! together (`main.rs`), and the fuzz targets and benchmarks reach the
//! parsers through it.

pub mod access;
pub mod auth;
pub mod ca;
pub mod chat;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod executor;
pub mod forwarded;
pub mod fuzz;
pub mod hub;
pub mod json;
pub mod jwt;
pub mod limit;
pub mod llm;
pub mod mcp;
pub mod openai_api;
pub mod ops;
pub mod pool;
pub mod protocol;
pub mod redact;
pub mod remote;
pub mod resilience;
pub mod server;
pub mod store;
pub mod stream;
#[doc(hidden)]
pub mod testkit;
pub mod upstream_key;

/// The version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILD_GIT_COMMIT"),
    ")"
);
