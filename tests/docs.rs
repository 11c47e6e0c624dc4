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
        "UPSTREAM_REJECTED",
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
    // The table under "## Closing" lists each code with the reason the
    // close frame carries, and no code the gateway does not send.
    let ours = std::fs::read_to_string(root().join("docs/PROTOCOL.md")).unwrap();
    let start = ours.find("## Closing").expect("a section on closing");
    let section = &ours[start..];
    let listed: Vec<u16> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| ")?.split(' ').next()?.parse().ok())
        .collect();
    let mut sent = Vec::new();
    for close in hivegate::protocol::Close::ALL {
        if *close == hivegate::protocol::Close::Abnormal {
            continue; // never sent: it counts ends without a close frame
        }
        let row = format!("| {} | {} |", close.code(), close.reason());
        assert!(section.contains(&row), "docs/PROTOCOL.md has no row {row}");
        sent.push(close.code());
    }
    assert_eq!(
        listed, sent,
        "the table lists a code the gateway does not send"
    );
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
