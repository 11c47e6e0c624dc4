//! Support for the integration tests and the benchmarks, which both start
//! the real binary against fakes: not part of the gateway (it is never
//! called from it, and the release binary leaves it out).

pub mod fake_openai;
