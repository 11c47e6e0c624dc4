//! One line per event on stderr, which journald keeps with its own
//! timestamps and priorities. Text or JSON, by configuration.
//!
//! Fields are passed explicitly at every call, so what is logged is visible
//! at the call site: secrets are never handed to the logger.

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// A field's value: anything printable, and in JSON lines numbers and
/// booleans keep their type (`"conn":7`, not `"conn":"7"`), found by
/// their Rust type, never by what the text looks like (a user named
/// `123` stays a string).
pub trait Field: Display {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: Display + 'static> Field for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The JSON form of a number or boolean field, if it is one.
fn typed(v: &dyn Field) -> Option<String> {
    let a = v.as_any();
    macro_rules! ints {
        ($($t:ty),*) => {
            $(if let Some(n) = a.downcast_ref::<$t>() {
                return Some(n.to_string());
            })*
        };
    }
    ints!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);
    if let Some(b) = a.downcast_ref::<bool>() {
        return Some(b.to_string());
    }
    if let Some(f) = a.downcast_ref::<f64>() {
        // JSON has no NaN or infinity: those stay strings.
        return f.is_finite().then(|| f.to_string());
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy)]
pub struct Logger {
    level: LogLevel,
    format: LogFormat,
    /// stderr goes to the journal: text lines start with `<N>`, the
    /// syslog priority, which journald reads.
    journald: bool,
}

impl Logger {
    pub fn new(level: LogLevel, format: LogFormat) -> Logger {
        Logger {
            level,
            format,
            journald: false,
        }
    }

    /// Marks text lines with their priority when stderr is the journal
    /// (systemd sets `$JOURNAL_STREAM` for a service's stderr).
    pub fn for_journal(mut self, journald: bool) -> Logger {
        self.journald = journald;
        self
    }

    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    pub fn error(&self, msg: &str, fields: &[(&str, &dyn Field)]) {
        self.log(LogLevel::Error, msg, fields)
    }

    pub fn warn(&self, msg: &str, fields: &[(&str, &dyn Field)]) {
        self.log(LogLevel::Warn, msg, fields)
    }

    pub fn info(&self, msg: &str, fields: &[(&str, &dyn Field)]) {
        self.log(LogLevel::Info, msg, fields)
    }

    pub fn debug(&self, msg: &str, fields: &[(&str, &dyn Field)]) {
        self.log(LogLevel::Debug, msg, fields)
    }

    pub fn log(&self, level: LogLevel, msg: &str, fields: &[(&str, &dyn Field)]) {
        if !self.enabled(level) {
            return;
        }
        let line = self.format_line(SystemTime::now(), level, msg, fields);
        // A full or closed stderr must not take the gateway down.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn format_line(
        &self,
        at: SystemTime,
        level: LogLevel,
        msg: &str,
        fields: &[(&str, &dyn Field)],
    ) -> String {
        let ts = rfc3339(at);
        let name = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        };
        let mut line = String::with_capacity(128);
        match self.format {
            LogFormat::Text => {
                if self.journald {
                    let priority = match level {
                        LogLevel::Error => 3,
                        LogLevel::Warn => 4,
                        LogLevel::Info => 6,
                        LogLevel::Debug => 7,
                    };
                    let _ = write!(line, "<{priority}>");
                }
                let _ = write!(line, "{ts} {name:<5} {msg}");
                for (k, v) in fields {
                    let v = v.to_string();
                    // Quoted (and so escaped) when it holds anything a
                    // reader of the line could take for structure: a
                    // client's name may carry CR, ESC or NUL.
                    if v.is_empty()
                        || v.contains([' ', '"', '=', '\\'])
                        || v.chars().any(char::is_control)
                    {
                        let _ = write!(line, " {k}={v:?}");
                    } else {
                        let _ = write!(line, " {k}={v}");
                    }
                }
            }
            LogFormat::Json => {
                line.push_str("{\"ts\":");
                crate::json::escape_into(&mut line, &ts);
                let _ = write!(line, ",\"level\":\"{name}\",\"msg\":");
                crate::json::escape_into(&mut line, msg);
                for (k, v) in fields {
                    line.push(',');
                    crate::json::escape_into(&mut line, k);
                    line.push(':');
                    match typed(*v) {
                        Some(n) => line.push_str(&n),
                        None => crate::json::escape_into(&mut line, &v.to_string()),
                    }
                }
                line.push('}');
            }
        }
        // One event, one line, whatever a field held.
        let mut line = line.replace('\n', "\\n");
        line.push('\n');
        line
    }
}

/// Sends the `log` records of the libraries (ureq, rustls, tungstenite)
/// to `logger`, at its level: a TLS handshake failure or a dropped pooled
/// connection upstream shows up where the operator looks. Trace records
/// are never taken (ureq writes raw request headers, API keys included,
/// only at trace). The record's text is a field, so it is quoted and
/// escaped like any other outside text.
///
/// The `log` crate's logger is process-wide by its design; this is the
/// one place that sets it, once, at start.
pub fn route_libraries(logger: Logger) {
    let max = match logger.level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
    };
    if log::set_boxed_logger(Box::new(Libraries(logger))).is_ok() {
        log::set_max_level(max);
    }
}

struct Libraries(Logger);

fn level_of(l: log::Level) -> Option<LogLevel> {
    match l {
        log::Level::Error => Some(LogLevel::Error),
        log::Level::Warn => Some(LogLevel::Warn),
        log::Level::Info => Some(LogLevel::Info),
        log::Level::Debug => Some(LogLevel::Debug),
        log::Level::Trace => None,
    }
}

impl log::Log for Libraries {
    fn enabled(&self, m: &log::Metadata) -> bool {
        level_of(m.level()).is_some_and(|l| self.0.enabled(l))
    }

    fn log(&self, r: &log::Record) {
        if let Some(level) = level_of(r.level()) {
            self.0.log(
                level,
                "library",
                &[
                    ("target", &r.target().to_string()),
                    ("text", &r.args().to_string()),
                ],
            );
        }
    }

    fn flush(&self) {}
}

/// `2026-11-22T02:22:12.123Z`, without a date crate.
fn rfc3339(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::clock::date_of_day(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_732_240_000_123);
        assert_eq!(rfc3339(t), "2024-11-22T01:46:40.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn text_and_json_lines() {
        let t = UNIX_EPOCH;
        let text = Logger::new(LogLevel::Info, LogFormat::Text).format_line(
            t,
            LogLevel::Warn,
            "closed",
            &[("conn", &7), ("reason", &"hello timeout")],
        );
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000Z warn  closed conn=7 reason=\"hello timeout\"\n"
        );
        let journal = Logger::new(LogLevel::Info, LogFormat::Text)
            .for_journal(true)
            .format_line(t, LogLevel::Warn, "closed", &[("conn", &7)]);
        assert_eq!(journal, "<4>1970-01-01T00:00:00.000Z warn  closed conn=7\n");
        let hostile = Logger::new(LogLevel::Info, LogFormat::Text).format_line(
            t,
            LogLevel::Info,
            "hello",
            &[("client", &"x\r\u{1b}[2J\0y")],
        );
        assert_eq!(
            hostile,
            "1970-01-01T00:00:00.000Z info  hello client=\"x\\r\\u{1b}[2J\\0y\"\n"
        );
        let json = Logger::new(LogLevel::Info, LogFormat::Json).format_line(
            t,
            LogLevel::Info,
            "a\nb",
            &[
                ("conn", &7u64),
                ("ok", &true),
                ("user", &"123"),
                ("rate", &0.5f64),
                ("nan", &f64::NAN),
            ],
        );
        assert_eq!(
            json,
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"level\":\"info\",\"msg\":\"a\\nb\",\"conn\":7,\"ok\":true,\"user\":\"123\",\"rate\":0.5,\"nan\":\"NaN\"}\n"
        );
    }
}
