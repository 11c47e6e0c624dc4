//! The shape of the code, checked: imports point only down the layers of
//! the README's module table (nothing below `server` reaches `server` or
//! `config`), and no source file grows past 700 lines.

use std::path::{Path, PathBuf};

/// Layers, top first. A module may import its own layer and those below;
/// the roots (the binary's wiring, the daemon, the fuzz entry points, the
/// fakes the tests and benchmarks share) may import anything, and nothing
/// imports them.
const LAYERS: &[&[&str]] = &[
    &["server"],
    &["config"],
    &["chat", "cluster", "llm", "mcp", "remote"],
    &["hub", "store"],
    &["limit", "pool"],
    &[
        "ops",
        "executor",
        "resilience",
        "access",
        "auth",
        "jwt",
        "ca",
        "stream",
        "clock",
        "redact",
        "upstream_key",
    ],
    &["protocol"],
    &["json"],
];
const ROOTS: &[&str] = &["main", "lib", "daemon", "fuzz", "testkit"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/chat/requests.rs` → `chat`; `src/bin/...` → `bin`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn imports_point_down_and_files_stay_small() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let lines = text.lines().count();
        if lines > 700 {
            wrong.push(format!("{}: {lines} lines (at most 700)", file.display()));
        }
        if module == "bin" || ROOTS.contains(&module.as_str()) {
            continue;
        }
        let Some(own) = rank(&module) else {
            wrong.push(format!("{module}: not in the layers of tests/layout.rs"));
            continue;
        };
        for (i, _) in text.match_indices("crate::") {
            let target: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            match rank(&target) {
                Some(r) if r < own => wrong.push(format!(
                    "{}: {module} imports {target}, a layer above it",
                    file.display()
                )),
                None if ROOTS.contains(&target.as_str()) => {
                    wrong.push(format!("{}: {module} imports {target}", file.display()))
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}
