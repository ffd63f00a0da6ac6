//! The line `skep submit` keeps on stderr while a job waits at the queen: its position and how
//! long until it is predicted to start, counted down locally between the queen's events.

use std::io::Write;
use std::time::{Duration, Instant};

/// How often the line is redrawn.
pub const TICK: Duration = Duration::from_millis(250);

/// When to show the progress line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Progress {
    /// When stderr is a terminal and the output is not JSON.
    Auto,
    Always,
    Never,
}

/// A job waiting at the queen, as the queen described it when it was accepted.
pub struct Waiting {
    position: u32,
    starts_at: Instant,
}

impl Waiting {
    pub fn new(position: u32, starts_at: Instant) -> Waiting {
        Waiting {
            position,
            starts_at,
        }
    }

    /// Redraws the line in place.
    pub fn show(&self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{:<60}", self.text(Instant::now()));
        let _ = err.flush();
    }

    /// Wipes the line: the job has moved on.
    pub fn clear(&self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{:<60}\r", "");
        let _ = err.flush();
    }

    fn text(&self, now: Instant) -> String {
        let left = self.starts_at.saturating_duration_since(now);
        if left.is_zero() {
            format!("queued: position {}, starting now", self.position)
        } else {
            format!(
                "queued: position {}, predicted to start in {:.1}s",
                self.position,
                left.as_secs_f64()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_counts_down_to_the_predicted_start() {
        let now = Instant::now();
        let w = Waiting::new(3, now + Duration::from_millis(2_500));
        assert_eq!(
            w.text(now),
            "queued: position 3, predicted to start in 2.5s"
        );
        assert_eq!(
            w.text(now + Duration::from_secs(2)),
            "queued: position 3, predicted to start in 0.5s"
        );
        assert_eq!(
            w.text(now + Duration::from_secs(3)),
            "queued: position 3, starting now"
        );
    }
}
