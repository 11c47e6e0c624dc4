//! Support for the integration tests and the benchmarks, which both start
//! the real binary against fakes: not part of the gateway (it is never
//! called from it, and the release binary leaves it out).

pub mod fake_openai;

/// A copy of the secret `fixtures/REL` (a key, a credential) that only
/// its owner may read, as the gateway requires of secrets: a checkout
/// leaves the fixtures readable by everyone. One copy per process.
pub fn secret_fixture(rel: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("hivegate-secrets-{}", std::process::id()));
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("a directory for secret fixtures");
    }
    crate::ops::file::private_copy(&root.join("fixtures").join(rel), &path)
        .expect("a secret fixture");
    path
}
