//! What the package installs: the systemd unit (the settings the gateway
//! relies on, `systemd-analyze verify` accepting it, a hardening score
//! held at 1.5 or better), the configuration (genconfig's) and the man
//! page (the program's own help). `.ci/deb` builds the package and runs
//! lintian and its maintainer scripts.

mod common;
use common::run_ok;
use std::path::PathBuf;
use std::process::Command;

fn unit() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/hivegate.service");
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
        "User=hivegate",
        "StateDirectory=hivegate",
        "LimitNOFILE=",
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
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hivegate"))
            .arg("check-config")
            .arg(root.join("packaging/hivegate.toml")),
    );
}

#[test]
#[cfg_attr(
    missing_systemd,
    ignore = "systemd-analyze is not installed (apt install systemd)"
)]
fn the_units_hardening_scores_1_5_or_better() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hivegate.service");
    std::fs::write(&path, unit()).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for hivegate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no score in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        score <= 1.5,
        "the unit's exposure is {score}, above 1.5:\n{text}"
    );
}

/// The man page, from the program's own help: the overview, then each
/// command's help, in roff.
fn man_page() -> String {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hivegate"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "hivegate {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Text as roff shows it verbatim: backslashes doubled, a line's
    // leading dot or quote escaped, hyphens as hyphens.
    let roff = |text: &str| {
        let mut out = String::new();
        for line in text.lines() {
            let line = line.replace('\\', "\\e").replace('-', "\\-");
            if line.starts_with('.') || line.starts_with('\'') {
                out.push_str("\\&");
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    };
    let overview = help(&["--help"]);
    let (title, rest) = overview.split_once("\n\n").unwrap();
    let summary = title.strip_prefix("hivegate: ").unwrap();
    let mut page = format!(
        ".\\\" Generated from `hivegate --help` and `hivegate help COMMAND` by\n\
         .\\\" tests/packaging.rs (UPDATE_MAN=1 cargo test --test packaging rewrites it).\n\
         .TH HIVEGATE 1 \"\" \"hivegate {}\" \"User Commands\"\n\
         .SH NAME\nhivegate \\- {summary}\n.SH SYNOPSIS\n.nf\n{}.fi\n.SH COMMANDS\n",
        env!("CARGO_PKG_VERSION"),
        roff(rest)
    );
    for command in [
        "serve",
        "check-config",
        "genconfig",
        "backup",
        "usage",
        "genkey",
    ] {
        page.push_str(&format!(
            ".SS {command}\n.nf\n{}.fi\n",
            roff(&help(&["help", command]))
        ));
    }
    page.push_str(
        ".SH FILES\n.TP\n/etc/hivegate/hivegate.toml\nthe configuration \
         (\\fBhivegate genconfig\\fR writes a complete one)\n.TP\n/etc/hivegate/credentials/\n\
         API keys and other secrets, each readable by the service's user only\n.TP\n\
         /var/lib/hivegate/\nthe database (server.data_dir under systemd)\n\
         .SH SEE ALSO\n/usr/share/doc/hivegate/README.md, /usr/share/doc/hivegate/PROTOCOL.md\n",
    );
    page
}

#[test]
fn the_man_page_is_the_programs_own_help() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/hivegate.1");
    let page = man_page();
    if std::env::var_os("UPDATE_MAN").is_some() {
        std::fs::write(&path, &page).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == page,
        "packaging/hivegate.1 is not the program's help: UPDATE_MAN=1 cargo test --test packaging"
    );
}

/// Every system call in `group` (a `@set` of `systemd-analyze
/// syscall-filter`, its subsets expanded).
fn syscalls(group: &str, into: &mut std::collections::BTreeSet<String>) {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        match name.starts_with('@') {
            true => syscalls(name, into),
            false => {
                into.insert(name.to_string());
            }
        }
    }
}

#[test]
#[cfg_attr(
    missing_strace,
    ignore = "strace or systemd-analyze is not installed (apt install strace systemd)"
)]
fn every_system_call_the_gateway_makes_is_one_the_units_filter_allows() {
    // What the unit allows: @system-service less what it denies.
    let text = unit();
    let mut allowed = std::collections::BTreeSet::new();
    syscalls("@system-service", &mut allowed);
    let mut denied = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(groups) = line.strip_prefix("SystemCallFilter=~") {
            for g in groups.split_whitespace() {
                syscalls(g, &mut denied);
            }
        }
    }
    assert!(denied.contains("setrlimit") && denied.contains("setuid"));
    let allowed: std::collections::BTreeSet<String> =
        allowed.difference(&denied).cloned().collect();

    // The gateway under strace: start (the open-file limit raised), a
    // session that joins, publishes and reads, the operator's endpoints,
    // then a drain on SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (addr, admin) = (free(), free());
    let config = dir.path().join("hivegate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\ndata_dir = {:?}\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    // As the unit runs it: not as root (SQLite, for one, calls fchown
    // only as root), so a root test runs it as nobody.
    let mut strace = Command::new("strace");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        strace.args(["-u", "nobody"]);
    }
    let mut strace = strace
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_hivegate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let stream = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("the gateway did not listen under strace: {e}"),
        }
    };
    let (mut ws, _) =
        tungstenite::client::client(format!("ws://{addr}/ws"), stream).expect("upgrade");
    let mut ask = |frame: &str, until: &str| {
        ws.send(tungstenite::Message::text(frame)).unwrap();
        loop {
            let m = ws.read().unwrap();
            if m.to_text().unwrap_or("").contains(until) {
                break;
            }
        }
    };
    ask(r#"{"op":"hello","client":"strace/1"}"#, "hello_ack");
    ask(r#"{"op":"join","room":"r","request_id":"j"}"#, "joined");
    ask(
        r#"{"op":"publish","room":"r","text":"hi","request_id":"p"}"#,
        "\"ack\"",
    );
    ask(
        r#"{"op":"history","room":"r","request_id":"h"}"#,
        "history_res",
    );
    for path in ["/metrics", "/readyz"] {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body}");
    }
    // The traced gateway is strace's child: ask it to drain.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id())).unwrap();
    let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill only sends a signal to the process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    drop(ws);
    assert!(
        strace.wait().unwrap().success(),
        "the gateway did not drain and exit 0"
    );

    let text = std::fs::read_to_string(&trace).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for line in text.lines() {
        // "1234 name(args..." or "1234 <... name resumed>..."
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with(['(', ' ']) {
            used.insert(name);
        }
    }
    assert!(used.contains("prlimit64"), "no rlimit call seen: {used:?}");
    // MemoryDenyWriteExecute=yes: no writable and executable mapping, no
    // mapping made executable after the fact.
    let wx: Vec<&str> = text
        .lines()
        .filter(|l| {
            let exec = l.contains("PROT_EXEC");
            (l.contains(" mmap(") && exec && l.contains("PROT_WRITE"))
                || (l.contains("mprotect(") && exec)
        })
        .collect();
    assert!(wx.is_empty(), "MemoryDenyWriteExecute would refuse: {wx:?}");
    let refused: Vec<&String> = used
        .iter()
        .filter(|s| !allowed.contains(*s) && !matches!(s.as_str(), "exited" | "killed" | "resumed"))
        .collect();
    assert!(
        refused.is_empty(),
        "the gateway makes system calls packaging/debian/hivegate.service forbids: {refused:?}"
    );
}
