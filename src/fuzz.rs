//! Entry points for the fuzz targets (`fuzz/`, run with `cargo fuzz`) and
//! for the replay of their corpora in `cargo test` (`tests/fuzz_corpus.rs`).
//! Each takes any bytes at all and must return: no panic, no endless
//! loop, no allocation without a bound.

use crate::llm::sse::SseParser;

/// The HTTP request head reader (what every socket meets first).
pub fn http_head(data: &[u8]) {
    let mut input = futures_lite::io::Cursor::new(data);
    let _ = futures_lite::future::block_on(crate::server::http::read_head(&mut input));
}

/// The client frame parser (every WebSocket text frame).
pub fn client_frame(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::protocol::parse(text);
    }
}

/// The SSE parser and every dialect's event reader behind it (an
/// upstream's stream), fed in two pieces split where the first byte says,
/// as reads split it.
pub fn sse(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let (mut parser, mut events) = (SseParser::default(), Vec::new());
    let fed = parser
        .feed(&data[..split], &mut events)
        .and_then(|()| parser.feed(&data[split..], &mut events))
        .and_then(|()| parser.finish(&mut events));
    let _ = fed;
    for data in events {
        for dialect in crate::llm::DIALECTS {
            let _ = dialect.event(&data);
        }
    }
}

/// The configuration reader: the TOML subset, every key's checks, the
/// checks across keys. A text naming a key file is skipped: reading files
/// is not parsing, and the fuzzer must not read the machine's files.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("_file") {
        return;
    }
    let path = std::path::Path::new("fuzz.toml");
    let _ = crate::config::Config::from_text(Some((path, text)), &[]);
}
