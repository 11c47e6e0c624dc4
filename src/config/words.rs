//! Configuration for people: the generated configuration file
//! (`hivegate genconfig`) and the "did you mean" for a misspelt key.

use super::keys;

pub(super) fn unknown_key(key: &str) -> String {
    let nearest = keys()
        .map(|k| k.name)
        .filter(|k| !k.starts_with("provider.") && !k.starts_with("access."))
        .map(|k| (edit_distance(k, key), k))
        .min()
        .filter(|(d, _)| *d <= 3);
    if let Some((_, k)) = nearest {
        return format!("unknown key {key}: did you mean {k}?");
    }
    let section = key.split('.').next().unwrap_or(key);
    let close: Vec<&str> = keys()
        .map(|k| k.name)
        .filter(|k| k.strip_prefix(section).is_some_and(|r| r.starts_with('.')))
        .collect();
    // A misspelt section ([providers.kimi], [acess]): the one meant, with
    // the rest of the header as written.
    let nearest_section = keys()
        .filter_map(|k| k.name.split('.').next())
        .filter(|s| *s != section)
        .map(|s| (edit_distance(s, section), s))
        .min()
        .filter(|(d, _)| *d <= 2);
    if let (true, Some((_, meant))) = (close.is_empty(), nearest_section) {
        let header = key.rsplit_once('.').map_or(key, |(h, _)| h);
        let meant_header = format!("{meant}{}", &header[section.len()..]);
        let open = if meant == "access" { "[[" } else { "[" };
        let close = if meant == "access" { "]]" } else { "]" };
        format!(
            "unknown key {key}: this build has no [{section}] section; did you mean {open}{meant_header}{close}?"
        )
    } else if close.is_empty() {
        format!("unknown key {key}: this build has no [{section}] section")
    } else {
        format!(
            "unknown key {key}; keys of [{section}] are: {}",
            close.join(", ")
        )
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A complete configuration file, commented, from [`keys`]: every key with
/// its meaning and default, the optional sections commented out.
pub fn generate() -> String {
    let mut out = String::from(
        "# hivegate configuration (hivegate genconfig). Every key is shown with its\n\
         # default; each may also be set as HIVEGATE_<SECTION>_<KEY> in the environment.\n",
    );
    let mut section = "";
    for key in keys() {
        let (sec, name) = key.name.rsplit_once('.').unwrap_or(("", key.name));
        let optional = sec == "remote"
            || sec == "cluster"
            || sec.starts_with("provider.")
            || sec.starts_with("access.");
        if sec != section {
            section = sec;
            let header = if sec.starts_with("access.") {
                "[access]".to_string()
            } else {
                sec.replace("NAME", "kimi")
            };
            if optional {
                let why = if sec == "remote" {
                    "sync to a Supabase/PostgREST store (without it: local only)"
                } else if sec == "cluster" {
                    "rooms shared with other boxes over NATS (without it: one box alone)"
                } else if sec.starts_with("access.") {
                    "who may do what, where: one [[access]] table per rule, checked in order; \
                     the first that matches decides, and with any rule, what none allows is \
                     denied (README: Access)"
                } else {
                    "an LLM provider (`dialect` says how its API is spoken); one section per provider"
                };
                out.push_str(&format!("\n# {why}\n# [{header}]\n"));
            } else {
                out.push_str(&format!("\n[{header}]\n"));
            }
        }
        let reload = if key.reloadable {
            "; SIGHUP applies it"
        } else {
            ""
        };
        out.push_str(&format!(
            "# {} (default: {}{reload})\n",
            key.meaning,
            key.shown_default()
        ));
        let line = format!(
            "{name} = {}",
            match (key.default, example(key.name)) {
                ("", Some(e)) => e,
                ("", None) => "\"\"",
                (d, _) => d,
            }
        );
        // A default that depends on the environment (the data directory
        // under systemd, the memory limit from the cgroup) stays implicit.
        if optional || key.default.is_empty() || !key.note.is_empty() {
            out.push_str(&format!("# {line}\n"));
        } else {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// What a key without a default looks like when set, where an empty
/// string would mislead (a rule's lists).
fn example(key: &str) -> Option<&'static str> {
    Some(match key {
        "access.N.roles" => "[\"staff\"]",
        "access.N.users" => "[\"alice\"]",
        "access.N.rooms" => "[\"lobby\", \"team-*\", \"dm-{user}-*\"]",
        "access.N.can" => "[\"join\", \"publish\", \"react\"]",
        "access.N.providers" => "[\"kimi\"]",
        "access.N.llm_tokens_per_day" => "200000",
        _ => return None,
    })
}
