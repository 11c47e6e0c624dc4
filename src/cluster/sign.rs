//! Signed bus messages: every box signs what it publishes with its own
//! Ed25519 key, and applies only what is signed by the key it trusts for
//! the node id the message names.
//!
//! NATS permissions cannot stop one box (or anything else that can publish
//! on the prefix's subjects) from claiming another's node id: all publish on
//! the same subjects. With keys, a message that names box A counts only if
//! A's key signed it, so nobody can apply events, skips, beats or sync
//! requests in A's name.
//!
//! The wire form is the JSON body, a newline, and the signature over the
//! body's bytes in unpadded base64url (86 characters). A JSON body never
//! holds a raw newline, so the last one splits the two. Events of one
//! room go several to a message, one per line, under one signature: at
//! 36 µs to sign and 50 µs to check (`hivegate-bench sign`), a signature
//! per event would cost more than the event (see [`MAX_BATCH_BYTES`]).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::collections::HashMap;

/// Most bytes of events under one signature (one NATS message).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Most events under one signature.
pub const MAX_BATCH_EVENTS: usize = 256;

/// What `[cluster]`'s key settings came to, checked (see
/// `ClusterConfig::complete`).
#[derive(Clone, PartialEq)]
pub struct SigningConfig {
    /// This box's key pair, PKCS#8 (as `hivegate genkey` writes it).
    pub pkcs8: Vec<u8>,
    /// The public key trusted for each node id, this box's included.
    pub trusted: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for SigningConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key never reaches a log; the trusted nodes may.
        let mut nodes: Vec<&String> = self.trusted.keys().collect();
        nodes.sort();
        f.debug_struct("SigningConfig")
            .field("trusted", &nodes)
            .finish()
    }
}

impl SigningConfig {
    /// Reads the private key file's text and the `NODE:PUBLIC` entries;
    /// every problem is an error naming the setting.
    pub fn read(node: &str, key_text: &str, entries: &[String]) -> Result<SigningConfig, String> {
        let pkcs8 = STANDARD.decode(key_text.trim()).map_err(|_| {
            "cluster.signing_key_file does not hold a key written by `hivegate genkey`".to_string()
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
            "cluster.signing_key_file does not hold an Ed25519 key (write one with `hivegate genkey`)"
                .to_string()
        })?;
        let mut trusted = HashMap::new();
        for e in entries {
            let (name, public) = e
                .split_once(':')
                .ok_or_else(|| format!("cluster.trusted_keys: {e:?} is not \"NODE:PUBLIC_KEY\""))?;
            let key = URL_SAFE_NO_PAD
                .decode(public)
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| {
                    format!("cluster.trusted_keys: the key of {name:?} is not 43 characters of base64url (as `hivegate genkey` prints it)")
                })?;
            if trusted.insert(name.to_string(), key).is_some() {
                return Err(format!("cluster.trusted_keys names {name:?} twice"));
            }
        }
        let own = pair.public_key().as_ref().to_vec();
        match trusted.get(node) {
            Some(k) if *k != own => {
                return Err(format!(
                    "cluster.trusted_keys gives {node:?} (this box) another key than cluster.signing_key_file's"
                ))
            }
            _ => {
                trusted.insert(node.to_string(), own);
            }
        }
        Ok(SigningConfig { pkcs8, trusted })
    }
}

/// A new key pair: the private key file's text, and the public key as
/// `trusted_keys` names it.
pub fn generate() -> Result<(String, String), String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "no randomness for a key")?;
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "a key that does not read back")?;
    Ok((
        STANDARD.encode(pkcs8.as_ref()),
        URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
    ))
}

/// Signs and checks bus messages.
pub struct Signer {
    pair: Ed25519KeyPair,
    trusted: HashMap<String, Vec<u8>>,
}

/// Why a message did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsigned {
    /// No signature, or not one in form.
    Missing,
    /// A node id no key is trusted for.
    UnknownNode,
    /// The signature is not the named node's.
    Forged,
}

impl Signer {
    pub fn new(cfg: &SigningConfig) -> Option<Signer> {
        Some(Signer {
            pair: Ed25519KeyPair::from_pkcs8(&cfg.pkcs8).ok()?,
            trusted: cfg.trusted.clone(),
        })
    }

    /// `body`, signed: what goes on the bus.
    pub fn sign(&self, body: &str) -> Vec<u8> {
        let sig = self.pair.sign(body.as_bytes());
        let mut out = Vec::with_capacity(body.len() + 88);
        out.extend_from_slice(body.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(URL_SAFE_NO_PAD.encode(sig.as_ref()).as_bytes());
        out
    }

    /// Whether `sig` is `node`'s signature of `body`.
    pub fn check(&self, node: &str, body: &str, sig: Option<&str>) -> Result<(), Unsigned> {
        let sig = sig
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .filter(|s| s.len() == 64)
            .ok_or(Unsigned::Missing)?;
        let key = self.trusted.get(node).ok_or(Unsigned::UnknownNode)?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(body.as_bytes(), &sig)
            .map_err(|_| Unsigned::Forged)
    }
}

/// A message as it came: its body, and its signature if it has one.
pub fn split(text: &str) -> (&str, Option<&str>) {
    match text.rsplit_once('\n') {
        Some((body, sig)) => (body, Some(sig)),
        None => (text, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(node: &str, others: &[String]) -> (Signer, String) {
        let (private, public) = generate().unwrap();
        let cfg = SigningConfig::read(node, &private, others).unwrap();
        (Signer::new(&cfg).unwrap(), format!("{node}:{public}"))
    }

    #[test]
    fn only_the_named_nodes_key_makes_a_message_count() {
        let (a, a_entry) = signer("a", &[]);
        let (mallory, _) = signer("mallory", &[]);
        let (b, _) = signer("b", &[a_entry]);
        let body = r#"{"t":"msg","node":"a"}"#;
        let signed = String::from_utf8(a.sign(body)).unwrap();
        let (got, sig) = split(&signed);
        assert_eq!(got, body);
        assert_eq!(b.check("a", got, sig), Ok(()));
        // The same signature over another body, another node's key, an
        // unknown node, no signature at all.
        assert_eq!(
            b.check("a", r#"{"t":"msg","node":"a","x":1}"#, sig),
            Err(Unsigned::Forged)
        );
        let forged = String::from_utf8(mallory.sign(body)).unwrap();
        assert_eq!(b.check("a", body, split(&forged).1), Err(Unsigned::Forged));
        assert_eq!(b.check("c", body, sig), Err(Unsigned::UnknownNode));
        assert_eq!(b.check("a", body, None), Err(Unsigned::Missing));
        assert_eq!(b.check("a", body, Some("short")), Err(Unsigned::Missing));
    }

    #[test]
    fn keys_and_entries_are_checked() {
        let (private, public) = generate().unwrap();
        assert!(SigningConfig::read("a", "not a key", &[]).is_err());
        assert!(SigningConfig::read("a", &private, &["nocolon".into()]).is_err());
        assert!(SigningConfig::read("a", &private, &["b:short".into()]).is_err());
        let other = generate().unwrap().1;
        let twice = [format!("b:{other}"), format!("b:{other}")];
        assert!(SigningConfig::read("a", &private, &twice).is_err());
        // This box's own entry must be its key.
        assert!(SigningConfig::read("a", &private, &[format!("a:{other}")]).is_err());
        let cfg = SigningConfig::read("a", &private, &[format!("a:{public}")]).unwrap();
        assert_eq!(cfg.trusted.len(), 1);
        assert!(!format!("{cfg:?}").contains(&private[..20]));
    }
}
