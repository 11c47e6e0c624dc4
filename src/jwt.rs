//! JWT sign-in (`auth.mode = "jwt"`): a token signed by an identity
//! provider (Supabase Auth, say) instead of a token in the config file.
//!
//! The signature is checked by `jsonwebtoken` on `ring`; the rest is here
//! because it is where the attacks are. The key is chosen by the token's
//! algorithm family before anything else: HS256 only ever with the secret
//! from `auth.jwt_secret_file`, the asymmetric algorithms only with a key
//! of the same family from `auth.jwks_file`, found by `kid`. So a token
//! that names HS256 cannot be checked against an RSA public key (the
//! classic algorithm confusion), `alg: none` names no family at all, and
//! an unknown `kid` is refused rather than tried against every key.
//! Expiry and not-before are checked here against an injected clock.

use crate::auth::{valid_role, valid_user, Identity, Secret, DEFAULT_ROLE};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::value::RawValue;
use std::path::PathBuf;

/// Longest token read; a longer one is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = crate::protocol::MAX_TOKEN;

/// `[auth]`'s JWT settings, with the key material read.
#[derive(Debug, Clone)]
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
    pub jwks: Option<JwkSet>,
}

impl Default for JwtConfig {
    /// A blank to be filled from the key table (not the defaults).
    fn default() -> Self {
        JwtConfig {
            secret_file: None,
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            user_claim: String::new(),
            roles_claim: String::new(),
            leeway_s: 0,
            secret: None,
            jwks: None,
        }
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
            let text = read_small(path, "auth.jwt_secret_file")?;
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
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
                format!(
                    "auth.jwks_file {}: not a JSON Web Key Set ({{\"keys\":[...]}}): {e}",
                    path.display()
                )
            })?;
            for (i, k) in set.keys.iter().enumerate() {
                if matches!(k.algorithm, AlgorithmParameters::OctetKey(_)) {
                    return Err(format!(
                        "auth.jwks_file {}: key {} is a shared secret (kty \"oct\"); \
                         put an HS256 secret in auth.jwt_secret_file instead",
                        path.display(),
                        i + 1
                    ));
                }
                if let Err(e) = DecodingKey::from_jwk(k) {
                    return Err(format!(
                        "auth.jwks_file {}: key {} cannot be used: {e}",
                        path.display(),
                        i + 1
                    ));
                }
            }
            self.jwks = Some(set);
        }
        Ok(())
    }
}

fn read_small(path: &std::path::Path, key: &str) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_string(&mut std::io::Read::take(f, 1 << 20), &mut text)
        })
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    Ok(text)
}

/// Why a token was refused: a label for the log and the metrics, never
/// the token or its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
    Malformed,
    /// `none`, or a family with no key configured.
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

/// Checks `token` at `now` (seconds since the epoch); on success, who it
/// names.
pub fn verify(cfg: &JwtConfig, token: &str, now: u64) -> Result<Identity, Refused> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refused::TooLarge);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Malformed)?;
    let key = match header.alg {
        Algorithm::HS256 => match &cfg.secret {
            Some(s) => DecodingKey::from_secret(s.expose().as_bytes()),
            None => return Err(Refused::Algorithm),
        },
        Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
            let Some(set) = &cfg.jwks else {
                return Err(Refused::Algorithm);
            };
            let jwk = match &header.kid {
                Some(kid) => set.find(kid).ok_or(Refused::UnknownKid)?,
                // Without a kid, only a set of one key is unambiguous.
                None if set.keys.len() == 1 => &set.keys[0],
                None => return Err(Refused::UnknownKid),
            };
            DecodingKey::from_jwk(jwk).map_err(|_| Refused::Algorithm)?
        }
        _ => return Err(Refused::Algorithm),
    };
    let mut v = Validation::new(header.alg);
    // Time is checked below, against `now`; iss and aud by the library.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    match &cfg.issuer {
        Some(iss) => {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        None => v.iss = None,
    }
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        v.required_spec_claims.insert("aud".into());
    }
    // The claims as raw JSON by name: only the few read here are parsed
    // (a generic JSON tree would cost binary size for nothing).
    type Claims = std::collections::HashMap<String, Box<RawValue>>;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => Refused::Signature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
                Refused::Algorithm
            }
            K::InvalidIssuer => Refused::Issuer,
            K::InvalidAudience => Refused::Audience,
            // An `aud` in the token with no audience configured, or one
            // required and missing.
            K::MissingRequiredClaim(c) if c == "aud" => Refused::Audience,
            K::MissingRequiredClaim(c) if c == "iss" => Refused::Issuer,
            _ => Refused::Malformed,
        }
    })?;
    let claims = &data.claims;
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
    let user: String = claim(&cfg.user_claim)
        .and_then(|raw| serde_json::from_str(raw).ok())
        .filter(|u: &String| valid_user(u))
        .ok_or(Refused::User)?;
    let roles: Vec<String> = match claim(&cfg.roles_claim) {
        None => Vec::new(),
        Some(raw) => match serde_json::from_str::<String>(raw) {
            Ok(one) => vec![one],
            Err(_) => serde_json::from_str::<Vec<Box<RawValue>>>(raw)
                .unwrap_or_default()
                .iter()
                .take(32)
                .filter_map(|r| serde_json::from_str::<String>(r.get()).ok())
                .collect(),
        },
    };
    // Roles that could not be named in a rule are left out, not fatal.
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
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
            verify(&cfg(), &t, NOW).unwrap().roles,
            vec![Box::from("user")]
        );
        let t = hs256(
            h,
            &format!(r#"{{"sub":"a b","exp":{exp}}}"#),
            SECRET.as_bytes(),
        );
        assert_eq!(verify(&cfg(), &t, NOW), Err(Refused::User));
    }
}
