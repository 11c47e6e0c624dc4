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
    strip_symbols();
    order_text();
    find_test_tools();
    pack_pages();
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
    // Release builds abort on panic: nothing unwinds, and the stripped
    // binary has no names for a backtrace anyway. The unwind tables
    // (`.eh_frame`, about 250 KB) and their lookup table (`.eh_frame_hdr`,
    // 38 KB) are left out, by a linker script that only adds a discard to
    // the default layout. Debug and test builds unwind, and keep both.
    if is_release_linux() {
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

fn is_release_linux() -> bool {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    std::env::var("PROFILE").as_deref() == Ok("release") && os == "linux"
}

/// Release binaries carry no symbol table (about 500 KB). The linker drops
/// it here rather than `strip = true` in the profile, because the profile
/// is part of every crate's symbol hashes: `.ci/text-order` needs a build
/// with symbols whose names match the shipped one's, and gets it with
/// `BUILD_KEEP_SYMBOLS=1`.
fn strip_symbols() {
    println!("cargo:rerun-if-env-changed=BUILD_KEEP_SYMBOLS");
    let keep = std::env::var("BUILD_KEEP_SYMBOLS").is_ok_and(|v| v == "1");
    if is_release_linux() && !keep {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
    }
}

/// The kernel maps a program's code in 64 KiB windows around each page it
/// touches, so code that start-up and a session run, scattered over the
/// whole binary, made nearly all 2 MB of it resident. `packaging/text-order.txt`
/// (written by `.ci/text-order`) lists those functions; the linker puts
/// them first, together, and the rest stays on disk until something calls
/// it. Names missing from the list cost nothing but their place.
///
/// `--symbol-ordering-file` is an LLD option: it is used where Rust links
/// with its own LLD (x86_64 Linux, the default since Rust 1.90).
/// `BUILD_NO_TEXT_ORDER=1` turns it off, e.g. with another linker.
fn order_text() {
    println!("cargo:rerun-if-env-changed=BUILD_NO_TEXT_ORDER");
    println!("cargo:rerun-if-changed=packaging/text-order.txt");
    let off = std::env::var("BUILD_NO_TEXT_ORDER").is_ok_and(|v| v == "1");
    let target = std::env::var("TARGET").unwrap_or_default();
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let list = std::path::Path::new(&dir).join("packaging/text-order.txt");
    if is_release_linux() && target == "x86_64-unknown-linux-gnu" && !off && list.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Tests that drive an outside tool (Autobahn, nats-server, the MCP SDKs,
/// Chromium, systemd, strace, HAProxy, promtool) are marked ignored when the tool is missing, so that
/// cargo's own summary says so ("ignored, nats-server is not installed
/// ...") instead of counting them as passed. `REQUIRE_<TOOL>=1`, as
/// `.ci/run` sets, keeps them in: there a missing tool is a failure.
///
/// Looked for when this script runs: on the first build, and again after
/// a commit (`.git/HEAD`) or a change of `PATH` or a `REQUIRE_` variable.
/// After installing a tool in between, `touch build.rs`.
fn find_test_tools() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
    };
    let wstest = std::env::var_os("WSTEST")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/autobahn/bin/wstest"));
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    // (cfg set when missing, the variable that requires it, found)
    let tools = [
        ("missing_autobahn", "REQUIRE_AUTOBAHN", wstest.exists()),
        ("missing_nats", "REQUIRE_NATS", on_path("nats-server")),
        (
            "missing_mcp_python",
            "REQUIRE_MCP",
            root.join("target/mcp-venv/bin/python").exists(),
        ),
        (
            "missing_mcp_typescript",
            "REQUIRE_MCP",
            root.join("tests/mcp/node_modules/@modelcontextprotocol/sdk")
                .exists(),
        ),
        (
            "missing_browser",
            "REQUIRE_BROWSER",
            chromium && root.join("tests/web/node_modules/playwright-core").exists(),
        ),
        (
            "missing_systemd",
            "REQUIRE_SYSTEMD",
            on_path("systemd-analyze"),
        ),
        ("missing_haproxy", "REQUIRE_HAPROXY", on_path("haproxy")),
        ("missing_promtool", "REQUIRE_PROMTOOL", on_path("promtool")),
        (
            "missing_strace",
            "REQUIRE_STRACE",
            on_path("strace") && on_path("systemd-analyze"),
        ),
    ];
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=WSTEST");
    for (cfg, require, found) in tools {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo:rerun-if-env-changed={require}");
        let required = std::env::var(require).is_ok_and(|v| v == "1");
        if !found && !required {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}

/// The web pages go into the binary without their indentation, comment
/// lines, blank lines, aligned end-of-line comments (`code;   // why`), and,
/// inside `<script>` and `<style>`, the line breaks after `;` and `{`, which
/// mean nothing there; in `<style>` also the line breaks after `}` and
/// the spaces CSS does not need (see `tighten_css`). 12 KB of 55 go: the
/// sources stay readable and the binary inside its size budget. Safe for
/// these pages: no template literal or `<pre>` in them spans lines (a
/// multi-line one would lose its indentation or its line breaks), a comment
/// line is only a line that starts with one, and a line that holds `//` or
/// `/*` anywhere (a URL, an end-of-line comment) keeps its line break.
fn pack_pages() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for page in ["index.html", "ops.html"] {
        let source = format!("src/web/{page}");
        println!("cargo:rerun-if-changed={source}");
        let text = std::fs::read_to_string(&source).expect("the web pages are in src/web");
        let mut packed = String::with_capacity(text.len());
        let (mut in_comment, mut in_code, mut in_style) = (false, false, false);
        for line in text.lines() {
            let line = line.trim_start();
            if in_comment {
                in_comment = !line.contains("*/");
                continue;
            }
            if line.starts_with("/*") {
                in_comment = !line.contains("*/");
                continue;
            }
            if line.is_empty() || line.starts_with("//") {
                continue;
            }
            if line.starts_with("</script") || line.starts_with("</style") {
                (in_code, in_style) = (false, false);
            }
            let line = match line.find("  // ") {
                Some(at) if in_code => line[..at].trim_end(),
                _ => line,
            };
            let line = if in_style {
                tighten_css(line)
            } else {
                line.to_string()
            };
            packed.push_str(&line);
            let joins = in_code
                && (line.ends_with(';') || line.ends_with('{') || in_style && line.ends_with('}'))
                && !line.contains("//")
                && !line.contains("/*");
            if !joins {
                packed.push('\n');
            }
            if line.starts_with("<script") || line.starts_with("<style") {
                (in_code, in_style) = (true, line.starts_with("<style"));
            }
        }
        std::fs::write(out.join(page), packed).expect("OUT_DIR is writable");
    }
}

/// A line of CSS without the spaces it does not need: after `:`, `;`, `,`,
/// `{` and another space, before `{` and `}`; quoted strings stay as they
/// are. (A space after `:` is never a selector's: a pseudo-class's colon
/// has none. The pages have no unquoted `url()`.)
fn tighten_css(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quote = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ' ' && out.ends_with([':', ';', ',', '{', ' ']) => continue,
            None if (c == '{' || c == '}') && out.ends_with(' ') => {
                out.pop();
            }
            None => {}
        }
        out.push(c);
    }
    out
}
