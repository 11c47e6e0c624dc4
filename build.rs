//! Stamps the git commit into the binary so `hivegate --version` names exactly
//! what is running on a device.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    // Not HIVEGATE_*: `cargo run` passes this to the process too, and the
    // configuration reads that prefix.
    println!("cargo:rustc-env=BUILD_GIT_COMMIT={commit}");
    pack_relocations();
    drop_unwind_tables();
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

/// A position-independent binary carries a relocation for every pointer in
/// its read-only data: about 130 KB of `.rela.dyn`. Packed relative
/// relocations (DT_RELR) store the same in a few KB. They need glibc 2.36
/// (Debian 12) at run time; building for an older system, set
/// `BUILD_NO_RELR=1`.
fn pack_relocations() {
    println!("cargo:rerun-if-env-changed=BUILD_NO_RELR");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let off = std::env::var("BUILD_NO_RELR").is_ok_and(|v| v == "1");
    if os == "linux" && env == "gnu" && !off {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

fn drop_unwind_tables() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // Release builds abort on panic: nothing unwinds, and the stripped
    // binary has no names for a backtrace anyway. The unwind tables
    // (`.eh_frame`, about 250 KB) and their lookup table (`.eh_frame_hdr`,
    // 38 KB) are left out, by a linker script that only adds a discard to
    // the default layout. Debug and test builds unwind, and keep both.
    if std::env::var("PROFILE").as_deref() == Ok("release") && os == "linux" {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
        if let Ok(out) = std::env::var("OUT_DIR") {
            let script = std::path::Path::new(&out).join("no-unwind-tables.ld");
            let text = "SECTIONS { /DISCARD/ : { *(.eh_frame) } } INSERT AFTER .text;\n";
            if std::fs::write(&script, text).is_ok() {
                println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
            }
        }
    }
}
