//! Who a session is: tokens from the configuration mapped to user names.
//!
//! Only SHA-256 digests of tokens are kept in memory, and a presented token
//! is compared against every configured digest without an early exit, so
//! neither a memory dump nor response timing gives a token away.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    #[default]
    Token,
    Open,
}

/// `[auth]`.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The mode in force after validation: `Open` also when no tokens are
    /// configured and the listen address is loopback.
    pub mode: AuthMode,
    /// True when open mode was chosen because no tokens were configured,
    /// which deserves a warning at start-up.
    pub implicit_open: bool,
    pub tokens: Vec<TokenEntry>,
}

#[derive(Clone)]
pub struct TokenEntry {
    pub user: String,
    pub digest: [u8; 32],
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the digest: it is as good as the token for a replay
        // against a misconfigured peer, and logs travel far.
        f.debug_struct("TokenEntry")
            .field("user", &self.user)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenParseError {
    Shape,
    User,
    Hex,
    Empty,
}

impl TokenEntry {
    /// `user:token` or `user:sha256:HEX`.
    pub fn parse(spec: &str) -> Result<TokenEntry, TokenParseError> {
        let (user, rest) = spec.split_once(':').ok_or(TokenParseError::Shape)?;
        if !valid_user(user) {
            return Err(TokenParseError::User);
        }
        let digest = match rest.strip_prefix("sha256:") {
            Some(hex) => parse_hex32(hex).ok_or(TokenParseError::Hex)?,
            None if rest.is_empty() => return Err(TokenParseError::Empty),
            None => sha256(rest.as_bytes()),
        };
        Ok(TokenEntry {
            user: user.to_string(),
            digest,
        })
    }
}

/// User names travel in every chat frame; keep them short and plain.
pub fn valid_user(user: &str) -> bool {
    (1..=32).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Compares two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// The configured tokens, ready to check.
pub struct Authenticator {
    entries: Vec<TokenEntry>,
}

impl Authenticator {
    pub fn new(entries: Vec<TokenEntry>) -> Authenticator {
        Authenticator { entries }
    }

    /// The user a token belongs to, if any. Every entry is compared.
    pub fn user_for(&self, token: &str) -> Option<&str> {
        let digest = sha256(token.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&e.digest, &digest) && found.is_none() {
                found = Some(e.user.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_digest_entries_match_the_same_token() {
        let hex: String = sha256(b"tok2").iter().map(|b| format!("{b:02x}")).collect();
        let auth = Authenticator::new(vec![
            TokenEntry::parse("alice:tok1").unwrap(),
            TokenEntry::parse(&format!("bob:sha256:{hex}")).unwrap(),
        ]);
        assert_eq!(auth.user_for("tok1"), Some("alice"));
        assert_eq!(auth.user_for("tok2"), Some("bob"));
        assert_eq!(auth.user_for("tok3"), None);
        assert_eq!(auth.user_for(""), None);
    }

    #[test]
    fn a_token_may_contain_colons() {
        let e = TokenEntry::parse("carol:a:b:c").unwrap();
        assert_eq!(e.digest, sha256(b"a:b:c"));
    }

    #[test]
    fn bad_entries_are_refused() {
        assert_eq!(
            TokenEntry::parse("nocolon").unwrap_err(),
            TokenParseError::Shape
        );
        assert_eq!(
            TokenEntry::parse(":tok").unwrap_err(),
            TokenParseError::User
        );
        assert_eq!(
            TokenEntry::parse("a b:tok").unwrap_err(),
            TokenParseError::User
        );
        assert_eq!(TokenEntry::parse("a:").unwrap_err(), TokenParseError::Empty);
        assert_eq!(
            TokenEntry::parse("a:sha256:abc").unwrap_err(),
            TokenParseError::Hex
        );
    }

    #[test]
    fn debug_output_hides_the_digest() {
        let e = TokenEntry::parse("alice:tok1").unwrap();
        assert_eq!(format!("{e:?}"), "TokenEntry { user: \"alice\" }");
    }
}

/// A secret from the configuration (an API key). It has no `Display`, and
/// its `Debug` shows nothing of it: the only way to the value is
/// [`Secret::expose`], at the one place that sends it upstream.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
