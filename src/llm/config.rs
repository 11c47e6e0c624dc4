//! The settings of the tool relay (`[llm]`) and of each provider
//! (`[provider.NAME]`), as `config` hands them over.

use crate::auth::Secret;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct LlmConfig {
    /// Names; empty until validated, then the providers in file order if
    /// not given.
    pub chain: Vec<String>,
    pub max_in_flight: u32,
    pub max_in_flight_per_session: u32,
    pub max_prompt_bytes: usize,
    pub max_response_bytes: usize,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub progress_interval: Duration,
    pub providers: Vec<ProviderConfig>,
}

#[derive(Debug, Clone, Default)]
pub struct ProviderConfig {
    pub name: String,
    /// How its API is spoken.
    pub dialect: super::dialect::Speaks,
    pub base_url: String,
    pub model: String,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
    /// Read once at start-up from the variable or file above.
    pub api_key: Option<Secret>,
    pub max_in_flight: u32,
    pub rpm: u32,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub fail_max: u32,
    pub reset_timeout: Duration,
}
