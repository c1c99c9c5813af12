//! Rejected input is never thrown away silently: every rejection is counted, logged at most
//! once per source per [`LOG_INTERVAL`] (with how many were suppressed), and a bounded sample
//! ([`SAMPLES_PER_INTERVAL`] per source per interval, [`MAX_SAMPLE_BYTES`] each) goes upstream
//! on the dead-letter topic with the reason.

use std::time::{Duration, Instant};

use crate::outbox::record::DeadLetterRecord;
use crate::source::reading::now_ms;

/// How often a source may log a rejection.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Dead-letter samples a source sends upstream per interval.
pub const SAMPLES_PER_INTERVAL: u32 = 10;
/// Bytes of the rejected input kept in a sample.
pub const MAX_SAMPLE_BYTES: usize = 256;

/// Per-source rejection bookkeeping.
#[derive(Debug)]
pub struct RejectSampler {
    source: &'static str,
    window_start: Instant,
    logged_in_window: bool,
    suppressed_logs: u64,
    samples_in_window: u32,
}

impl RejectSampler {
    pub fn new(source: &'static str) -> Self {
        Self {
            source,
            window_start: Instant::now(),
            logged_in_window: false,
            suppressed_logs: 0,
            samples_in_window: 0,
        }
    }

    /// Records one rejection; returns the dead-letter sample to send, if this one is sampled.
    pub fn reject(
        &mut self,
        location: &str,
        reason: &str,
        payload: &[u8],
    ) -> Option<DeadLetterRecord> {
        if self.window_start.elapsed() >= LOG_INTERVAL {
            self.window_start = Instant::now();
            self.logged_in_window = false;
            self.samples_in_window = 0;
        }
        if self.logged_in_window {
            self.suppressed_logs += 1;
        } else {
            tracing::warn!(
                source = self.source,
                location,
                reason,
                suppressed_since_last = self.suppressed_logs,
                "rejected input"
            );
            self.logged_in_window = true;
            self.suppressed_logs = 0;
        }
        if self.samples_in_window >= SAMPLES_PER_INTERVAL {
            return None;
        }
        self.samples_in_window += 1;
        Some(DeadLetterRecord {
            source: self.source.to_string(),
            location: location.to_string(),
            reason: reason.to_string(),
            payload: payload[..payload.len().min(MAX_SAMPLE_BYTES)].to_vec(),
            ts_ms: now_ms(),
        })
    }
}
