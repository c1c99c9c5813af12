//! What the agent says about a broker it cannot reach: a warning on the first failed attempt,
//! then at most one line per [`REPEAT_EVERY`] with the number of attempts since, and one line
//! when it connects again. A broker down at start is visible at once, and one down for a day
//! does not fill the journal (attempts run every few seconds at most, by the backoff).

use std::time::{Duration, Instant};

/// Least time between two "still unreachable" lines for one broker.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// The reachability of one broker, as logged.
#[derive(Debug)]
pub struct ConnLog {
    /// `local broker` or `cloud broker`: part of every line.
    broker: &'static str,
    /// First failure of the current outage, and attempts failed since.
    down_since: Option<Instant>,
    failures: u64,
    /// When the last line about this outage was written, and attempts failed since.
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl ConnLog {
    pub fn new(broker: &'static str) -> Self {
        Self {
            broker,
            down_since: None,
            failures: 0,
            logged_at: None,
            unlogged: 0,
        }
    }

    /// An attempt to connect failed (or an established connection was lost) because of
    /// `reason`.
    pub fn failed(&mut self, reason: &str) {
        let now = Instant::now();
        let since = *self.down_since.get_or_insert(now);
        self.failures += 1;
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|t| now.duration_since(t) >= REPEAT_EVERY);
        if !due {
            return;
        }
        if self.logged_at.is_none() {
            tracing::warn!(broker = self.broker, %reason, "{} unreachable; retrying with backoff", self.broker);
        } else {
            tracing::warn!(
                broker = self.broker,
                %reason,
                attempts = self.unlogged,
                down_secs = now.duration_since(since).as_secs(),
                "{} still unreachable", self.broker
            );
        }
        self.logged_at = Some(now);
        self.unlogged = 0;
    }

    /// Connected: ends the outage, if there was one, with a line that says how long it lasted.
    pub fn connected(&mut self) {
        if let Some(since) = self.down_since.take() {
            tracing::info!(
                broker = self.broker,
                attempts = self.failures,
                down_secs = since.elapsed().as_secs(),
                "{} reachable again",
                self.broker
            );
        }
        self.failures = 0;
        self.logged_at = None;
        self.unlogged = 0;
    }
}
