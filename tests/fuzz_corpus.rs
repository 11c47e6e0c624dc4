//! Replays the fuzz corpora in `fixtures/fuzz/` on stable Rust: every
//! input the fuzzers were seeded with or found interesting goes through the
//! same entry points as the fuzz targets (`hivegate::fuzz`), and none may
//! panic or hang. `cargo fuzz` (see the README) grows these corpora.

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fuzz")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let started = Instant::now();
        run(&data);
        // A generous bound (debug build, busy machine): it catches an
        // endless loop, not a slow parse.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} took {:?}",
            path.display(),
            started.elapsed()
        );
        n += 1;
    }
    assert!(n >= 3, "{target}: only {n} inputs in {}", dir.display());
}

#[test]
fn http_head_corpus() {
    replay("http_head", hivegate::fuzz::http_head);
}

#[test]
fn client_frame_corpus() {
    replay("client_frame", hivegate::fuzz::client_frame);
}

#[test]
fn sse_corpus() {
    replay("sse", hivegate::fuzz::sse);
}

#[test]
fn config_corpus() {
    replay("config", hivegate::fuzz::config);
}
