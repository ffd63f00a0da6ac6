//! Logging setup shared by every binary: JSON or human-readable, filtered by `RUST_LOG`.
//!
//! Secrets never reach this layer (they have no `Debug`/`Display`); user-supplied strings that
//! are logged go through `sanitize` so a prompt or name cannot forge log lines.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    Json,
    #[default]
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            _ => Err(format!("unknown log format {s:?}: use json or pretty")),
        }
    }
}

/// Installs the global subscriber, writing to stderr. Default level `info`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files must not carry escape sequences.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (e.g. in tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Makes untrusted text safe for a log line: control characters are escaped and the length is
/// capped (on a char boundary).
pub fn sanitize(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_controls_and_caps_on_char_boundary() {
        assert_eq!(sanitize("a\r\nb", 10), "a\\r\\nb");
        assert_eq!(sanitize("\x1b[31m", 10), "\\u{1b}[31m");
        assert_eq!(sanitize("日本語", 2), "日本…");
    }
}
