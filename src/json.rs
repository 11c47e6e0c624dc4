//! JSON in and out, for every module that speaks it: a reader that cannot
//! panic or hang, and a writer that escapes every key and value.
//!
//! Reading has two steps. A scan of the bytes checks that the text is a JSON
//! object nested at most [`MAX_DEPTH`] deep (serde_json's own bound is 128
//! levels of recursion; a client gets far less). serde_json, which returns
//! an error and never panics or loops on malformed input, then fills the
//! caller's type.
//!
//! Frames are written with [`JsonOut`] into a string once, and the same
//! bytes are shared by every recipient. Every key and every string value is
//! escaped: a key may come from a client (a reaction's emoji).

use serde::Deserialize;
use std::fmt::Write as _;

/// Deepest nesting of arrays and objects accepted in a client frame.
pub const MAX_DEPTH: usize = 32;

/// Why a JSON text could not be read into a type.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonError {
    pub message: String,
    /// Not JSON at all (as opposed to JSON of the wrong shape).
    pub malformed: bool,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JsonError {}

/// Reads one JSON object of at most [`MAX_DEPTH`] levels into `T`. Never
/// panics; the time it takes is linear in the length of `text`.
pub fn from_json<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, JsonError> {
    if let Err(why) = check_shape(text.as_bytes()) {
        return Err(JsonError {
            message: format!("invalid JSON: {why}"),
            malformed: true,
        });
    }
    serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        let malformed = matches!(e.classify(), Category::Syntax | Category::Eof);
        JsonError {
            message: if malformed {
                format!("invalid JSON: {e}")
            } else {
                format!("a field has the wrong type: {e}")
            },
            malformed,
        }
    })
}

/// Checks, before parsing, that `b` starts as a JSON object and nests at
/// most [`MAX_DEPTH`] deep. Only brackets outside strings are counted: the
/// parser finds every other fault.
pub fn check_shape(b: &[u8]) -> Result<(), &'static str> {
    let start = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'));
    if start.map(|i| b[i]) != Some(b'{') {
        return Err("a frame must hold one JSON object");
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &c in b {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err("nested too deeply");
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Writes one JSON object, keys and string values escaped.
pub struct JsonOut {
    buf: String,
    first: bool,
}

impl Default for JsonOut {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonOut {
    /// An empty object.
    pub fn new() -> JsonOut {
        JsonOut::with_capacity(96)
    }

    /// An empty object with room for `bytes` of members.
    pub fn with_capacity(bytes: usize) -> JsonOut {
        let mut buf = String::with_capacity(bytes + 2);
        buf.push('{');
        JsonOut { buf, first: true }
    }

    /// An object whose first member is `"op"`, as every server frame has.
    pub fn op(op: &str) -> JsonOut {
        JsonOut::new().str("op", op)
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.buf.push(',');
        }
        self.first = false;
        escape_into(&mut self.buf, key);
        self.buf.push(':');
    }

    pub fn str(mut self, key: &str, value: &str) -> JsonOut {
        self.key(key);
        escape_into(&mut self.buf, value);
        self
    }

    pub fn opt_str(self, key: &str, value: Option<&str>) -> JsonOut {
        match value {
            Some(v) => self.str(key, v),
            None => self,
        }
    }

    pub fn num(mut self, key: &str, value: u64) -> JsonOut {
        self.key(key);
        let _ = write!(self.buf, "{value}");
        self
    }

    pub fn opt_num(self, key: &str, value: Option<u64>) -> JsonOut {
        match value {
            Some(v) => self.num(key, v),
            None => self,
        }
    }

    /// A number that may have a fraction, with at most three decimals.
    pub fn float(mut self, key: &str, value: f64) -> JsonOut {
        self.key(key);
        self.buf.push_str(&fmt_f64(value));
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> JsonOut {
        self.key(key);
        self.buf.push_str(if value { "true" } else { "false" });
        self
    }

    /// Inserts an already-written JSON value.
    pub fn raw(mut self, key: &str, json: &str) -> JsonOut {
        self.key(key);
        self.buf.push_str(json);
        self
    }

    /// Bytes written so far (the closing brace not counted).
    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// `30`, `0.5`, `0.333`: integers without a fraction, others to three
/// decimals; never `NaN` or `inf`, which JSON and Prometheus parsers reject.
pub fn fmt_f64(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Appends `s` as a JSON string literal.
pub fn escape_into(buf: &mut String, s: &str) {
    buf.reserve(s.len() + 2);
    buf.push('"');
    // Most text needs no escaping: one pass finds that, and it is copied
    // whole. Otherwise it is copied in runs between the bytes that need
    // escaping (only ASCII does, so a byte of a multi-byte character is
    // never one of them).
    let plain = |b: u8| b >= 0x20 && b != b'"' && b != b'\\';
    if s.bytes().all(plain) {
        buf.push_str(s);
        buf.push('"');
        return;
    }
    let mut run = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        buf.push_str(&s[run..i]);
        match escaped {
            "" => {
                let _ = write!(buf, "\\u{b:04x}");
            }
            e => buf.push_str(e),
        }
        run = i + 1;
    }
    buf.push_str(&s[run..]);
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_reads_back_as_it_was() {
        for text in [
            "",
            "plain",
            "\"quoted\" and \\ back",
            "line\nbreak\r\ttab\u{0}\u{1f}\u{7f}",
            "é, 漢字, 🎉 and \"\u{8}\"",
            "\\",
        ] {
            let mut out = String::new();
            escape_into(&mut out, text);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), text, "{out}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(check_shape(ok.as_bytes()).is_ok());
        assert!(from_json::<serde_json::Value>(&ok).is_ok());
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(check_shape(deep.as_bytes()), Err("nested too deeply"));
        assert!(from_json::<serde_json::Value>(&deep).is_err_and(|e| e.malformed));
        // Brackets inside strings are text, not nesting.
        let quoted = format!(
            "{{\"op\":\"ping\",\"a\":\"{}\\\"{}\"}}",
            "[".repeat(99),
            "{".repeat(99)
        );
        assert!(from_json::<serde_json::Value>(&quoted).is_ok());
    }

    /// Random mutations of valid frames never panic the parser.
    #[test]
    fn keys_are_escaped() {
        let evil = "x\":1},\"from\":\"admin\",\"y\":{\"\\\n";
        let f = JsonOut::op("message")
            .str("from", "alice")
            .raw("reactions", &JsonOut::new().num(evil, 1).finish())
            .finish();
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["from"], "alice");
        assert_eq!(v["reactions"][evil], 1);
    }
}
