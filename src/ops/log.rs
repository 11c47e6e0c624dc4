//! One line per event on stderr, which journald keeps with its own
//! timestamps and priorities. Text or JSON, by configuration.
//!
//! Fields are passed explicitly at every call, so what is logged is visible
//! at the call site: secrets are never handed to the logger.

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

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

    pub fn warn(&self, msg: &str, fields: &[(&str, &dyn Display)]) {
        self.log(LogLevel::Warn, msg, fields)
    }

    pub fn info(&self, msg: &str, fields: &[(&str, &dyn Display)]) {
        self.log(LogLevel::Info, msg, fields)
    }

    pub fn debug(&self, msg: &str, fields: &[(&str, &dyn Display)]) {
        self.log(LogLevel::Debug, msg, fields)
    }

    pub fn log(&self, level: LogLevel, msg: &str, fields: &[(&str, &dyn Display)]) {
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
        fields: &[(&str, &dyn Display)],
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
                    crate::json::escape_into(&mut line, &v.to_string());
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

/// `2026-11-22T02:22:12.123Z`, without a date crate.
fn rfc3339(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days, after Howard Hinnant's algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
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
            &[("conn", &7)],
        );
        assert_eq!(
            json,
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"level\":\"info\",\"msg\":\"a\\nb\",\"conn\":\"7\"}\n"
        );
    }
}
