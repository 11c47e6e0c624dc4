//! The repository's documents: the protocol is the project's contract, and
//! the licenses the package declares are present.

use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn docs_protocol_is_the_contract() {
    // The repository's copy is the contract now (shared/PROTOCOL.md was its
    // first version and stays frozen); it keeps its title and every error
    // code the server sends.
    let ours = std::fs::read_to_string(root().join("docs/PROTOCOL.md")).unwrap();
    assert!(ours.contains("# hivegate wire protocol, version 1"));
    for code in [
        "INVALID_REQUEST",
        "UNAUTHORIZED",
        "FORBIDDEN",
        "BUDGET_EXCEEDED",
        "RATE_LIMITED",
        "OVER_CAPACITY",
        "LIMIT_EXCEEDED",
        "NOT_FOUND",
        "PROVIDER_UNAVAILABLE",
        "TIMEOUT",
        "INTERNAL_ERROR",
    ] {
        assert!(
            ours.contains(&format!("| `{code}` |")),
            "{code} is not in the table"
        );
    }
}

#[test]
fn every_close_code_the_gateway_sends_is_in_the_contract() {
    let ours = std::fs::read_to_string(root().join("docs/PROTOCOL.md")).unwrap();
    let start = ours
        .find("Close codes:")
        .expect("a paragraph of close codes");
    let para = &ours[start..];
    let para = &para[..para.find("\n\n").unwrap_or(para.len())];
    for close in hivegate::protocol::Close::ALL {
        if *close == hivegate::protocol::Close::Abnormal {
            continue; // never sent: it counts ends without a close frame
        }
        assert!(
            para.contains(&format!("{} ", close.code())),
            "close code {} ({}) is not in docs/PROTOCOL.md",
            close.code(),
            close.reason()
        );
    }
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

#[test]
fn the_readmes_guarded_figures_are_the_baseline() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hivegate-bench"))
        .args(["report", "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
