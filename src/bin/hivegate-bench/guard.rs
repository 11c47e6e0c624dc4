//! `guard`: the figures that do not depend on how busy the machine is,
//! measured and held to `bench/baseline.txt`.
//!
//! Memory per idle connection, the sizes every connection pays for, the
//! instructions a delivery and a durable publish cost (counted by valgrind,
//! so a loaded machine gives the same count), the binary's size, memory
//! after start and the wake-ups of an idle gateway. Each has a tolerance;
//! a figure worse than its baseline beyond it fails the guard, and `.ci/run`
//! runs it. A figure better than its baseline beyond the tolerance is said,
//! so the baseline can follow.
//!
//! `guard --write` measures and writes the baseline and the README's table
//! of these figures (between its `guard` markers): the baseline changes in
//! the commit whose code moved it, and that commit says why. `report
//! --check` fails when the README's table is not the baseline's.
//!
//! Where the instructions go: build with symbols (`BUILD_KEEP_SYMBOLS=1
//! cargo build --release`), run the guard with `HIVEGATE_GUARD_KEEP=DIR`,
//! which keeps callgrind's reports there, and read them with
//! `callgrind_annotate --inclusive=yes`.

use super::raw::{raw_member, text_frame, FrameReader};
use super::{fitness, gateway_binary, idle_bytes, start_gateway_with, NO_RATE_LIMITS};
use async_io::Async;
use hivegate::server::conn::state_sizes;
use std::cell::Cell;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// How much worse than its baseline a figure may be.
#[derive(Clone, Copy)]
enum Tolerance {
    /// A share of the baseline.
    Percent(f64),
    /// An amount in the figure's unit (for small counts).
    Plus(f64),
}

struct Figure {
    /// The name in the baseline file.
    name: &'static str,
    /// What the README calls it.
    what: &'static str,
    unit: &'static str,
    tolerance: Tolerance,
    /// How it is measured, as the README says.
    how: &'static str,
    measure: fn() -> Result<f64, String>,
}

/// Members and messages of the counted fan-outs.
const FANOUT: [(usize, usize); 2] = [(200, 100), (1000, 60)];
/// Publishes of the counted durable publish, one at a time.
const PUBLISHES: usize = 200;
/// Connections of the idle-memory figure.
const IDLE_CONNECTIONS: usize = 3000;
const QUIET_SECONDS: usize = 20;

const FIGURES: &[Figure] = &[
    Figure {
        name: "idle_connection_bytes",
        what: "memory per idle authenticated connection",
        unit: "bytes",
        tolerance: Tolerance::Percent(5.0),
        how: "RSS over 3,000 connections after 200 warm-up, the median of five gateways (`hivegate-bench idle 3000`)",
        measure: idle_median,
    },
    Figure {
        name: "connection_state_bytes",
        what: "a connection's state (`Conn`)",
        unit: "bytes",
        tolerance: Tolerance::Plus(0.0),
        how: "`size_of`, also asserted by a unit test",
        measure: || Ok(state_sizes().conn as f64),
    },
    Figure {
        name: "connection_task_bytes",
        what: "a connection's task (its future)",
        unit: "bytes",
        tolerance: Tolerance::Plus(0.0),
        how: "`size_of`, also asserted by a unit test",
        measure: || Ok(state_sizes().task as f64),
    },
    Figure {
        name: "table_entry_bytes",
        what: "a connection's table entry",
        unit: "bytes",
        tolerance: Tolerance::Plus(0.0),
        how: "`size_of`, also asserted by a unit test",
        measure: || Ok(state_sizes().entry as f64),
    },
    Figure {
        name: "instructions_per_delivery",
        what: "instructions per delivery, room of 200 members, 64-byte messages",
        unit: "instructions",
        tolerance: Tolerance::Percent(10.0),
        how: "valgrind (callgrind), 100 messages after a warm-up, all threads",
        measure: || per_delivery(FANOUT[0]),
    },
    Figure {
        name: "instructions_per_delivery_1000",
        what: "instructions per delivery, room of 1,000 members, 64-byte messages",
        unit: "instructions",
        tolerance: Tolerance::Percent(10.0),
        how: "the same, 60 messages",
        measure: || per_delivery(FANOUT[1]),
    },
    Figure {
        name: "instructions_per_publish",
        what: "instructions per durable publish, one at a time",
        unit: "instructions",
        tolerance: Tolerance::Percent(10.0),
        how: "valgrind (callgrind), 200 publishes after a warm-up, all threads, SQLite included",
        measure: per_publish,
    },
    Figure {
        name: "binary_bytes",
        what: "release binary",
        unit: "bytes",
        tolerance: Tolerance::Percent(0.5),
        how: "`target/release/hivegate` (`.ci/deb` also fails past 2,900,000)",
        measure: binary_bytes,
    },
    Figure {
        name: "start_rss_kib",
        what: "resident memory right after start, embedded defaults",
        unit: "KiB",
        tolerance: Tolerance::Percent(8.0),
        how: "median of five starts (`hivegate-bench start`)",
        measure: || fitness::start_rss_median().map(|k| k as f64),
    },
    Figure {
        name: "idle_wakeups_per_s",
        what: "wake-ups of an idle gateway, all threads",
        unit: "per second",
        tolerance: Tolerance::Plus(1.0),
        how: "context switches over 20 s (`hivegate-bench quiet 20`)",
        measure: || fitness::wakeups(QUIET_SECONDS).map(|w| (w * 100.0).round() / 100.0),
    },
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn baseline_path() -> PathBuf {
    repo().join("bench/baseline.txt")
}

fn binary_bytes() -> Result<f64, String> {
    let bin = gateway_binary()?;
    let meta = std::fs::metadata(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    Ok(meta.len() as f64)
}

/// `guard [--write | FIGURE...]`: naming figures measures only those
/// (while working on one), and cannot write.
pub fn run(args: &[&str]) -> Result<(), String> {
    let write = args == ["--write"];
    let only: &[&str] = if write { &[] } else { args };
    if let Some(unknown) = only.iter().find(|a| !FIGURES.iter().any(|f| f.name == **a)) {
        let names: Vec<&str> = FIGURES.iter().map(|f| f.name).collect();
        return Err(format!(
            "no figure {unknown}: usage: hivegate-bench guard [--write | FIGURE...], figures: {}",
            names.join(", ")
        ));
    }
    let baseline = read_baseline(&baseline_path())?;
    let mut measured = Vec::new();
    let mut worse = Vec::new();
    for f in FIGURES
        .iter()
        .filter(|f| only.is_empty() || only.contains(&f.name))
    {
        let value = (f.measure)().map_err(|e| format!("{}: {e}", f.name))?;
        let base = baseline.iter().find(|(n, _)| n == f.name).map(|(_, v)| *v);
        let verdict = match base {
            None => "new".to_string(),
            Some(b) => {
                let allowed = match f.tolerance {
                    Tolerance::Percent(p) => b * (1.0 + p / 100.0),
                    Tolerance::Plus(d) => b + d,
                };
                let better = match f.tolerance {
                    Tolerance::Percent(p) => b * (1.0 - p / 100.0),
                    Tolerance::Plus(d) => b - d,
                };
                if value > allowed {
                    worse.push(f.name);
                    format!("WORSE than {b} (allowed up to {allowed:.0})")
                } else if value < better {
                    format!("better than {b}: `hivegate-bench guard --write` keeps it")
                } else {
                    format!("baseline {b}")
                }
            }
        };
        println!("{:<28} {:>14} {:<12} {verdict}", f.name, value, f.unit);
        measured.push((f.name.to_string(), value));
    }
    if write {
        write_baseline(&baseline_path(), &measured)?;
        write_readme(&measured)?;
        println!("wrote {} and the README's table", baseline_path().display());
        return Ok(());
    }
    if !worse.is_empty() {
        return Err(format!(
            "worse than the baseline: {} (a change that makes a figure worse needs a reason; \
             then `hivegate-bench guard --write` in its commit)",
            worse.join(", ")
        ));
    }
    Ok(())
}

/// `report --check`: the README's table is the baseline's.
pub fn report(args: &[&str]) -> Result<(), String> {
    let baseline = read_baseline(&baseline_path())?;
    match args {
        ["--check"] => {
            let missing: Vec<&str> = FIGURES
                .iter()
                .map(|f| f.name)
                .filter(|n| !baseline.iter().any(|(b, _)| b == n))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "bench/baseline.txt lacks {}: run `hivegate-bench guard --write`",
                    missing.join(", ")
                ));
            }
            let readme = std::fs::read_to_string(repo().join("README.md"))
                .map_err(|e| format!("README.md: {e}"))?;
            let (_, table, _) = split_readme(&readme)?;
            if table != render(&baseline) {
                return Err(
                    "the README's guarded figures are not bench/baseline.txt's: run `hivegate-bench report`"
                        .into(),
                );
            }
            Ok(())
        }
        [] => write_readme(&baseline),
        _ => Err("usage: hivegate-bench report [--check]".into()),
    }
}

fn read_baseline(path: &Path) -> Result<Vec<(String, f64)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{}:{}: expected `name value`",
                path.display(),
                i + 1
            ));
        };
        let value = value
            .parse()
            .map_err(|_| format!("{}:{}: {value:?} is not a number", path.display(), i + 1))?;
        out.push((name.to_string(), value));
    }
    Ok(out)
}

fn write_baseline(path: &Path, measured: &[(String, f64)]) -> Result<(), String> {
    let mut text = String::from(
        "# The figures `hivegate-bench guard` holds the code to (run by .ci/run).\n\
         # Written by `hivegate-bench guard --write`, in the commit whose code\n\
         # moved them; that commit says why. Tolerances: src/bin/hivegate-bench/guard.rs.\n",
    );
    for (name, value) in measured {
        text.push_str(&format!("{name} {value}\n"));
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

const BEGIN: &str =
    "<!-- guard:begin (written by `hivegate-bench report` from bench/baseline.txt) -->\n";
const END: &str = "<!-- guard:end -->";

fn split_readme(readme: &str) -> Result<(&str, &str, &str), String> {
    let start = readme
        .find(BEGIN)
        .ok_or("README.md has no guard:begin marker")?
        + BEGIN.len();
    let end = readme[start..]
        .find(END)
        .ok_or("README.md has no guard:end marker")?
        + start;
    Ok((&readme[..start], &readme[start..end], &readme[end..]))
}

fn write_readme(values: &[(String, f64)]) -> Result<(), String> {
    let path = repo().join("README.md");
    let readme = std::fs::read_to_string(&path).map_err(|e| format!("README.md: {e}"))?;
    let (head, _, tail) = split_readme(&readme)?;
    let text = format!("{head}{}{tail}", render(values));
    std::fs::write(&path, text).map_err(|e| format!("README.md: {e}"))
}

/// The README's table of the guarded figures.
fn render(values: &[(String, f64)]) -> String {
    let mut out = String::from("| what | figure | guard fails above | how |\n|---|---|---|---|\n");
    for f in FIGURES {
        let Some(v) = values.iter().find(|(n, _)| n == f.name).map(|(_, v)| *v) else {
            continue;
        };
        let limit = match f.tolerance {
            Tolerance::Percent(p) => format!("+{p}%"),
            Tolerance::Plus(0.0) => "any growth".to_string(),
            Tolerance::Plus(d) => format!("+{d} {}", f.unit),
        };
        out.push_str(&format!(
            "| {} | **{} {}** | {limit} | {} |\n",
            f.what,
            thousands(v),
            f.unit,
            f.how
        ));
    }
    out
}

/// 1985 as "1,985"; fractions kept to two places.
fn thousands(v: f64) -> String {
    if v.fract() != 0.0 {
        return format!("{v:.2}");
    }
    let digits = format!("{}", v as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The instructions the gateway runs (all threads, SQLite's included)
/// for `messages` publishes to a room of `members` (the publisher is one
/// of them and keeps `window` publishes in flight), under callgrind.
///
/// Only the publishes are counted: callgrind's counters are zeroed after
/// the members joined, their presence went out and a warm-up of messages
/// went through, and dumped once every member has every message. The
/// set-up's cost depends on timing (how many joins one presence update
/// carries), so it must not be in the count.
fn instructions(
    label: &str,
    config: &str,
    members: usize,
    messages: usize,
    window: usize,
) -> Result<u64, String> {
    let dir = std::env::temp_dir().join(format!("hivegate-guard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join("callgrind.out");
    let wrapper = [
        "valgrind".to_string(),
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let gw = start_gateway_with(config, &wrapper)?;
    let pid = gw.child.id().to_string();
    let control = |what: &str| -> Result<(), String> {
        let done = std::process::Command::new("callgrind_control")
            .args([what, &pid])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("callgrind_control: {e} (apt install valgrind)"))?;
        match done.success() {
            true => Ok(()),
            false => Err(format!("callgrind_control {what} failed")),
        }
    };
    let ex = hivegate::executor::Executor::new();
    async_io::block_on(ex.run(async {
        // Every member but the publisher reads all the time (presence
        // included: a member that did not would be closed as a slow
        // consumer) and counts the messages. The publisher reads only
        // while it publishes, so it joins last: the others' joins do not
        // fill its queue meanwhile.
        let received = Rc::new(Cell::new(0));
        let others = members.saturating_sub(1);
        let mut readers = Vec::new();
        for _ in 0..others {
            let (s, r) = raw_member(gw.addr, "guard").await?;
            readers.push(ex.spawn(count_messages(s, r, received.clone())));
        }
        let (mut s, mut r) = raw_member(gw.addr, "guard").await?;
        publish(&mut s, &mut r, 0, WARM_UP, window).await?;
        until(|| received.get() >= others * WARM_UP).await;
        control("--zero")?;
        publish(&mut s, &mut r, WARM_UP, messages, window).await?;
        until(|| received.get() >= others * (WARM_UP + messages)).await;
        control("--dump")?;
        drop(readers);
        Ok::<(), String>(())
    }))?;
    gw.stop_gracefully(Duration::from_secs(120))?;
    // The dump is the file's first part.
    let part = dir.join("callgrind.out.1");
    let text = std::fs::read_to_string(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    if let Some(keep) = std::env::var_os("HIVEGATE_GUARD_KEEP") {
        let kept = Path::new(&keep).join(format!("callgrind.{label}"));
        std::fs::copy(&part, &kept).map_err(|e| format!("{}: {e}", kept.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no totals in callgrind's output".to_string())
}

/// Messages through before the count starts.
const WARM_UP: usize = 20;

/// Publishes `messages` 64-byte messages (numbered from `first`), keeping
/// `window` in flight, until all are acknowledged.
async fn publish(
    s: &mut Async<TcpStream>,
    r: &mut FrameReader,
    first: usize,
    messages: usize,
    window: usize,
) -> Result<(), String> {
    use futures_lite::AsyncWriteExt;
    let text = "x".repeat(64);
    let (mut sent, mut acked) = (0, 0);
    while acked < messages {
        let mut out = Vec::new();
        while sent < messages && sent - acked < window {
            let id = first + sent;
            out.extend(text_frame(&format!(
                r#"{{"op":"publish","room":"guard","text":"{text}","request_id":"{id}"}}"#
            )));
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        if r.fill(s).await.map_err(|e| e.to_string())? == 0 {
            return Err("the publisher was closed".into());
        }
        while let Some((_, range)) = r.next() {
            if r.buf[range].starts_with(b"{\"op\":\"ack\"") {
                acked += 1;
            }
        }
    }
    Ok(())
}

/// Reads a member's frames until the gateway closes it, counting the
/// messages.
async fn count_messages(mut s: Async<TcpStream>, mut r: FrameReader, received: Rc<Cell<usize>>) {
    loop {
        while let Some((_, range)) = r.next() {
            if r.buf[range].starts_with(b"{\"op\":\"message\"") {
                received.set(received.get() + 1);
            }
        }
        if r.fill(&mut s).await.map_or(true, |n| n == 0) {
            return;
        }
    }
}

/// Waits until `done` (checked every millisecond: a benchmark's wait).
async fn until(done: impl Fn() -> bool) {
    while !done() {
        async_io::Timer::after(Duration::from_millis(1)).await;
    }
}

fn per_delivery((members, n): (usize, usize)) -> Result<f64, String> {
    let cap = members + 16;
    let config = format!(
        "max_connections = {cap}\nmax_connections_per_ip = {cap}\nmax_handshakes = 1024\n\
         max_handshakes_per_ip = 1024\n{NO_RATE_LIMITS}"
    );
    let counted = instructions(&format!("fanout-{members}"), &config, members, n, 8)?;
    // Each message reaches every member, its publisher too.
    Ok((counted as f64 / (n * members) as f64).round())
}

fn per_publish() -> Result<f64, String> {
    let config = format!("[store]\nsynchronous = \"full\"\n{NO_RATE_LIMITS}");
    let counted = instructions("publish", &config, 1, PUBLISHES, 1)?;
    Ok((counted as f64 / PUBLISHES as f64).round())
}

/// The median of five idle measurements: one gateway in a few grows by
/// some 300 KiB during the window (a background task's allocation), which
/// is noise, not a cost per connection. With three, two such gateways in
/// one guard failed CI once (1,906 bytes against 1,892 allowed; the same
/// binary then measured 1,806 and 1,879); five take a few seconds more.
fn idle_median() -> Result<f64, String> {
    let mut runs = [0.0; 5];
    for r in &mut runs {
        *r = idle_bytes(IDLE_CONNECTIONS)?;
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[2].round())
}
