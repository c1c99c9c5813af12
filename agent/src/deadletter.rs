//! Rejected input is never thrown away silently: every rejection is counted, logged at most
//! once per source per [`LOG_INTERVAL`] (with how many were suppressed), and a bounded sample
//! ([`SAMPLES_PER_INTERVAL`] per source per interval, [`MAX_SAMPLE_BYTES`] each) goes upstream
//! on the dead-letter topic with the reason. Where the input came from (a topic, a port) is
//! kept up to [`MAX_LOCATION_BYTES`]; a longer one is cut and ends in a marker that gives its
//! full length.

use std::time::{Duration, Instant};

use crate::outbox::record::DeadLetterRecord;
use crate::source::reading::now_ms;

/// How often a source may log a rejection.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Dead-letter samples a source sends upstream per interval.
pub const SAMPLES_PER_INTERVAL: u32 = 10;
/// Bytes of the rejected input kept in a sample: the protocol's dead-letter payload limit
/// (protocol/README.md, "Gateway status and dead letter"). Ten samples per source per
/// interval keep this to about 10 KiB per source every ten seconds.
pub const MAX_SAMPLE_BYTES: usize = 1024;
/// Bytes of a sample's `where` kept before the cut marker.
pub const MAX_LOCATION_BYTES: usize = 256;

/// `location`, cut to [`MAX_LOCATION_BYTES`] at a character boundary and then marked
/// `…[cut, N bytes]` (N: its full length) if longer.
pub fn cut_location(location: &str) -> String {
    if location.len() <= MAX_LOCATION_BYTES {
        return location.to_string();
    }
    let mut end = MAX_LOCATION_BYTES;
    while !location.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut, {} bytes]", &location[..end], location.len())
}

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
        let location = cut_location(location);
        let location = location.as_str();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_keeps_the_protocol_payload_limit_and_a_cut_location() {
        let topic = format!("sensors/{}/t", "d".repeat(10 * 1024));
        let payload = vec![b'x'; 5000];
        let s = RejectSampler::new("test")
            .reject(&topic, "too long", &payload)
            .unwrap();
        assert_eq!(s.payload.len(), MAX_SAMPLE_BYTES);
        assert!(s.location.len() < MAX_LOCATION_BYTES + 32, "{}", s.location);
        assert!(s.location.starts_with("sensors/ddd"));
        assert!(s
            .location
            .ends_with(&format!("…[cut, {} bytes]", topic.len())));
        assert_eq!(cut_location("sensors/a/b"), "sensors/a/b");
        // Never inside a character.
        let wide = "é".repeat(MAX_LOCATION_BYTES);
        assert!(cut_location(&wide).contains("…[cut, "));
    }
}
