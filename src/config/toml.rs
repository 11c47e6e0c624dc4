//! The subset of TOML hivegate reads: `[section]` headers and `key = value`
//! lines, with strings, integers, floats, booleans and (possibly multi-line)
//! arrays, and the one array table `[[access]]`.
//!
//! Why not a TOML crate: every error must name its line, and the parsers
//! small enough for this device either flatten keys without positions
//! (nanoserde) or are larger than this file. Anything outside the subset
//! (other array tables, inline tables, dotted keys, multi-line strings, dates) is
//! an error that says so, never silently misread.

use std::fmt;

/// A parsed value. Numbers keep their kind so "1.5 where an integer is
/// expected" can be reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Value>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "the string {s:?}"),
            Value::Int(i) => write!(f, "the integer {i}"),
            Value::Float(x) => write!(f, "the number {x}"),
            Value::Bool(b) => write!(f, "the boolean {b}"),
            Value::List(_) => write!(f, "a list"),
        }
    }
}

/// One `key = value` line, with its full dotted key (`server.listen`).
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// A syntax error at a line (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// The file's entries, or every syntax error in it (a line in error is
/// skipped, and so are the keys under a header in error, so one mistake
/// is reported once).
pub fn parse(text: &str) -> Result<Vec<Entry>, Vec<SyntaxError>> {
    if text.starts_with('\u{feff}') {
        return Err(vec![SyntaxError {
            line: 1,
            message:
                "the file starts with a byte-order mark (U+FEFF): save it as UTF-8 without one"
                    .into(),
        }]);
    }
    let mut errors = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut section = String::new();
    let mut tables = 0;
    // Each [section] header and its line: TOML allows one of each.
    let mut headers: Vec<(String, usize)> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    // The keys under a header in error belong nowhere: not reported again.
    const NOWHERE: &str = "\u{0}";
    while i < lines.len() {
        let line_no = i + 1;
        let err = |message: String| SyntaxError {
            line: line_no,
            message,
        };
        let line = lines[i].trim();
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut step = || -> Result<(), SyntaxError> {
            if let Some(rest) = line.strip_prefix("[[") {
                // The one array table: `[[access]]`, each entry's keys read
                // as `access.N.key` (N from 1, in file order).
                let name = strip_comment(rest)
                    .trim_end()
                    .strip_suffix("]]")
                    .map(str::trim);
                if name != Some("access") {
                    return Err(err(
                        "the only array table is [[access]]; use [section] headers for the rest"
                            .into(),
                    ));
                }
                tables += 1;
                section = format!("access.{tables}");
                return Ok(());
            }
            if let Some(rest) = line.strip_prefix('[') {
                let rest = strip_comment(rest);
                let name = rest
                    .trim_end()
                    .strip_suffix(']')
                    .ok_or_else(|| err("a section header must end with ']'".into()))?
                    .trim();
                if name.is_empty()
                    || !name
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(is_bare_key_char))
                {
                    return Err(err(format!(
                    "bad section name [{name}]: use letters, digits, '_' and '-', separated by '.'"
                )));
                }
                if let Some((_, first)) = headers.iter().find(|(h, _)| h == name) {
                    return Err(err(format!(
                    "[{name}] appears a second time (first on line {first}): TOML allows a section once; put its keys together"
                )));
                }
                headers.push((name.to_string(), line_no));
                section = name.to_string();
                return Ok(());
            }
            let Some((key, rest)) = line.split_once('=') else {
                return Err(err(format!(
                    "expected `key = value` or a [section] header, found {line:?}"
                )));
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(is_bare_key_char) {
                return Err(err(format!(
                "bad key {key:?}: use letters, digits, '_' and '-' (dotted and quoted keys are not supported)"
            )));
            }
            // An array may continue over the following lines until its ']'.
            let mut source = rest.trim().to_string();
            if source.starts_with('[') {
                while !array_closed(&source) && i < lines.len() {
                    source.push('\n');
                    source.push_str(lines[i]);
                    i += 1;
                }
            }
            let mut cursor = Cursor {
                chars: source.chars().collect(),
                pos: 0,
            };
            let value = cursor.value().map_err(&err)?;
            cursor.skip_space_and_comments();
            if cursor.pos < cursor.chars.len() {
                return Err(err(format!(
                    "unexpected text after the value of {key}: {:?}",
                    cursor.rest()
                )));
            }
            let full_key = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            if let Some(first) = entries.iter().find(|e| e.key == full_key) {
                return Err(err(format!(
                    "{full_key} is set twice (first on line {})",
                    first.line
                )));
            }
            if !section.starts_with(NOWHERE) {
                entries.push(Entry {
                    key: full_key,
                    value,
                    line: line_no,
                });
            }
            Ok(())
        };
        if let Err(e) = step() {
            if lines[line_no - 1].trim_start().starts_with('[') {
                section = NOWHERE.into();
            }
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

fn is_bare_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Drops a trailing `# comment` from a header line (headers hold no strings).
fn strip_comment(s: &str) -> &str {
    s.split('#').next().unwrap_or(s)
}

/// Whether the brackets of an array opened at the start of `s` are balanced,
/// ignoring brackets inside strings and comments.
fn array_closed(s: &str) -> bool {
    let mut depth = 0i32;
    let mut in_str: Option<char> = None;
    let mut escaped = false;
    let mut in_comment = false;
    for c in s.chars() {
        if in_comment {
            in_comment = c != '\n';
            continue;
        }
        if let Some(q) = in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' && q == '"' {
                escaped = true;
            } else if c == q {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => in_str = Some(c),
            '#' => in_comment = true,
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

struct Cursor {
    chars: Vec<char>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn rest(&self) -> String {
        self.chars[self.pos.min(self.chars.len())..]
            .iter()
            .collect()
    }

    fn skip_space_and_comments(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.pos += 1;
            } else if c == '#' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_space_and_comments();
        match self.peek() {
            None => Err("missing value after '='".into()),
            Some('"') => {
                if self.chars[self.pos..].starts_with(&['"', '"', '"']) {
                    return Err("multi-line strings are not supported".into());
                }
                self.basic_string().map(Value::Str)
            }
            Some('\'') => self.literal_string().map(Value::Str),
            Some('[') => self.array(),
            Some('{') => Err("inline tables are not supported; use a [section]".into()),
            Some(_) => self.scalar(),
        }
    }

    fn basic_string(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = self.peek().ok_or("unterminated string")?;
            self.pos += 1;
            match c {
                '"' => return Ok(out),
                '\n' => return Err("unterminated string".into()),
                '\\' => {
                    let e = self.peek().ok_or("unterminated string")?;
                    self.pos += 1;
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' | 'U' => {
                            let n = if e == 'u' { 4 } else { 8 };
                            let hex: String =
                                self.chars[self.pos..].iter().take(n).collect::<String>();
                            let ch = u32::from_str_radix(&hex, 16)
                                .ok()
                                .filter(|_| hex.len() == n)
                                .and_then(char::from_u32)
                                .ok_or_else(|| format!("bad escape \\{e}{hex}"))?;
                            self.pos += n;
                            out.push(ch);
                        }
                        other => return Err(format!("unknown escape \\{other} in a string")),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn literal_string(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None | Some('\n') => return Err("unterminated string".into()),
                Some('\'') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_space_and_comments();
            match self.peek() {
                None => return Err("unterminated array: missing ']'".into()),
                Some(']') => {
                    self.pos += 1;
                    return Ok(Value::List(items));
                }
                Some('[') => return Err("nested arrays are not supported".into()),
                _ => {}
            }
            items.push(self.value()?);
            self.skip_space_and_comments();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {}
                _ => return Err("expected ',' or ']' in an array".into()),
            }
        }
    }

    fn scalar(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_whitespace() || c == ',' || c == ']' || c == '#' {
                break;
            }
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        match word.as_str() {
            "true" => return Ok(Value::Bool(true)),
            "false" => return Ok(Value::Bool(false)),
            _ => {}
        }
        let digits = word.replace('_', "");
        if let Ok(i) = digits.parse::<i64>() {
            return Ok(Value::Int(i));
        }
        if digits.contains(['.', 'e', 'E']) {
            if let Ok(x) = digits.parse::<f64>() {
                if x.is_finite() {
                    return Ok(Value::Float(x));
                }
            }
        }
        let unsigned = digits.strip_prefix(['-', '+']).unwrap_or(&digits);
        if ["0x", "0o", "0b", "0X", "0O", "0B"]
            .iter()
            .any(|p| unsigned.starts_with(p))
        {
            return Err(format!(
                "{word:?}: hexadecimal, octal and binary numbers are not supported; write the number in decimal"
            ));
        }
        if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{word} is too large for an integer (at most {})",
                i64::MAX
            ));
        }
        Err(format!(
            "cannot read {word:?} as a value: strings need quotes, e.g. key = \"{word}\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Value {
        parse(text).unwrap().remove(0).value
    }

    #[test]
    fn reads_sections_keys_and_kinds() {
        let e = parse(
            "# comment\n[server]\nlisten = \"127.0.0.1:9\" # trailing\nmax = 1_000\n\n[provider.kimi]\nrate = 0.5\non = true\n",
        )
        .unwrap();
        let keys: Vec<_> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.listen", 3),
                ("server.max", 4),
                ("provider.kimi.rate", 7),
                ("provider.kimi.on", 8)
            ]
        );
        assert_eq!(e[0].value, Value::Str("127.0.0.1:9".into()));
        assert_eq!(e[1].value, Value::Int(1000));
        assert_eq!(e[2].value, Value::Float(0.5));
        assert_eq!(e[3].value, Value::Bool(true));
    }

    #[test]
    fn reads_strings_with_escapes_and_literals() {
        assert_eq!(one("k = \"a\\\"b\\u00e9\""), Value::Str("a\"bé".into()));
        assert_eq!(one("k = 'C:\\path#1'"), Value::Str("C:\\path#1".into()));
    }

    #[test]
    fn reads_multi_line_arrays_with_comments() {
        let v = one("k = [\n  \"a:1\", # first\n  \"b]:2\",\n]\n");
        assert_eq!(
            v,
            Value::List(vec![Value::Str("a:1".into()), Value::Str("b]:2".into())])
        );
    }

    fn first_err(text: &str) -> SyntaxError {
        parse(text).unwrap_err().remove(0)
    }

    #[test]
    fn every_error_is_reported_once() {
        let e = parse("a = 1 2\n[bad name]\nx = 1\n[ok]\nb = nope\nc = 3\n").unwrap_err();
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 2, 5], "{e:?}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = first_err("[server]\nlisten = 127.0.0.1:80\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("quotes"), "{}", e.message);
        assert_eq!(first_err("a = 1\na = 2\n").line, 2);
        assert_eq!(first_err("\n\n[[x]]\n").line, 3);
        assert_eq!(first_err("k = \"open\n").line, 1);
        assert_eq!(first_err("k = [1,\n2\n").line, 1);
        assert!(parse("k = {a = 1}").is_err());
        assert!(parse("a.b = 1").is_err());
        assert!(parse("k = 1 2").is_err());
        assert!(parse("[bad name]").is_err());
    }

    #[test]
    fn numbers_and_marks_get_hints() {
        let e = first_err("[s]\nk = 0x10\n");
        assert!(e.message.contains("write the number in decimal"), "{e:?}");
        let e = first_err("[s]\nk = 99999999999999999999\n");
        assert!(e.message.contains("too large for an integer"), "{e:?}");
        let e = first_err("\u{feff}[s]\nk = 1\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("byte-order mark"), "{e:?}");
    }
}
