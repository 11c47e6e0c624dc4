//! Upstream text made safe to log, store or send to a client.
//!
//! An upstream's error body is written by someone else, and some echo what
//! they were sent: a provider's 401 may quote the API key it refused. Every
//! piece of upstream text passes through [`Redactor::clean`] before it
//! leaves the pool thread that read it: each configured secret is replaced,
//! control characters become spaces, and the length is capped.

use std::sync::Arc;

/// Most characters of upstream text kept.
pub const MAX_UPSTREAM_TEXT: usize = 300;
/// What stands in for a secret.
const REDACTED: &str = "[redacted]";
/// Secrets shorter than this are not searched for: a three-letter "key"
/// would blank out ordinary words, and no real key is that short.
const MIN_SECRET: usize = 6;
/// Secrets kept across reloads, so rotating keys every hour for years
/// does not grow the list (or the time every upstream error takes).
const MAX_SECRETS: usize = 64;

/// The secrets to remove, shared with the pool threads.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<Vec<String>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET)
            .map(String::from)
            .collect();
        // The longest first: a key that contains another is removed whole.
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    /// This redactor's secrets and `newer`'s: after a key rotation the old
    /// key may still come back in an upstream's words. At most
    /// [`MAX_SECRETS`], the newest kept.
    pub fn merged(&self, newer: &Redactor) -> Redactor {
        let all: Vec<&str> = newer
            .secrets
            .iter()
            .chain(self.secrets.iter())
            .map(String::as_str)
            .take(MAX_SECRETS)
            .collect();
        Redactor::new(all)
    }

    /// `text` without secrets or control characters, trimmed, and at most
    /// [`MAX_UPSTREAM_TEXT`] characters (`…` marks a cut).
    pub fn clean(&self, text: &str) -> String {
        let mut text = text.to_string();
        for s in self.secrets.iter() {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), REDACTED);
            }
        }
        let text = text.trim();
        let mut out: String = text
            .chars()
            .take(MAX_UPSTREAM_TEXT)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.chars().nth(MAX_UPSTREAM_TEXT).is_some() {
            out.push('…');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_every_secret_and_controls_and_caps_the_length() {
        let r = Redactor::new(["sk-live-123456", "sk-live-1234567890", "abc"]);
        assert_eq!(
            r.clean(" invalid key sk-live-1234567890 (sk-live-123456)\r\n\u{1b}[31m "),
            "invalid key [redacted] ([redacted])   [31m"
        );
        assert_eq!(r.clean("abc stays"), "abc stays");
        let long = r.clean(&"é".repeat(1000));
        assert_eq!(long.chars().count(), MAX_UPSTREAM_TEXT + 1);
        assert!(long.ends_with('…'));
        assert_eq!(format!("{r:?}"), "Redactor(2 secrets)");
        let both = r.merged(&Redactor::new(["sk-rotated-999"]));
        assert_eq!(
            both.clean("sk-rotated-999 sk-live-123456"),
            "[redacted] [redacted]"
        );
    }
}
