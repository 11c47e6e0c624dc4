//! The systemd unit in packaging/ is the one operators install: it has the
//! settings the gateway relies on, and `systemd-analyze verify` accepts it
//! (where the tool exists: `.ci/run` installs it).

use std::path::PathBuf;
use std::process::Command;

fn unit() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/hivegate.service");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_unit_has_what_the_gateway_relies_on() {
    let text = unit();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=hivegate",
        "LoadCredential=",
        "MemoryMax=",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "the unit lacks {line}"
        );
    }
}

#[test]
#[cfg_attr(
    missing_systemd,
    ignore = "systemd-analyze is not installed (apt install systemd)"
)]
fn systemd_analyze_verifies_the_unit() {
    // Marked ignored when it was missing at build time (build.rs).
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect("systemd-analyze is missing (apt install systemd)");
    assert!(out.status.success());
    // The unit as installed, but with this build's binary and a
    // configuration that exists.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hivegate.toml");
    std::fs::write(&config, "").unwrap();
    let text = unit().replace(
        "/usr/bin/hivegate serve --config /etc/hivegate/hivegate.toml",
        &format!(
            "{} serve --config {}",
            env!("CARGO_BIN_EXE_hivegate"),
            config.display()
        ),
    );
    let path = dir.path().join("hivegate.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about the machine rather than the unit (no running systemd
    // here, no network-online.target) are not the unit's fault.
    let about_unit: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("hivegate.service") && !l.contains("network-online"))
        .collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn the_packaged_config_is_genconfig_and_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let packaged = std::fs::read_to_string(root.join("packaging/hivegate.toml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .arg("genconfig")
        .output()
        .unwrap();
    assert!(
        packaged == String::from_utf8(out.stdout).unwrap(),
        "packaging/hivegate.toml is not `hivegate genconfig`'s output: regenerate it"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hivegate"))
        .args([
            "check-config",
            root.join("packaging/hivegate.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
