//! JWT sign-in (`auth.mode = "jwt"`): a token signed by an identity
//! provider (Supabase Auth, say) instead of a token in the config file.
//!
//! The signatures are checked by `ring` (HMAC-SHA256, RSA PKCS#1 v1.5 with
//! SHA-256, ECDSA P-256, Ed25519), the crypto rustls already brings; this
//! module reads the compact JWS form around them. (The `jsonwebtoken`
//! crate did the same with 94 KB more code, and put the binary over its
//! 2.8 MB budget.)
//!
//! The key is chosen by the token's algorithm before anything else: HS256
//! only ever with the secret from `auth.jwt_secret_file`; RS256, ES256 and
//! EdDSA only with a key of that type from `auth.jwks_file`, found by
//! `kid`. So an HS256 token cannot be checked against an RSA public key
//! (the classic algorithm confusion), `alg: none` has no key at all, and
//! an unknown `kid` is refused rather than tried against every key.
//! Expiry and not-before are checked against an injected clock.

use crate::auth::{valid_role, valid_user, Identity, Secret, DEFAULT_ROLE};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::PathBuf;

/// Longest token read; a longer one is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = crate::protocol::MAX_TOKEN;
/// Most keys read from a key set.
const MAX_KEYS: usize = 64;

/// `[auth]`'s JWT settings, with the key material read.
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    pub secret_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub user_claim: String,
    pub roles_claim: String,
    pub leeway_s: u64,
    /// Read from `secret_file` when the configuration is loaded.
    pub secret: Option<Secret>,
    /// Read from `jwks_file` when the configuration is loaded.
    pub keys: Vec<PublicKey>,
}

/// One verification key of the key set.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicKey {
    pub kid: Option<String>,
    pub key: KeyKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeyKind {
    /// RS256: modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256: the uncompressed point (0x04, x, y).
    P256(Vec<u8>),
    /// EdDSA: the 32-byte public key.
    Ed25519(Vec<u8>),
}

impl KeyKind {
    /// The one `alg` this key verifies.
    fn alg(&self) -> &'static str {
        match self {
            KeyKind::Rsa { .. } => "RS256",
            KeyKind::P256(_) => "ES256",
            KeyKind::Ed25519(_) => "EdDSA",
        }
    }
}

/// A JWK as read: only the members a verification key needs.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

fn b64(field: &Option<String>) -> Result<Vec<u8>, String> {
    let text = field.as_deref().ok_or("a member is missing")?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "a member is not base64url".to_string())
}

impl Jwk {
    /// The key, or why it cannot be one (`Ok(None)`: not for signatures).
    fn key(&self) -> Result<Option<KeyKind>, String> {
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let key = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => KeyKind::Rsa {
                n: b64(&self.n)?,
                e: b64(&self.e)?,
            },
            ("EC", Some("P-256")) => {
                let (x, y) = (b64(&self.x)?, b64(&self.y)?);
                if x.len() != 32 || y.len() != 32 {
                    return Err("a P-256 key's x and y are 32 bytes each".into());
                }
                KeyKind::P256([&[4u8][..], &x, &y].concat())
            }
            ("OKP", Some("Ed25519")) => {
                let x = b64(&self.x)?;
                if x.len() != 32 {
                    return Err("an Ed25519 key's x is 32 bytes".into());
                }
                KeyKind::Ed25519(x)
            }
            ("oct", _) => {
                return Err("a shared secret (kty \"oct\"); put an HS256 secret in \
                            auth.jwt_secret_file instead"
                    .into())
            }
            (kty, crv) => {
                return Err(format!(
                    "kty {kty:?} crv {crv:?} is not one of RSA, EC P-256, OKP Ed25519"
                ))
            }
        };
        if self.alg.as_deref().is_some_and(|a| a != key.alg()) {
            return Err(format!("its alg is not {}", key.alg()));
        }
        Ok(Some(key))
    }
}

impl JwtConfig {
    /// Reads the secret and the key set the settings name; an error says
    /// which file and what is wrong with it.
    pub fn read_keys(&mut self) -> Result<(), String> {
        if self.secret_file.is_none() && self.jwks_file.is_none() {
            return Err("auth.mode = \"jwt\" needs auth.jwt_secret_file (HS256) or \
                 auth.jwks_file (RS256, ES256, EdDSA), or both"
                .into());
        }
        if let Some(path) = &self.secret_file {
            let text = crate::ops::file::read_secret(path, 1 << 20, "auth.jwt_secret_file")?;
            let secret = text.trim();
            if secret.len() < 32 {
                return Err(format!(
                    "auth.jwt_secret_file {}: an HS256 secret must be at least 32 bytes",
                    path.display()
                ));
            }
            self.secret = Some(Secret::new(secret.to_string()));
        }
        if let Some(path) = &self.jwks_file {
            let text = read_small(path, "auth.jwks_file")?;
            self.keys =
                parse_jwks(&text).map_err(|e| format!("auth.jwks_file {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// A JSON Web Key Set's verification keys.
pub fn parse_jwks(text: &str) -> Result<Vec<PublicKey>, String> {
    let set: JwkSet = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON Web Key Set ({{\"keys\":[...]}}): {e}"))?;
    if set.keys.len() > MAX_KEYS {
        return Err(format!("more than {MAX_KEYS} keys"));
    }
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = jwk.key().map_err(|e| format!("key {}: {e}", i + 1))?;
        if let Some(key) = key {
            keys.push(PublicKey {
                kid: jwk.kid.clone(),
                key,
            });
        }
    }
    Ok(keys)
}

/// A secret or key set file's text, at most 1 MiB.
fn read_small(path: &std::path::Path, key: &str) -> Result<String, String> {
    crate::ops::file::read_small(path, 1 << 20)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

/// Why a token was refused: a label for the log and the metrics, never
/// the token or its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
    Malformed,
    /// `none`, another unknown one, or one with no key configured.
    Algorithm,
    UnknownKid,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// No usable user name in the user claim.
    User,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::TooLarge => "too large",
            Refused::Malformed => "malformed",
            Refused::Algorithm => "algorithm not accepted",
            Refused::UnknownKid => "unknown kid",
            Refused::Signature => "bad signature",
            Refused::Expired => "expired",
            Refused::NotYetValid => "not yet valid",
            Refused::Issuer => "wrong issuer",
            Refused::Audience => "wrong audience",
            Refused::User => "no valid user claim",
        }
    }
}

/// The JOSE header: what picks the key. A header naming extensions the
/// verifier must understand (`crit`) is refused, as RFC 7515 asks.
#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<Box<RawValue>>,
}

/// Checks `token` at `now` (seconds since the epoch); on success, who it
/// names.
pub fn verify(cfg: &JwtConfig, token: &str, now: u64) -> Result<Identity, Refused> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refused::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| Refused::Malformed);
    let header: Header = serde_json::from_slice(&decode(h64)?).map_err(|_| Refused::Malformed)?;
    if header.crit.is_some() {
        return Err(Refused::Algorithm);
    }
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    let sig = decode(s64)?;
    check_signature(cfg, &header, signed, &sig)?;
    // Only now, signed, are the claims read: as raw JSON by name, parsing
    // just the few used here.
    let claims: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(&decode(p64)?).map_err(|_| Refused::Malformed)?;
    let claim = |name: &str| claims.get(name).map(|raw| raw.get());
    let number = |name: &str| claim(name).and_then(|raw| serde_json::from_str::<f64>(raw).ok());
    let leeway = cfg.leeway_s as f64;
    // A token without an expiry would be good for ever.
    match number("exp") {
        Some(exp) if exp + leeway >= now as f64 => {}
        _ => return Err(Refused::Expired),
    }
    if claim("nbf").is_some() {
        match number("nbf") {
            Some(nbf) if nbf <= now as f64 + leeway => {}
            _ => return Err(Refused::NotYetValid),
        }
    }
    if let Some(iss) = &cfg.issuer {
        let theirs = claim("iss").and_then(|raw| serde_json::from_str::<String>(raw).ok());
        if theirs.as_ref() != Some(iss) {
            return Err(Refused::Issuer);
        }
    }
    if !cfg.audience.is_empty() {
        let theirs = strings(claim("aud"));
        if !theirs.iter().any(|a| cfg.audience.contains(a)) {
            return Err(Refused::Audience);
        }
    }
    let user: String = claim(&cfg.user_claim)
        .and_then(|raw| serde_json::from_str(raw).ok())
        .filter(|u: &String| valid_user(u))
        .ok_or(Refused::User)?;
    // Roles that could not be named in a rule are left out, not fatal.
    let roles = strings(claim(&cfg.roles_claim));
    let mut roles: Vec<&str> = roles
        .iter()
        .map(String::as_str)
        .filter(|r| valid_role(r))
        .collect();
    if roles.is_empty() {
        roles.push(DEFAULT_ROLE);
    }
    Ok(Identity::new(&user, &roles))
}

/// A claim that is a string or a list of strings (`aud`, roles): its
/// strings, at most 32.
fn strings(raw: Option<&str>) -> Vec<String> {
    let Some(raw) = raw else {
        return Vec::new();
    };
    if let Ok(one) = serde_json::from_str::<String>(raw) {
        return vec![one];
    }
    serde_json::from_str::<Vec<Box<RawValue>>>(raw)
        .unwrap_or_default()
        .iter()
        .take(32)
        .filter_map(|r| serde_json::from_str::<String>(r.get()).ok())
        .collect()
}

/// The signature over `signed` with the key the header's `alg` and `kid`
/// pick, and only that key.
fn check_signature(
    cfg: &JwtConfig,
    header: &Header,
    signed: &[u8],
    sig: &[u8],
) -> Result<(), Refused> {
    if header.alg == "HS256" {
        let secret = cfg.secret.as_ref().ok_or(Refused::Algorithm)?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose().as_bytes());
        return ring::hmac::verify(&key, signed, sig).map_err(|_| Refused::Signature);
    }
    if !["RS256", "ES256", "EdDSA"].contains(&header.alg.as_str()) || cfg.keys.is_empty() {
        return Err(Refused::Algorithm);
    }
    let key = match &header.kid {
        Some(kid) => cfg
            .keys
            .iter()
            .find(|k| k.kid.as_ref() == Some(kid))
            .ok_or(Refused::UnknownKid)?,
        // Without a kid, only a set of one key is unambiguous.
        None if cfg.keys.len() == 1 => &cfg.keys[0],
        None => return Err(Refused::UnknownKid),
    };
    if key.key.alg() != header.alg {
        return Err(Refused::Algorithm);
    }
    let ok = match &key.key {
        KeyKind::Rsa { n, e } => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
            .is_ok(),
        KeyKind::P256(point) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signed, sig)
            .is_ok(),
        KeyKind::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
            .verify(signed, sig)
            .is_ok(),
    };
    ok.then_some(()).ok_or(Refused::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn hs256(header: &str, claims: &str, secret: &[u8]) -> String {
        let msg = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = ring::hmac::sign(&key, msg.as_bytes());
        format!("{msg}.{}", b64(sig.as_ref()))
    }

    fn cfg() -> JwtConfig {
        JwtConfig {
            user_claim: "sub".into(),
            roles_claim: "role".into(),
            leeway_s: 30,
            secret: Some(Secret::new(SECRET.into())),
            ..JwtConfig::default()
        }
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_supabase_shaped_hs256_token_signs_in() {
        let t = hs256(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &format!(
                r#"{{"sub":"7d3c1a2b-0000-4000-8000-00000000abcd","role":"authenticated","aud":"authenticated","exp":{},"iat":{NOW}}}"#,
                NOW + 3600
            ),
            SECRET.as_bytes(),
        );
        let mut c = cfg();
        c.audience = vec!["authenticated".into()];
        let who = verify(&c, &t, NOW).unwrap();
        assert_eq!(&*who.user, "7d3c1a2b-0000-4000-8000-00000000abcd");
        assert!(who.has_role("authenticated"));
    }

    #[test]
    fn time_issuer_audience_and_tampering_are_checked() {
        let claims = |extra: &str| format!(r#"{{"sub":"alice","exp":{}{extra}}}"#, NOW + 60);
        let h = r#"{"alg":"HS256"}"#;
        let ok = hs256(h, &claims(""), SECRET.as_bytes());
        assert!(verify(&cfg(), &ok, NOW).is_ok());
        // Expired, within and past the leeway.
        assert!(verify(&cfg(), &ok, NOW + 80).is_ok());
        assert_eq!(verify(&cfg(), &ok, NOW + 91), Err(Refused::Expired));
        let no_exp = hs256(h, r#"{"sub":"alice"}"#, SECRET.as_bytes());
        assert_eq!(verify(&cfg(), &no_exp, NOW), Err(Refused::Expired));
        let later = hs256(
            h,
            &claims(&format!(r#","nbf":{}"#, NOW + 300)),
            SECRET.as_bytes(),
        );
        assert_eq!(verify(&cfg(), &later, NOW), Err(Refused::NotYetValid));
        let mut c = cfg();
        c.issuer = Some("https://x.supabase.co/auth/v1".into());
        let wrong_iss = hs256(h, &claims(r#","iss":"https://evil""#), SECRET.as_bytes());
        assert_eq!(verify(&c, &wrong_iss, NOW), Err(Refused::Issuer));
        assert_eq!(verify(&c, &ok, NOW), Err(Refused::Issuer));
        let mut c = cfg();
        c.audience = vec!["authenticated".into()];
        let wrong_aud = hs256(h, &claims(r#","aud":"anon""#), SECRET.as_bytes());
        assert_eq!(verify(&c, &wrong_aud, NOW), Err(Refused::Audience));
        // A changed payload under the old signature.
        let mut parts: Vec<String> = ok.split('.').map(String::from).collect();
        parts[1] = b64(claims("").replace("alice", "admin").as_bytes());
        assert_eq!(
            verify(&cfg(), &parts.join("."), NOW),
            Err(Refused::Signature)
        );
        let other = hs256(h, &claims(""), b"another-secret-of-at-least-32-bytes!");
        assert_eq!(verify(&cfg(), &other, NOW), Err(Refused::Signature));
    }

    #[test]
    fn none_oversized_and_junk_are_refused() {
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(format!(r#"{{"sub":"alice","exp":{}}}"#, NOW + 60).as_bytes())
        );
        assert!(matches!(
            verify(&cfg(), &none, NOW),
            Err(Refused::Malformed | Refused::Algorithm)
        ));
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(verify(&cfg(), &big, NOW), Err(Refused::TooLarge));
        for junk in ["", "a.b", "a.b.c", "...", "\u{0}.\u{0}.\u{0}"] {
            assert!(verify(&cfg(), junk, NOW).is_err(), "{junk:?}");
        }
        // RS256 named, but no key set configured.
        let rs = hs256(r#"{"alg":"RS256","kid":"k1"}"#, r#"{"sub":"a"}"#, b"x");
        assert_eq!(verify(&cfg(), &rs, NOW), Err(Refused::Algorithm));
    }

    #[test]
    fn roles_come_from_a_string_or_an_array() {
        let h = r#"{"alg":"HS256"}"#;
        let exp = NOW + 60;
        let t = hs256(
            h,
            &format!(r#"{{"sub":"bob","exp":{exp},"role":["staff","ops","bad role"]}}"#),
            SECRET.as_bytes(),
        );
        let who = verify(&cfg(), &t, NOW).unwrap();
        assert_eq!(who, Identity::new("bob", &["staff", "ops"]));
        let t = hs256(
            h,
            &format!(r#"{{"sub":"bob","exp":{exp}}}"#),
            SECRET.as_bytes(),
        );
        assert_eq!(
            &*verify(&cfg(), &t, NOW).unwrap().roles,
            [Box::from("user")]
        );
        let t = hs256(
            h,
            &format!(r#"{{"sub":"a b","exp":{exp}}}"#),
            SECRET.as_bytes(),
        );
        assert_eq!(verify(&cfg(), &t, NOW), Err(Refused::User));
    }

    #[test]
    fn key_sets_are_read_strictly_and_keys_keep_to_their_algorithm() {
        let ed = r#"{"kty":"OKP","crv":"Ed25519","kid":"e","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let keys = parse_jwks(&format!(r#"{{"keys":[{ed}]}}"#)).unwrap();
        assert!(matches!(keys[0].key, KeyKind::Ed25519(_)));
        for bad in [
            "[]",
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"short"}]}"#,
            r#"{"keys":[{"kty":"RSA","n":"AQAB"}]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"RS256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
        ] {
            assert!(parse_jwks(bad).is_err(), "{bad}");
        }
        // An encryption key is not a verification key.
        let enc = ed.replace("\"kid\"", "\"use\":\"enc\",\"kid\"");
        assert!(parse_jwks(&format!(r#"{{"keys":[{enc}]}}"#))
            .unwrap()
            .is_empty());
        // A token naming the Ed25519 key's kid with another algorithm, or
        // HS256 with a kid (the secret is the only HS256 key), fails.
        let mut c = cfg();
        c.keys = keys;
        let claims = format!(r#"{{"sub":"a","exp":{}}}"#, NOW + 60);
        let rs = hs256(r#"{"alg":"RS256","kid":"e"}"#, &claims, b"x");
        assert_eq!(verify(&c, &rs, NOW), Err(Refused::Algorithm));
        let hs = hs256(r#"{"alg":"HS256","kid":"e"}"#, &claims, b"not-the-secret");
        assert_eq!(verify(&c, &hs, NOW), Err(Refused::Signature));
        let crit = hs256(
            r#"{"alg":"HS256","crit":["exp"]}"#,
            &claims,
            SECRET.as_bytes(),
        );
        assert_eq!(verify(&c, &crit, NOW), Err(Refused::Algorithm));
        let good = hs256(r#"{"alg":"HS256"}"#, &claims, SECRET.as_bytes());
        assert!(verify(&c, &good, NOW).is_ok());
        assert!(verify(&c, &format!("{good}="), NOW).is_err());
        assert!(verify(&c, &format!("{good}.x"), NOW).is_err());
    }
}
