//! How one family of LLM APIs is spoken: where a call goes, its headers
//! and body, how a streamed event and a whole answer read, and where a
//! stream ends. The transport (`client.rs`) sends what a dialect writes
//! and hands it what comes back; it knows no API's shapes. A new dialect
//! is a file beside `openai.rs` and a line in [`DIALECTS`]; a provider
//! picks one with `provider.NAME.dialect`.

use super::client::{CallError, Usage};
use crate::auth::Secret;
use crate::protocol::Turn;

/// What one streamed event carried (any part may be missing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub delta: Option<String>,
    /// Reasoning text a model streams before its answer.
    pub reasoning: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

/// One Server-Sent Event's data, read.
#[derive(Debug, PartialEq, Eq)]
pub enum Streamed {
    Chunk(Chunk),
    /// The answer is complete.
    End,
}

/// A whole answer, from a server that did not stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    pub text: String,
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

pub trait Dialect: Sync {
    /// Its name, as `provider.NAME.dialect` gives it.
    fn name(&self) -> &'static str;
    /// Where a call goes, from the provider's `base_url`.
    fn url(&self, base_url: &str) -> String;
    /// The headers besides `Content-Type` and `Accept`, the API key among
    /// them.
    fn headers(&self, key: Option<&Secret>) -> Vec<(&'static str, String)>;
    /// The request: the model and the conversation, streamed.
    fn body(&self, model: &str, messages: &[Turn]) -> String;
    /// One streamed event's data.
    fn event(&self, data: &str) -> Result<Streamed, CallError>;
    /// A whole answer.
    fn answer(&self, body: &str) -> Result<Whole, CallError>;
    /// What an error body says (cleaned by the caller).
    fn error_message(&self, body: &str) -> String;
}

/// Every dialect spoken, the default first.
pub const DIALECTS: &[&dyn Dialect] = &[&super::openai::OpenAi];

/// A provider's dialect, as its settings chose it.
#[derive(Clone, Copy)]
pub struct Speaks(pub &'static dyn Dialect);

impl Speaks {
    /// The dialect called `name`, or an error that lists them.
    pub fn named(name: &str) -> Result<Speaks, String> {
        DIALECTS
            .iter()
            .find(|d| d.name() == name)
            .map(|d| Speaks(*d))
            .ok_or_else(|| {
                let names: Vec<&str> = DIALECTS.iter().map(|d| d.name()).collect();
                format!("no dialect {name:?}; one of: {}", names.join(", "))
            })
    }
}

impl Default for Speaks {
    fn default() -> Self {
        Speaks(DIALECTS[0])
    }
}

impl std::ops::Deref for Speaks {
    type Target = dyn Dialect;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl std::fmt::Debug for Speaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dialect_is_found_by_its_name() {
        assert_eq!(Speaks::named("openai").unwrap().name(), "openai");
        assert_eq!(Speaks::default().name(), "openai");
        let e = Speaks::named("klingon").err().unwrap();
        assert!(e.contains("one of: openai"), "{e}");
    }
}
