//! JWT sign-in against the real binary, with tokens minted here: HS256
//! (Supabase's legacy secret), RS256, ES256 and EdDSA from a JWKS file, on
//! every surface a token is read (`hello`, `Authorization` at the upgrade,
//! a `bearer.TOKEN` subprotocol, `/mcp`), and the tokens that must fail.

mod common;
use base64::Engine;
use common::*;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const ISS: &str = "https://project.supabase.co/auth/v1";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The keys the tests sign with, and the JWKS the gateway reads.
struct Keys {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    rng: SystemRandom,
}

impl Keys {
    fn new() -> Keys {
        let rng = SystemRandom::new();
        let pem = std::fs::read_to_string(fixture("jwt/rsa-private.pem")).unwrap();
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .unwrap();
        let rsa = RsaKeyPair::from_pkcs8(&der).unwrap();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let ec_doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let ec = EcdsaKeyPair::from_pkcs8(alg, ec_doc.as_ref(), &rng).unwrap();
        let ed_doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(ed_doc.as_ref()).unwrap();
        Keys { rsa, ec, ed, rng }
    }

    /// The JWKS, with or without the EC key.
    fn jwks(&self, with_ec: bool) -> String {
        let rsa: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("jwt/rsa-jwk.json")).unwrap())
                .unwrap();
        let point = self.ec.public_key().as_ref();
        let ec = json!({"kty":"EC","crv":"P-256","kid":"ec-1","alg":"ES256",
                        "x":b64(&point[1..33]),"y":b64(&point[33..65])});
        let ed = json!({"kty":"OKP","crv":"Ed25519","kid":"ed-1","alg":"EdDSA",
                        "x":b64(self.ed.public_key().as_ref())});
        let mut keys = vec![rsa, ed];
        if with_ec {
            keys.push(ec);
        }
        json!({ "keys": keys }).to_string()
    }

    /// A token with `header` and `claims`, signed as its `alg` says.
    fn mint(&self, header: Value, claims: Value) -> String {
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = match header["alg"].as_str().unwrap() {
            "HS256" => hmac(SECRET.as_bytes(), &msg),
            "RS256" => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &self.rng,
                        msg.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                sig
            }
            "ES256" => self
                .ec
                .sign(&self.rng, msg.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed.sign(msg.as_bytes()).as_ref().to_vec(),
            _ => Vec::new(),
        };
        format!("{msg}.{}", b64(&sig))
    }
}

fn hmac(key: &[u8], msg: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, msg.as_bytes()).as_ref().to_vec()
}

/// Claims as Supabase Auth issues them.
fn claims(sub: &str) -> Value {
    json!({"sub":sub,"role":"authenticated","aud":"authenticated","iss":ISS,
           "exp":now() + 3600,"iat":now(),"email":"a@example.org","session_id":"s"})
}

fn gateway(keys: &Keys, dir: &Path) -> Gateway {
    let secret = dir.join("jwt-secret");
    let jwks = dir.join("jwks.json");
    write_secret(&secret, SECRET);
    std::fs::write(&jwks, keys.jwks(true)).unwrap();
    Gateway::start(
        &format!(
            "{NO_RATE_LIMITS}failed_hellos_per_minute = 1000\n[auth]\nmode = \"jwt\"\n\
             jwt_secret_file = {secret:?}\njwks_file = {jwks:?}\njwt_issuer = \"{ISS}\"\n\
             jwt_audience = [\"authenticated\"]\n\
             [[access]]\nroles = [\"authenticated\"]\nrooms = [\"lobby\"]\ncan = [\"join\", \"publish\"]\n"
        ),
        &[],
    )
}

/// Whether `token` signs in with `hello` (a refused one may also end
/// the connection: a token over 8 KiB is not a valid `hello`).
fn signs_in(gw: &Gateway, token: &str) -> bool {
    let mut ws = gw.ws();
    send_json(&mut ws, &json!({"op":"hello","token":token}));
    match ws.read() {
        Ok(tungstenite::Message::Text(t)) => {
            serde_json::from_str::<Value>(&t).unwrap()["ok"] == true
        }
        _ => false,
    }
}

const UUID: &str = "7d3c1a2b-5e6f-4a8b-9c0d-112233445566";

#[test]
fn every_algorithm_signs_in_on_every_surface() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&keys, dir.path());
    // HS256 with Supabase's shape, in `hello`; the role comes along.
    let hs = keys.mint(json!({"alg":"HS256","typ":"JWT"}), claims(UUID));
    let (mut ws, ack) = gw.session(Some(&hs));
    assert_eq!(
        (ack["ok"].clone(), ack["user"].clone()),
        (json!(true), json!(UUID))
    );
    send_json(
        &mut ws,
        &json!({"op":"join","room":"lobby","request_id":"j"}),
    );
    assert_eq!(recv_json(&mut ws)["op"], "joined");
    // RS256 in Authorization at the upgrade.
    let rs = keys.mint(json!({"alg":"RS256","kid":"rsa-1"}), claims("rs-user"));
    let mut ws = gw
        .ws_from(None, &[("Authorization", &format!("Bearer {rs}"))])
        .expect("upgrade");
    send_json(&mut ws, &json!({"op":"hello"}));
    assert_eq!(recv_json(&mut ws)["user"], "rs-user");
    // ES256 in the subprotocol, as a browser would send it.
    let es = keys.mint(json!({"alg":"ES256","kid":"ec-1"}), claims("es-user"));
    let proto = format!("hivegate, bearer.{es}");
    let mut ws = gw
        .ws_from(None, &[("Sec-WebSocket-Protocol", &proto)])
        .expect("upgrade");
    send_json(&mut ws, &json!({"op":"hello"}));
    assert_eq!(recv_json(&mut ws)["user"], "es-user");
    // EdDSA on /mcp.
    let ed = keys.mint(json!({"alg":"EdDSA","kid":"ed-1"}), claims("ed-user"));
    let r = mcp_post(
        gw.addr,
        &format!("Authorization: Bearer {ed}\r\n"),
        MCP_INIT,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // No token at all is no sign-in in jwt mode.
    assert_eq!(gw.session(None).1["ok"], false);
}

#[test]
fn forged_expired_and_misdirected_tokens_are_refused() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&keys, dir.path());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("mallory");
        f(&mut c);
        c
    };
    let hs = json!({"alg":"HS256"});
    let rsa_public = std::fs::read(fixture("jwt/rsa-public.pem")).unwrap();
    let confused = {
        // The RSA public key (which anyone may have) as an HS256 secret.
        let header = json!({"alg":"HS256","kid":"rsa-1"});
        let msg = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims("mallory").to_string().as_bytes())
        );
        format!("{msg}.{}", b64(&hmac(&rsa_public, &msg)))
    };
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("mallory").to_string().as_bytes())
    );
    let tampered = {
        let good = keys.mint(json!({"alg":"RS256","kid":"rsa-1"}), claims("mallory"));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = b64(claims("admin").to_string().as_bytes());
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    let mut big = claims("mallory");
    big["pad"] = json!("x".repeat(9000));
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            keys.mint(hs.clone(), with(&|c| c["exp"] = json!(now() - 120))),
        ),
        (
            "not yet valid",
            keys.mint(hs.clone(), with(&|c| c["nbf"] = json!(now() + 600))),
        ),
        (
            "no expiry",
            keys.mint(
                hs.clone(),
                with(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
        ),
        (
            "wrong issuer",
            keys.mint(
                hs.clone(),
                with(&|c| c["iss"] = json!("https://evil.example/auth/v1")),
            ),
        ),
        (
            "wrong audience",
            keys.mint(hs.clone(), with(&|c| c["aud"] = json!("anon"))),
        ),
        ("alg none", none),
        ("HS/RS confusion", confused),
        (
            "unknown kid",
            keys.mint(json!({"alg":"RS256","kid":"rsa-9"}), claims("mallory")),
        ),
        ("tampered", tampered),
        ("over 8 KiB", keys.mint(hs.clone(), big)),
        ("not a JWT", "abc".to_string()),
    ];
    for (what, token) in &cases {
        assert!(!signs_in(&gw, token), "{what} was accepted");
    }
    // Each was refused as a sign-in (the oversized one as a bad hello).
    // The log is read from the process's stderr: wait for its lines.
    let end = Instant::now() + Duration::from_secs(10);
    while gw.log_text().matches("hello refused").count() < cases.len() - 1 {
        assert!(Instant::now() < end, "{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    for what in [
        "expired",
        "bad signature",
        "unknown kid",
        "wrong issuer",
        "wrong audience",
    ] {
        assert!(gw.log_text().contains(what), "no {what:?} in the log");
    }
    // No token text reaches the log.
    assert!(!gw.log_text().contains(&cases[0].1[..40]));
}

#[test]
fn the_key_set_is_read_again_on_sighup() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&keys, dir.path());
    let es = keys.mint(json!({"alg":"ES256","kid":"ec-1"}), claims("es-user"));
    assert!(signs_in(&gw, &es));
    // The identity provider retires the EC key.
    std::fs::write(dir.path().join("jwks.json"), keys.jwks(false)).unwrap();
    gw.signal(libc::SIGHUP);
    let end = Instant::now() + Duration::from_secs(10);
    while !gw.log_text().contains("configuration reloaded") {
        assert!(Instant::now() < end, "{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!signs_in(&gw, &es));
    let rs = keys.mint(json!({"alg":"RS256","kid":"rsa-1"}), claims("rs-user"));
    assert!(signs_in(&gw, &rs));
}
