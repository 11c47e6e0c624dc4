//! Server-Sent Events, parsed incrementally from bytes as they arrive.
//!
//! Lines end in CRLF, LF or CR, and an ending may be split across reads.
//! `data:` lines accumulate (joined by newlines) until a blank line
//! dispatches the event; comments (`:`) and other fields are skipped. Lines
//! are bounded: an upstream cannot make the gateway buffer without end.

/// Longest line accepted from an upstream.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The last byte seen was a CR: an LF right after it ends nothing.
    after_cr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    LineTooLong,
    NotUtf8,
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SseError::LineTooLong => "an event line is longer than 1 MiB",
            SseError::NotUtf8 => "an event is not UTF-8",
        })
    }
}

impl std::error::Error for SseError {}

impl SseParser {
    /// Feeds bytes; complete events' data are appended to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), SseError> {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    self.end_line(out)?;
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= MAX_LINE || self.data.len() >= MAX_LINE {
                        return Err(SseError::LineTooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    /// At the end of the stream: a pending line and event are completed
    /// (some servers end without the final blank line).
    pub fn finish(&mut self, out: &mut Vec<String>) -> Result<(), SseError> {
        if !self.line.is_empty() {
            self.end_line(out)?;
        }
        self.dispatch(out)
    }

    fn end_line(&mut self, out: &mut Vec<String>) -> Result<(), SseError> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<String>) -> Result<(), SseError> {
        if !self.has_data {
            return Ok(());
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        out.push(String::from_utf8(data).map_err(|_| SseError::NotUtf8)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        p.finish(&mut out).unwrap();
        out
    }

    const STREAM: &[u8] = b": comment\r\ndata: {\"a\":1}\r\n\r\nevent: x\nid: 7\ndata: line one\ndata: line two\n\ndata:no-space\r\rdata: [DONE]\n\n";

    #[test]
    fn parses_data_comments_multi_line_and_every_line_ending() {
        assert_eq!(
            parse_all(&[STREAM]),
            ["{\"a\":1}", "line one\nline two", "no-space", "[DONE]"]
        );
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let whole = parse_all(&[STREAM]);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let got = parse_all(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(got, whole, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn a_stream_without_the_last_blank_line_still_ends_its_event() {
        assert_eq!(parse_all(&[b"data: x"]), ["x"]);
        assert_eq!(parse_all(&[b"data: x\n"]), ["x"]);
        assert!(parse_all(&[b": only a comment\n\n"]).is_empty());
    }

    #[test]
    fn lines_are_bounded_and_must_be_utf8() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let long = vec![b'a'; MAX_LINE + 1];
        assert_eq!(p.feed(&long, &mut out), Err(SseError::LineTooLong));
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"data: \xff\n\n", &mut out), Err(SseError::NotUtf8));
    }
}
