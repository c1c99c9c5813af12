//! The `[outbox]` section: durability, the byte cap and what gives way when it is reached,
//! the age limit, and how long a group commit may wait to share its flush.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validation::{bad, Problem};

/// Longest a group commit waits after its first input for more input to share its flush
/// (`outbox.commit_linger_ms` overrides it). It bounds the latency and the acknowledgement
/// delay that grouping adds; longer means fewer flushes, fewer bytes written and less CPU per
/// reading at gateway rates. docs/performance.md gives the measured trade.
pub const COMMIT_LINGER: Duration = Duration::from_millis(16);

/// Smallest outbox byte cap that still holds a useful backlog.
pub const MIN_OUTBOX_BYTES: u64 = 1 << 20;

/// Bounds of `outbox.max_age_secs`: ages are kept in whole seconds; ten years is "forever".
pub const MIN_OUTBOX_AGE_SECS: u64 = 1;

pub const MAX_OUTBOX_AGE_SECS: u64 = 10 * 365 * 24 * 3600;

/// Longest `outbox.commit_linger_ms` accepted: a second of acknowledgement delay.
pub const MAX_COMMIT_LINGER_MS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every batch is flushed to disk before anything is acknowledged upstream (default).
    Batch,
    /// Committed (`fdatasync`) every `flush_interval_ms`: fewer syncs for SD cards, but a
    /// power cut loses what was appended since the last commit (at most that interval of
    /// input plus the commit in progress), although it was acknowledged.
    Interval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Make room by dropping the oldest telemetry; alerts go only when no telemetry is left.
    DropOldestTelemetry,
    /// Keep what is stored and refuse new records.
    RefuseNew,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Cap on stored record bytes (keys + values); see ARCHITECTURE.md for the on-disk margin.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// Accepted and unused: the outbox's segment log keeps no cache of its own (the kernel's
    /// page cache serves its reads). Still validated, so that existing configs stay valid.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Only with `durability = "interval"`.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Longest a group commit waits after its first input for more to share its flush
    /// ([`COMMIT_LINGER`] by default). Longer means fewer flushes, fewer bytes
    /// written and less CPU at gateway rates, for that much more latency and acknowledgement
    /// delay; the flush before every acknowledgement stays.
    #[serde(default = "default_commit_linger_ms")]
    pub commit_linger_ms: u64,
    #[serde(default = "default_full_policy")]
    pub full_policy: FullPolicy,
    /// Telemetry stored longer than this is dropped, oldest first (alerts and control
    /// messages never are). Off by default: telemetry waits until the cap.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

fn default_outbox_bytes() -> u64 {
    256 << 20
}

fn default_cache_bytes() -> u64 {
    4 << 20
}

fn default_durability() -> Durability {
    Durability::Batch
}

fn default_flush_interval_ms() -> u64 {
    1_000
}

fn default_commit_linger_ms() -> u64 {
    COMMIT_LINGER.as_millis() as u64
}

fn default_full_policy() -> FullPolicy {
    FullPolicy::DropOldestTelemetry
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_outbox_bytes(),
            cache_bytes: default_cache_bytes(),
            durability: default_durability(),
            flush_interval_ms: default_flush_interval_ms(),
            commit_linger_ms: default_commit_linger_ms(),
            full_policy: default_full_policy(),
            max_age_secs: None,
        }
    }
}

impl OutboxConfig {
    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
        if self.max_bytes < MIN_OUTBOX_BYTES {
            bad(
                p,
                "outbox.max_bytes",
                format!("must be at least {MIN_OUTBOX_BYTES}"),
            );
        }
        if self.cache_bytes < 256 * 1024 || self.cache_bytes > 1 << 30 {
            bad(
                p,
                "outbox.cache_bytes",
                "must be between 262144 and 1073741824",
            );
        }
        if self.durability == Durability::Interval
            && (self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000)
        {
            bad(p, "outbox.flush_interval_ms", "must be between 1 and 60000");
        }
        if self.commit_linger_ms > MAX_COMMIT_LINGER_MS {
            bad(
                p,
                "outbox.commit_linger_ms",
                format!("must be between 0 and {MAX_COMMIT_LINGER_MS}"),
            );
        }
        if let Some(age) = self.max_age_secs {
            if !(MIN_OUTBOX_AGE_SECS..=MAX_OUTBOX_AGE_SECS).contains(&age) {
                bad(
                    p,
                    "outbox.max_age_secs",
                    format!("must be between {MIN_OUTBOX_AGE_SECS} and {MAX_OUTBOX_AGE_SECS} (10 years), or left out"),
                );
            }
        }
    }
}
