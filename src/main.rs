//! `hivegate`: a small single-threaded WebSocket gateway for edge
//! appliances. This file reads the command line and hands over; the
//! gateway itself starts in `daemon::run`.

use hivegate::config::Config;
use hivegate::{daemon, ops, store, VERSION};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
hivegate: a small WebSocket gateway for chat and LLM traffic on edge devices

Usage:
  hivegate serve [--config FILE] [--listen ADDR] [--credentials-dir DIR]
                                    run the gateway (no FILE: embedded defaults)
  hivegate check-config [--credentials-dir DIR] [--config] FILE
                                    validate a configuration file and exit
  hivegate genconfig                print a complete, commented configuration
  hivegate backup --out FILE [--config FILE]
                                    copy the live database, consistently
  hivegate usage [--since DATE] [--user NAME] [--config FILE]
                                    LLM tokens per day, user and provider
  hivegate genkey NODE --out FILE   write a cluster box's signing key
  hivegate --version                print the version and git commit
  hivegate help [COMMAND]           show help

Every setting can also come from the environment: [server] listen is
HIVEGATE_SERVER_LISTEN, and the environment wins. See README.md for all keys.
";

/// The variable `serve --listen` sets.
const LISTEN_VAR: &str = "HIVEGATE_SERVER_LISTEN";
/// The variable `--credentials-dir` sets: the directory systemd names in
/// it for a unit's credentials, which paths in the file may name.
const CREDENTIALS_VAR: &str = "CREDENTIALS_DIRECTORY";

const SERVE_USAGE: &str = "\
Usage: hivegate serve [--config FILE] [--listen ADDR] [--credentials-dir DIR]

Runs the gateway in the foreground, logging to stderr. Without --config it
uses the embedded defaults: listen on 127.0.0.1:8080, data under
./hivegate-data (or $STATE_DIRECTORY under systemd), open mode (no tokens).
SIGTERM or SIGINT drains and exits 0; a second signal exits at once.

Options:
  -c, --config FILE   the TOML configuration file
  -l, --listen ADDR   the address and port to serve on (server.listen;
                      wins over the file and HIVEGATE_SERVER_LISTEN)
  --credentials-dir DIR
                      what $CREDENTIALS_DIRECTORY means in the file's
                      paths (systemd sets it for a unit's credentials)
  -h, --help          show this help
";

const CHECK_USAGE: &str = "\
Usage: hivegate check-config [--credentials-dir DIR] [--config] FILE

Reads FILE and the HIVEGATE_* environment as `serve` would, and reports
every problem with its line: the key files it names are read, and a key
other users may read is an error. A HIVEGATE_* variable that names no key
is an error here (`serve` only warns: the environment is shared). Exits 0
when the configuration is valid, 1 otherwise.

Options:
  --credentials-dir DIR
                      what $CREDENTIALS_DIRECTORY means in the file's
                      paths, to check from a shell a configuration written
                      for a unit with LoadCredential= (systemd sets it
                      only for the service)
";

const GENCONFIG_USAGE: &str = "\
Usage: hivegate genconfig

Prints a complete configuration file: every key with its meaning and its
default, the optional [remote] and [provider.NAME] sections commented out.
`hivegate genconfig > /etc/hivegate/hivegate.toml` is a good start.
";

const GENKEY_USAGE: &str = "\
Usage: hivegate genkey NODE --out FILE

Writes a new Ed25519 key for the cluster box NODE to FILE (readable by its
owner only; FILE must not exist yet) and prints the line every box of the
cluster lists in cluster.trusted_keys. Point this box's
cluster.signing_key_file at FILE; under the package's unit, a file in
/etc/hivegate/credentials/ that belongs to the hivegate user.
";

const BACKUP_USAGE: &str = "\
Usage: hivegate backup --out FILE [--config FILE]

Copies the database under server.data_dir to FILE with SQLite's online
backup API: a consistent snapshot, safe while the gateway is running and
writing. FILE must not exist yet. To restore, stop the gateway and put the
copy in place of hivegate.db (removing hivegate.db-wal and -shm).
";

const USAGE_USAGE: &str = "\
Usage: hivegate usage [--since DATE] [--user NAME] [--config FILE]

Prints the LLM tokens spent per UTC day, user and provider, from the
database under server.data_dir (safe while the gateway runs): prompt and
completion tokens, calls, and how many calls were estimated (the provider
reported no counts; about a token per 4 bytes). DATE is YYYY-MM-DD, the
first day shown (default: 30 days ago); days are kept for 400 days.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env: Vec<(String, String)> = std::env::vars().collect();
    match run(&args, &env) {
        Ok(code) => ExitCode::from(code as u8),
        Err(message) => {
            eprintln!("hivegate: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String], env: &[(String, String)]) -> Result<i32, String> {
    // `--config=FILE` is `--config FILE`.
    let words: Vec<&str> = args
        .iter()
        .flat_map(|a| match a.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => vec![flag, value],
            _ => vec![a.as_str()],
        })
        .collect();
    match words.as_slice() {
        [] | ["help"] | ["-h"] | ["--help"] => {
            print!("{USAGE}");
            Ok(0)
        }
        ["-V"] | ["--version"] | ["version"] => {
            println!("hivegate {VERSION}");
            Ok(0)
        }
        ["help" | "-h" | "--help", "genconfig"] | ["genconfig", "-h" | "--help", ..] => {
            print!("{GENCONFIG_USAGE}");
            Ok(0)
        }
        ["genconfig"] => {
            print!("{}", hivegate::config::generate());
            Ok(0)
        }
        ["help" | "-h" | "--help", "serve"] | ["serve", "-h" | "--help", ..] => {
            print!("{SERVE_USAGE}");
            Ok(0)
        }
        ["help" | "-h" | "--help", "check-config"] | ["check-config", "-h" | "--help", ..] => {
            print!("{CHECK_USAGE}");
            Ok(0)
        }
        ["serve", rest @ ..] => {
            let (mut path, mut env) = (None, env.to_vec());
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                match (*flag, it.next()) {
                    ("-c" | "--config", Some(file)) => path = Some(PathBuf::from(file)),
                    ("-l" | "--listen", Some(addr)) => {
                        // As the variable, which the flag then overrides:
                        // a reload reads the same.
                        set_var(&mut env, LISTEN_VAR, addr)
                    }
                    ("-c" | "--config", None) => {
                        return Err(format!("serve {flag} needs a FILE\n\n{SERVE_USAGE}"))
                    }
                    ("-l" | "--listen", None) => {
                        return Err(format!("serve {flag} needs an ADDR such as 127.0.0.1:8080\n\n{SERVE_USAGE}"))
                    }
                    ("--credentials-dir", Some(dir)) => set_var(&mut env, CREDENTIALS_VAR, dir),
                    ("--credentials-dir", None) => {
                        return Err(format!("serve {flag} needs a DIR\n\n{SERVE_USAGE}"))
                    }
                    _ => {
                        return Err(format!(
                            "unexpected arguments to serve: {}\n\n{SERVE_USAGE}",
                            rest.join(" ")
                        ))
                    }
                }
            }
            let env = env.as_slice();
            let (cfg, warnings) = Config::load(path.as_deref(), env)
                .map_err(|e| format!("invalid configuration:\n{e}"))?;
            let journal = env.iter().any(|(k, _)| k == "JOURNAL_STREAM");
            let log = ops::log::Logger::new(cfg.log.level, cfg.log.format).for_journal(journal);
            // The environment is shared with other programs: serve goes on.
            for w in &warnings {
                match w.contains(hivegate::config::UNKNOWN_VARIABLE) {
                    true => log.warn(&format!("{w}; it is ignored"), &[]),
                    false => log.warn(w, &[]),
                }
            }
            ops::log::route_libraries(log);
            let source = daemon::ConfigSource {
                path,
                env: env.to_vec(),
            };
            daemon::run(cfg, log, source)
        }
        ["check-config", rest @ ..] if !rest.is_empty() => {
            let (mut file, mut env) = (None, env.to_vec());
            let mut it = rest.iter();
            while let Some(word) = it.next() {
                match (*word, file.is_none()) {
                    ("--credentials-dir", _) => match it.next() {
                        Some(dir) => set_var(&mut env, CREDENTIALS_VAR, dir),
                        None => return Err(format!("check-config {word} needs a DIR\n\n{CHECK_USAGE}")),
                    },
                    ("-c" | "--config", true) => match it.next() {
                        Some(f) => file = Some(*f),
                        None => return Err(format!("check-config {word} needs a FILE\n\n{CHECK_USAGE}")),
                    },
                    (f, true) if !f.starts_with('-') => file = Some(f),
                    _ => {
                        return Err(format!(
                            "unexpected arguments to check-config: {}\n\n{CHECK_USAGE}",
                            rest.join(" ")
                        ))
                    }
                }
            }
            let Some(file) = file else {
                return Err(format!("check-config needs a FILE\n\n{CHECK_USAGE}"));
            };
            match Config::load(Some(&PathBuf::from(file)), &env) {
                // Here a variable that names no key is an error (serve
                // warns and ignores it): a typo in a unit's Environment=.
                // A deprecated name is a warning.
                Ok((_, warnings)) if !warnings.is_empty() => {
                    let mut failed = false;
                    for w in warnings {
                        if w.contains(hivegate::config::UNKNOWN_VARIABLE) {
                            failed = true;
                            eprintln!("error: {w} (a typo? `hivegate genconfig` lists the keys; serve would ignore it)");
                        } else {
                            eprintln!("warning: {w}");
                        }
                    }
                    if !failed {
                        println!("{file}: ok");
                    }
                    Ok(i32::from(failed))
                }
                Ok(_) => {
                    println!("{file}: ok");
                    Ok(0)
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    Ok(1)
                }
            }
        }
        ["check-config"] => Err(format!("check-config needs a FILE\n\n{CHECK_USAGE}")),
        ["help" | "-h" | "--help", "genkey"] | ["genkey", "-h" | "--help", ..] => {
            print!("{GENKEY_USAGE}");
            Ok(0)
        }
        ["genkey", node, "-o" | "--out", file] => genkey(node, &PathBuf::from(file)),
        ["genkey", ..] => Err(format!("genkey needs NODE and --out FILE\n\n{GENKEY_USAGE}")),
        ["help" | "-h" | "--help", "backup"] | ["backup", "-h" | "--help", ..] => {
            print!("{BACKUP_USAGE}");
            Ok(0)
        }
        ["backup", rest @ ..] => {
            let (mut out, mut config) = (None, None);
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                match (*flag, it.next()) {
                    ("-o" | "--out", Some(f)) => out = Some(PathBuf::from(f)),
                    ("-c" | "--config", Some(f)) => config = Some(PathBuf::from(f)),
                    _ => {
                        return Err(format!(
                            "unexpected arguments to backup: {}\n\n{BACKUP_USAGE}",
                            rest.join(" ")
                        ))
                    }
                }
            }
            let out = out.ok_or_else(|| format!("backup needs --out FILE\n\n{BACKUP_USAGE}"))?;
            if out.exists() {
                return Err(format!(
                    "{} exists already: choose another name or remove it",
                    out.display()
                ));
            }
            let (cfg, _) = Config::load(config.as_deref(), env)
                .map_err(|e| format!("invalid configuration:\n{e}"))?;
            let db = cfg.server.data_dir.join(store::DB_FILE);
            if !db.exists() {
                return Err(format!(
                    "no database at {} (check server.data_dir)",
                    db.display()
                ));
            }
            store::db::backup(&db, &out)?;
            println!("backed up {} to {}", db.display(), out.display());
            Ok(0)
        }
        ["help" | "-h" | "--help", "usage"] | ["usage", "-h" | "--help", ..] => {
            print!("{USAGE_USAGE}");
            Ok(0)
        }
        ["usage", rest @ ..] => usage(rest, env),
        ["help" | "-h" | "--help", other, ..] => Err(format!(
            "no help for {other:?}: the commands are serve, check-config, genconfig, backup, usage and genkey\n\n{USAGE}"
        )),
        [other, ..] => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    }
}

/// `genkey`: a new signing key for box `node`, written to `out` with mode
/// 0600 (created, never overwritten); its `trusted_keys` line on stdout.
fn genkey(node: &str, out: &std::path::Path) -> Result<i32, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !hivegate::cluster::valid_node(node) {
        return Err(format!("{node:?} is not a node id: 1-64 of [A-Za-z0-9_-]"));
    }
    let (private, public) = hivegate::cluster::sign::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            format!(
                "cannot create {}: {e} (it must not exist yet)",
                out.display()
            )
        })?;
    writeln!(f, "{private}").map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("\"{node}:{public}\"");
    Ok(0)
}

/// `usage`: the LLM usage table, read from the database.
fn usage(args: &[&str], env: &[(String, String)]) -> Result<i32, String> {
    let today = hivegate::llm::day_of(hivegate::clock::unix_ms());
    let (mut since, mut user, mut config) = (today - 30, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (*flag, it.next()) {
            ("--since", Some(d)) => {
                since = hivegate::clock::day_of_date(d)
                    .ok_or_else(|| format!("--since {d:?} is not a date: write YYYY-MM-DD"))?
            }
            ("--user", Some(u)) => user = Some(u.to_string()),
            ("-c" | "--config", Some(f)) => config = Some(PathBuf::from(f)),
            _ => {
                return Err(format!(
                    "unexpected arguments to usage: {}\n\n{USAGE_USAGE}",
                    args.join(" ")
                ))
            }
        }
    }
    let (cfg, _) =
        Config::load(config.as_deref(), env).map_err(|e| format!("invalid configuration:\n{e}"))?;
    let db = cfg.server.data_dir.join(store::DB_FILE);
    if !db.exists() {
        return Err(format!(
            "no database at {} (check server.data_dir)",
            db.display()
        ));
    }
    let conn = store::db::open_reader(&db)?;
    let rows = store::db::usage(&conn, since, user.as_deref()).map_err(|e| {
        format!(
            "cannot read the usage from {}: {e} (a database older than this build: start the gateway once to migrate it)",
            db.display()
        )
    })?;
    print!("{}", usage_table(&rows));
    Ok(0)
}

/// The rows as aligned columns, with a total line; every user and
/// provider name cleaned of control characters (names come from tokens
/// and JWTs: nothing in them may move the terminal).
fn usage_table(rows: &[store::UsageRow]) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(64)
            .collect()
    };
    let mut lines = vec![[
        "day".to_string(),
        "user".into(),
        "provider".into(),
        "prompt".into(),
        "completion".into(),
        "calls".into(),
        "estimated".into(),
    ]];
    let mut total = [0u64; 4];
    for r in rows {
        for (t, v) in total
            .iter_mut()
            .zip([r.prompt, r.completion, r.calls, r.estimated])
        {
            *t += v;
        }
        lines.push([
            hivegate::clock::date(r.day),
            clean(&r.user),
            clean(&r.provider),
            r.prompt.to_string(),
            r.completion.to_string(),
            r.calls.to_string(),
            r.estimated.to_string(),
        ]);
    }
    lines.push([
        "total".into(),
        String::new(),
        String::new(),
        total[0].to_string(),
        total[1].to_string(),
        total[2].to_string(),
        total[3].to_string(),
    ]);
    let mut widths = [0usize; 7];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut line = String::new();
        for (i, (cell, w)) in l.iter().zip(widths).enumerate() {
            // Names to the left, numbers to the right.
            if i < 3 {
                line.push_str(&format!("{cell:<w$}  "));
            } else {
                line.push_str(&format!("{cell:>w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Sets `name` in the environment the configuration is read with (a
/// flag wins over the variable; a reload reads the same).
fn set_var(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    env.retain(|(k, _)| k != name);
    env.push((name.into(), value.into()));
}
