//! Storage failure as a state of the outbox, not a string of errors.
//!
//! When the disk is full (ENOSPC) or failing, appends and group commits return errors: nothing
//! is acknowledged to producers and they retry. This module turns those errors into one state
//! that operators can see and that ends by itself:
//! - **entered** on the first failed append or commit: logged once at error level with the
//!   error, `edgestream_outbox_storage_failing` set to 1, the health message's
//!   `summary.outbox.storage` says `"ok": false` with the error and for how long;
//! - **while failing**: every failed attempt is counted (`edgestream_outbox_storage_errors_total`),
//!   and a summary line is logged at most once per [`LOG_EVERY`];
//! - **left** when storage works again: an append succeeded after the last failed append and a
//!   group commit succeeded after it (so the records of that append are durable). Logged with
//!   how long it lasted and how many attempts failed.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::telemetry::metrics::Metrics;

/// Longest interval between two log lines about a storage failure that goes on.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// What the health message says about the outbox's storage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StorageStatus {
    pub ok: bool,
    /// The last error, while failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the failure began, while failing.
    pub failing_secs: u64,
    /// Failed attempts since the failure began.
    pub failures: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Append,
    Commit,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Append => "append",
            Op::Commit => "commit",
        }
    }
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    error: String,
    failures: u64,
    last_log: Instant,
    failures_logged: u64,
    /// The last failure was an append's, and no append has succeeded since.
    append_pending: bool,
}

/// The storage state of one outbox; cheap to update on every append and commit (one
/// uncontended lock while healthy).
#[derive(Debug, Default)]
pub struct StorageFault {
    failing: Mutex<Option<Failing>>,
}

impl StorageFault {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Failing>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the result of `op`.
    pub fn observe<T>(&self, op: Op, result: &io::Result<T>, metrics: &Metrics) {
        match result {
            Ok(_) => self.succeeded(op, metrics),
            Err(e) => self.failed(op, e, metrics),
        }
    }

    pub fn failed(&self, op: Op, e: &io::Error, metrics: &Metrics) {
        Metrics::inc(&metrics.outbox_storage_errors);
        let mut f = self.lock();
        let now = Instant::now();
        match &mut *f {
            None => {
                tracing::error!(
                    error = %e,
                    op = op.name(),
                    "outbox storage failing: nothing is acknowledged to producers until it works again; retrying"
                );
                Metrics::set(&metrics.outbox_storage_failing, 1);
                *f = Some(Failing {
                    since: now,
                    error: e.to_string(),
                    failures: 1,
                    last_log: now,
                    failures_logged: 1,
                    append_pending: op == Op::Append,
                });
            }
            Some(s) => {
                s.failures += 1;
                s.error = e.to_string();
                s.append_pending |= op == Op::Append;
                if now.duration_since(s.last_log) >= LOG_EVERY {
                    tracing::error!(
                        error = %e,
                        failing_secs = s.since.elapsed().as_secs(),
                        failures = s.failures,
                        since_last_log = s.failures - s.failures_logged,
                        "outbox storage still failing; retrying"
                    );
                    s.last_log = now;
                    s.failures_logged = s.failures;
                }
            }
        }
    }

    pub fn succeeded(&self, op: Op, metrics: &Metrics) {
        let mut f = self.lock();
        let Some(s) = &mut *f else {
            return;
        };
        match op {
            Op::Append => s.append_pending = false,
            Op::Commit if !s.append_pending => {
                tracing::warn!(
                    failing_secs = s.since.elapsed().as_secs(),
                    failures = s.failures,
                    "outbox storage works again"
                );
                Metrics::set(&metrics.outbox_storage_failing, 0);
                *f = None;
            }
            Op::Commit => {}
        }
    }

    pub fn status(&self) -> StorageStatus {
        match &*self.lock() {
            None => StorageStatus {
                ok: true,
                ..StorageStatus::default()
            },
            Some(s) => StorageStatus {
                ok: false,
                error: Some(s.error.clone()),
                failing_secs: s.since.elapsed().as_secs(),
                failures: s.failures,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(28))
    }

    #[test]
    fn a_failure_is_a_state_that_ends_after_an_append_and_a_commit_succeed() {
        let m = Metrics::default();
        let f = StorageFault::default();
        assert!(f.status().ok);
        f.observe(Op::Commit, &Ok(()), &m);
        f.observe(Op::Append, &enospc(), &m);
        f.observe(Op::Append, &enospc(), &m);
        let s = f.status();
        assert!(!s.ok);
        assert_eq!(s.failures, 2);
        assert!(
            s.error.unwrap().contains("No space left"),
            "names the error"
        );
        assert_eq!(m.snapshot().outbox_storage_failing, 1);
        assert_eq!(m.snapshot().outbox_storage_errors, 2);
        // A commit with nothing appended proves nothing about the failed append.
        f.observe(Op::Commit, &Ok(()), &m);
        assert!(!f.status().ok);
        f.observe(Op::Append, &Ok(()), &m);
        assert!(!f.status().ok, "not durable until committed");
        f.observe(Op::Commit, &Ok(()), &m);
        assert!(f.status().ok);
        assert_eq!(m.snapshot().outbox_storage_failing, 0);
        assert_eq!(m.snapshot().outbox_storage_errors, 2);
    }

    #[test]
    fn a_failed_commit_ends_with_the_next_successful_commit() {
        let m = Metrics::default();
        let f = StorageFault::default();
        f.observe(Op::Commit, &enospc(), &m);
        assert!(!f.status().ok);
        f.observe(Op::Commit, &Ok(()), &m);
        assert!(f.status().ok);
    }
}
