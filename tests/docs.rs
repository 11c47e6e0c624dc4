//! The repository's documents: the protocol copy is the project's contract
//! (where `shared/` is beside the repository, as in CI), and the licenses
//! the package declares are present.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn docs_protocol_is_the_shared_contract() {
    let ours = std::fs::read_to_string(root().join("docs/PROTOCOL.md")).unwrap();
    match std::fs::read_to_string(root().join("../shared/PROTOCOL.md")) {
        Ok(shared) => assert!(
            ours == shared,
            "docs/PROTOCOL.md differs from shared/PROTOCOL.md: copy it in"
        ),
        Err(_) => eprintln!("docs: no ../shared/PROTOCOL.md beside the repository; not compared"),
    }
    assert!(ours.contains("# hivegate wire protocol, version 1"));
}

#[test]
fn the_declared_licenses_are_present() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    let mit = std::fs::read_to_string(root().join("LICENSE-MIT")).unwrap();
    let apache = std::fs::read_to_string(root().join("LICENSE-APACHE")).unwrap();
    assert!(mit.contains("Permission is hereby granted"));
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0"));
}
