//! The shape of the code, checked against the README's module table (the
//! one place it is written): every import is one the importing module's
//! row allows, no two files of a module import each other in a circle,
//! and no source file grows past 700 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What a row of the table lets its modules import.
enum May {
    Anything,
    /// These modules; with `and_below`, also what each of them may
    /// import ("`x` and below").
    These(Vec<String>, bool),
    /// Every module of the rows under this one.
    Below,
}

/// The README's module table, top row first: each row's modules and what
/// they may import.
fn table() -> Vec<(Vec<String>, May)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut rows = Vec::new();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with("| module |"));
    lines.next();
    lines.next();
    for line in lines.take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let names = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|n| {
                    n.split('/')
                        .next()
                        .unwrap()
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let rule = cells[2].trim();
        let may = match rule {
            "everything" | "the library" => May::Anything,
            "below" | "all below" => May::Below,
            "nothing" => May::These(Vec::new(), false),
            r if !names(r).is_empty() => May::These(names(r), r.ends_with("and below")),
            other => panic!("README module table: cannot read {other:?}"),
        };
        rows.push((names(cells[0]), may));
    }
    assert!(rows.len() > 5, "README: the module table was not found");
    rows
}

/// Every module each module may import, from [`table`]: `None` for one
/// that may import anything.
fn allowed(rows: &[(Vec<String>, May)]) -> BTreeMap<String, Option<BTreeSet<String>>> {
    fn of(rows: &[(Vec<String>, May)], i: usize) -> Option<BTreeSet<String>> {
        match &rows[i].1 {
            May::Anything => None,
            May::Below => Some(rows[i + 1..].iter().flat_map(|r| r.0.clone()).collect()),
            May::These(names, and_below) => {
                let mut all = BTreeSet::new();
                for n in names {
                    all.insert(n.clone());
                    let j = rows
                        .iter()
                        .position(|r| r.0.contains(n))
                        .unwrap_or_else(|| {
                            panic!("README module table: {n} is named but has no row")
                        });
                    if *and_below {
                        all.extend(of(rows, j).unwrap_or_default());
                    }
                }
                Some(all)
            }
        }
    }
    let mut out = BTreeMap::new();
    for (i, (names, _)) in rows.iter().enumerate() {
        for n in names {
            out.insert(n.clone(), of(rows, i));
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

/// The identifiers that follow `prefix` in `text`.
fn after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    text.match_indices(prefix).map(move |(i, _)| {
        text[i + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    })
}

#[test]
fn imports_follow_the_readmes_module_table_and_files_stay_small() {
    let src = root().join("src");
    let may = allowed(&table());
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
        if module == "lib" {
            continue;
        }
        let Some(rule) = may.get(&module) else {
            wrong.push(format!("{module}: no row in the README's module table"));
            continue;
        };
        for target in after(&text, "crate::").collect::<BTreeSet<_>>() {
            if target == module {
                continue;
            }
            let Some(target_rule) = may.get(&target) else {
                continue;
            };
            let fine = match rule {
                None => target_rule.is_some(),
                Some(set) => set.contains(&target),
            };
            if !fine {
                wrong.push(format!(
                    "{}: {module} imports {target}, which its row of the README's module table does not allow",
                    file.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// Within a module, the files that `super::` reaches form no circle (a
/// file's parent module aside, which declares it).
#[test]
fn no_two_files_of_a_module_import_each_other_in_a_circle() {
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    // Each file's siblings, by name, that it reaches through `super::`.
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_string_lossy();
        if name == "mod" {
            continue;
        }
        let dir = file.parent().unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        let reached = after(&text, "super::")
            .map(|n| dir.join(format!("{n}.rs")))
            .filter(|p| p != file && files.contains(p))
            .collect();
        edges.insert(file.clone(), reached);
    }
    fn circle(
        at: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        path: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(i) = path.iter().position(|p| p == at) {
            return Some(path[i..].to_vec());
        }
        if !done.insert(at.clone()) {
            return None;
        }
        path.push(at.clone());
        for next in edges.get(at).into_iter().flatten() {
            if let Some(c) = circle(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for file in edges.keys() {
        if let Some(c) = circle(file, &edges, &mut Vec::new(), &mut done) {
            let names: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
            panic!(
                "files import each other in a circle: {}",
                names.join(" -> ")
            );
        }
    }
}
