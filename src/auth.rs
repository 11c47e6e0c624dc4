//! Who a session is: tokens from the configuration (or signed JWTs,
//! verified by the `jwt` module above this one) mapped to a user name and
//! its roles.
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
    Jwt,
}

impl AuthMode {
    pub fn label(self) -> &'static str {
        match self {
            AuthMode::Token => "token",
            AuthMode::Open => "open",
            AuthMode::Jwt => "jwt",
        }
    }
}

/// The role of a token entry that names none.
pub const DEFAULT_ROLE: &str = "user";
/// The role of an open-mode session without a token.
pub const GUEST_ROLE: &str = "guest";

/// A session's roles, shared (a token's roles are read once, and every
/// session signed in with it holds the same list).
pub type Roles = std::sync::Arc<[Box<str>]>;

#[derive(Clone)]
pub struct TokenEntry {
    pub user: String,
    pub digest: [u8; 32],
    /// Never empty: [`DEFAULT_ROLE`] when the entry names none.
    pub roles: Roles,
}

/// Who a signed-in session is: a user name and its roles; and, since each
/// sign-in makes its own, which of the session's refusals were logged
/// already (one bit per access rule, bit 0 for "no rule"), so a client
/// that retries is logged once per rule. Shared by the session and its
/// table entry (a reload re-checks every session's rooms).
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: std::rc::Rc<str>,
    pub roles: Roles,
    pub denials_logged: std::cell::Cell<u64>,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Identity) -> bool {
        self.user == other.user && self.roles == other.roles
    }
}

impl Identity {
    pub fn new(user: &str, roles: &[impl AsRef<str>]) -> Identity {
        Identity::with_roles(user, roles.iter().map(|r| Box::from(r.as_ref())).collect())
    }

    pub fn with_roles(user: &str, roles: Roles) -> Identity {
        Identity {
            user: std::rc::Rc::from(user),
            roles,
            denials_logged: std::cell::Cell::new(0),
        }
    }

    /// A guest of open mode: a name no other session has, on this box or
    /// another (random, or from the client's own stable id, so a page
    /// keeps its name across reconnects).
    pub fn guest(client_id: Option<&str>) -> Identity {
        static GUEST: std::sync::LazyLock<Roles> =
            std::sync::LazyLock::new(|| Roles::from([Box::from(GUEST_ROLE)]));
        let bytes: [u8; 6] = match client_id {
            Some(id) => {
                let d = sha256(id.as_bytes());
                [d[0], d[1], d[2], d[3], d[4], d[5]]
            }
            None => {
                let r = crate::resilience::random_u64().to_le_bytes();
                [r[0], r[1], r[2], r[3], r[4], r[5]]
            }
        };
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Identity::with_roles(&format!("guest-{hex}"), GUEST.clone())
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }

    /// True the first time this session is refused by rule `slot`.
    pub fn first_refusal(&self, slot: u32) -> bool {
        let bit = 1u64 << slot.min(63);
        let first = self.denials_logged.get() & bit == 0;
        self.denials_logged.set(self.denials_logged.get() | bit);
        first
    }
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the digest: it is as good as the token for a replay
        // against a misconfigured peer, and logs travel far.
        f.debug_struct("TokenEntry")
            .field("user", &self.user)
            .field("roles", &self.roles)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenParseError {
    Shape,
    User,
    Hex,
    Empty,
    Roles,
}

impl TokenEntry {
    /// `user:token[:roles]` or `user:sha256:HEX[:roles]`, roles separated
    /// by commas. A token holding `:` must be written in the `sha256:`
    /// form (what follows a second colon is read as roles).
    pub fn parse(spec: &str) -> Result<TokenEntry, TokenParseError> {
        let (user, rest) = spec.split_once(':').ok_or(TokenParseError::Shape)?;
        if !valid_user(user) {
            return Err(TokenParseError::User);
        }
        let (digest, roles) = match rest.strip_prefix("sha256:") {
            Some(rest) => {
                let (hex, roles) = rest.split_once(':').unwrap_or((rest, ""));
                (parse_hex32(hex).ok_or(TokenParseError::Hex)?, roles)
            }
            None => {
                let (token, roles) = rest.split_once(':').unwrap_or((rest, ""));
                if token.is_empty() {
                    return Err(TokenParseError::Empty);
                }
                (sha256(token.as_bytes()), roles)
            }
        };
        Ok(TokenEntry {
            user: user.to_string(),
            digest,
            roles: parse_roles(roles)?,
        })
    }
}

/// `staff,ops` → the roles; empty → [`DEFAULT_ROLE`].
fn parse_roles(list: &str) -> Result<Roles, TokenParseError> {
    if list.is_empty() {
        return Ok(Roles::from([Box::from(DEFAULT_ROLE)]));
    }
    list.split(',')
        .map(|r| {
            let r = r.trim();
            valid_role(r)
                .then(|| Box::from(r))
                .ok_or(TokenParseError::Roles)
        })
        .collect()
}

/// Role names: short and plain, like user names.
pub fn valid_role(role: &str) -> bool {
    valid_user(role)
}

/// User names travel in every chat frame; keep them short and plain
/// (64 holds a UUID, the `sub` of a Supabase token).
pub fn valid_user(user: &str) -> bool {
    (1..=64).contains(&user.len())
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

    /// The entry a token belongs to, if any. Every entry is compared.
    pub fn entry_for(&self, token: &str) -> Option<&TokenEntry> {
        let digest = sha256(token.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&e.digest, &digest) && found.is_none() {
                found = Some(e);
            }
        }
        found
    }

    /// The user a token belongs to, if any.
    pub fn user_for(&self, token: &str) -> Option<&str> {
        self.entry_for(token).map(|e| e.user.as_str())
    }

    /// Who a token signs in as, if anyone.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.entry_for(token)
            .map(|e| Identity::with_roles(&e.user, e.roles.clone()))
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
    fn roles_follow_the_token() {
        let e = TokenEntry::parse("alice:tok:staff,ops").unwrap();
        assert_eq!(e.digest, sha256(b"tok"));
        assert_eq!(&*e.roles, [Box::from("staff"), Box::from("ops")]);
        assert_eq!(
            &*TokenEntry::parse("bob:tok").unwrap().roles,
            [Box::from("user")]
        );
        let hex: String = sha256(b"t").iter().map(|b| format!("{b:02x}")).collect();
        let d = TokenEntry::parse(&format!("carol:sha256:{hex}:ops")).unwrap();
        assert_eq!(
            (d.digest, &*d.roles),
            (sha256(b"t"), &[Box::from("ops")][..])
        );
        // A token holding colons goes in the sha256 form; written plain,
        // what follows its first colon is not a role list.
        assert_eq!(
            TokenEntry::parse("carol:a:b:c").unwrap_err(),
            TokenParseError::Roles
        );
        assert_eq!(
            TokenEntry::parse("carol:a:staff,").unwrap_err(),
            TokenParseError::Roles
        );
        let auth = Authenticator::new(vec![e]);
        assert_eq!(
            auth.identify("tok"),
            Some(Identity::new("alice", &["staff", "ops"]))
        );
    }

    #[test]
    fn guests_are_distinct_unless_they_bring_their_id() {
        let (a, b) = (Identity::guest(None), Identity::guest(None));
        assert_ne!(a.user, b.user);
        assert!(a.has_role("guest") && a.user.starts_with("guest-"));
        assert!(valid_user(&a.user));
        assert_eq!(
            Identity::guest(Some("page-1")),
            Identity::guest(Some("page-1"))
        );
        assert_ne!(
            Identity::guest(Some("page-1")),
            Identity::guest(Some("page-2"))
        );
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
        assert_eq!(
            format!("{e:?}"),
            "TokenEntry { user: \"alice\", roles: [\"user\"] }"
        );
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
