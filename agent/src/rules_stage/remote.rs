//! Rule bundles over MQTT: versioned, validated, applied atomically, persisted, reported.
//!
//! A bundle arrives on `{prefix}/{gateway}/rules/set` (and, if configured, on a group topic)
//! as `{"v":1,"version":7,"rules":"...","rollback":false,"meta":{}}`. For each one, in order:
//!
//! 1. it is decoded and checked against the protocol's limits (size, UTF-8, schema);
//! 2. a version above [`MAX_BUNDLE_VERSION`] is refused (else one bundle at `u64::MAX` would
//!    leave no newer version to push); a version not newer than the running one is refused,
//!    unless `rollback` is true (`rollback` with empty `rules` means "go back to the bundle
//!    before this one", which then runs under its own version again);
//! 3. the rules are compiled; any error refuses the whole bundle, reporting every error with
//!    its line and column;
//! 4. the accepted bundle is written to `data_dir/rules/bundle.json` (temporary file, fsync,
//!    rename, fsync of the directory) **before** anything else, so a restart, even with the
//!    cloud unreachable, comes up on it;
//! 5. the compiled plan goes to the rules stage, which swaps it in between two groups of
//!    readings: no reading is lost or evaluated twice; state of unchanged rules carries over;
//! 6. a status reply goes to `.../rules/status` through the outbox (so it survives an outage),
//!    the retained `.../status` message is updated with the running version and hash, and
//!    only then is the MQTT message acknowledged. A crash before the acknowledgement makes the
//!    broker redeliver the bundle, which is then refused as not newer (already applied) or
//!    applied again: never lost.
//!
//! Every status names the version of the request it answers (for a rollback to the previous
//! bundle, the request's version; the retained status shows the version that runs). A bundle
//! refused before its version could be read at all is answered with version 0 and a reason
//! that starts `version unreadable: `.
//!
//! Precedence at start-up: a persisted remote bundle wins over `[rules]` in the config file
//! (the config's rules are version 0, the factory default). Delete `data_dir/rules/` to go
//! back to the file's rules.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgestream_protocol::json::{decode_bundle, encode_bundle_status};
use edgestream_protocol::limits::{
    MAX_BUNDLE_ERRORS, MAX_BUNDLE_ERROR_MESSAGE_LEN, MAX_BUNDLE_JSON_LEN, MAX_REASON_LEN,
};
use edgestream_protocol::types::{BundleError, BundleStatus};
use edgestream_rules::Plan;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::outbox::record::{ControlRecord, Record};
use crate::outbox::store::Outbox;
use crate::telemetry::metrics::Metrics;
use crate::uplink::inbound::InboundMsg;
use crate::uplink::link::StatusInfo;
use crate::uplink::wire::truncated;

/// Capacity of the channel from the uplink to this consumer (full-policy: block the uplink;
/// bundles are rare).
pub const INBOUND_CAPACITY: usize = 4;

/// Highest bundle version accepted: 2^53 - 1, the largest integer every JSON implementation
/// (a JavaScript cloud among them) reads exactly. A higher version is refused, so that the
/// version space cannot be used up by one bundle.
pub const MAX_BUNDLE_VERSION: u64 = (1 << 53) - 1;

/// The `version` of a bundle that did not decode, if it can be read at all.
fn readable_version(payload: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Version {
        version: u64,
    }
    serde_json::from_slice::<Version>(payload)
        .ok()
        .map(|v| v.version)
}

/// `reason` for a bundle refused before its version could be read.
fn unreadable(reason: String, version: Option<u64>) -> (u64, String) {
    match version {
        Some(v) => (v, reason),
        // First, so that cutting the reason to the protocol's length keeps it.
        None => (0, format!("version unreadable: {reason}")),
    }
}

/// A bundle as persisted on the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredBundle {
    pub version: u64,
    pub rules: String,
}

/// What is persisted: the running bundle and the one before it (for a rollback).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredState {
    pub current: Option<StoredBundle>,
    pub previous: Option<StoredBundle>,
}

const FILE: &str = "bundle.json";

/// The on-disk home of the applied bundle.
#[derive(Debug, Clone)]
pub struct RuleStore {
    dir: PathBuf,
}

impl RuleStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("rules"),
        }
    }

    /// The persisted state; `Ok(default)` when nothing was ever applied.
    pub fn load(&self) -> std::io::Result<StoredState> {
        match crate::durable_file::read(&self.dir, FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            None => Ok(StoredState::default()),
        }
    }

    /// Atomically replaces the persisted state: after a crash at any point, `load` returns
    /// either the old state or the new one.
    pub fn save(&self, state: &StoredState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        crate::durable_file::replace(&self.dir, FILE, &bytes)
    }
}

/// Stable identifier of a rule text, reported in status messages.
pub fn hash_hex(plan: &Plan) -> String {
    format!("{:016x}", plan.hash())
}

/// Consumes rule bundles from the uplink.
#[derive(Debug)]
pub struct RemoteRules {
    store: RuleStore,
    state: StoredState,
    plans: mpsc::Sender<Plan>,
    status: watch::Sender<StatusInfo>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
}

impl RemoteRules {
    pub fn new(
        store: RuleStore,
        state: StoredState,
        plans: mpsc::Sender<Plan>,
        status: watch::Sender<StatusInfo>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            state,
            plans,
            status,
            outbox,
            metrics,
        }
    }

    fn running_version(&self) -> u64 {
        self.state.current.as_ref().map_or(0, |b| b.version)
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<InboundMsg>) {
        while let Some(msg) = rx.recv().await {
            let status = self.handle(&msg.publish.payload).await;
            let mut payload = Vec::new();
            match encode_bundle_status(&status, &mut payload) {
                Ok(()) => {
                    let record = Record::Control(ControlRecord {
                        topic_suffix: "rules/status".into(),
                        payload,
                    });
                    let stored = match self.outbox.append(std::slice::from_ref(&record)) {
                        Ok(_) => self.outbox.flush().await.is_ok(),
                        Err(_) => false,
                    };
                    if !stored {
                        // Not acknowledged: the broker redelivers and we answer again.
                        tracing::error!("rule bundle status could not be stored; leaving the bundle unacknowledged");
                        continue;
                    }
                }
                Err(e) => tracing::error!(error = %e, "rule bundle status could not be encoded"),
            }
            msg.ack.ack();
        }
    }

    /// Checks, persists and applies one bundle; returns the status to report.
    async fn handle(&mut self, payload: &[u8]) -> BundleStatus {
        if payload.len() > MAX_BUNDLE_JSON_LEN {
            let (version, why) = unreadable(
                format!(
                    "bundle is {} bytes, the limit is {MAX_BUNDLE_JSON_LEN}",
                    payload.len()
                ),
                readable_version(payload),
            );
            return self.reject(version, why, &[]);
        }
        let bundle = match decode_bundle(payload) {
            Ok(b) => b,
            Err(e) => {
                let why = if std::str::from_utf8(payload).is_err() {
                    format!("bundle is not valid UTF-8 JSON: {e}")
                } else {
                    format!("bundle is malformed: {e}")
                };
                let (version, why) = unreadable(why, readable_version(payload));
                return self.reject(version, why, &[]);
            }
        };
        if bundle.version > MAX_BUNDLE_VERSION {
            return self.reject(
                bundle.version,
                format!(
                    "version {} is above the ceiling {MAX_BUNDLE_VERSION}",
                    bundle.version
                ),
                &[],
            );
        }
        let running = self.running_version();
        let target = if bundle.rollback && bundle.rules.trim().is_empty() {
            match &self.state.previous {
                // The restored bundle runs under its own version again.
                Some(prev) => prev.clone(),
                None => {
                    return self.reject(
                        bundle.version,
                        "rollback requested but there is no previous bundle".into(),
                        &[],
                    )
                }
            }
        } else {
            if !bundle.rollback && bundle.version <= running {
                return self.reject(
                    bundle.version,
                    format!("version {} is not newer than the running version {running}; mark it \"rollback\": true to go back", bundle.version),
                    &[],
                );
            }
            StoredBundle {
                version: bundle.version,
                rules: bundle.rules.clone(),
            }
        };
        let plan = match edgestream_rules::compile(&target.rules) {
            Ok(plan) => plan,
            Err(errors) => {
                let n = errors.0.len();
                let list: Vec<(u32, u32, String)> = errors
                    .0
                    .into_iter()
                    .map(|e| (e.line, e.column, e.message))
                    .collect();
                return self.reject(bundle.version, format!("{n} compile error(s)"), &list);
            }
        };
        let next = StoredState {
            previous: self.state.current.clone(),
            current: Some(target),
        };
        if let Err(e) = self.store.save(&next) {
            return self.reject(
                bundle.version,
                format!("cannot persist the bundle: {e}"),
                &[],
            );
        }
        self.state = next;
        let (rule_count, memory, hash) = (plan.rule_count(), plan.state_bytes(), hash_hex(&plan));
        if self.plans.send(plan).await.is_err() {
            tracing::error!(
                "rules stage is gone; the bundle is persisted and applies at the next start"
            );
        }
        let running = self.running_version();
        self.status.send_replace(StatusInfo {
            rules_version: running,
            rules_hash: hash.clone(),
        });
        Metrics::inc(&self.metrics.bundles_applied);
        tracing::info!(
            version = running,
            request_version = bundle.version,
            rollback = bundle.rollback,
            rules = rule_count,
            "rule bundle applied"
        );
        BundleStatus::Applied {
            version: bundle.version,
            hash: heapless::String::try_from(hash.as_str()).unwrap_or_default(),
            rule_count: rule_count as u32,
            memory_bytes: memory as u64,
        }
    }

    fn reject(&self, version: u64, reason: String, errors: &[(u32, u32, String)]) -> BundleStatus {
        Metrics::inc(&self.metrics.bundles_rejected);
        tracing::warn!(version, %reason, errors = errors.len(), "rule bundle rejected");
        let mut reason = reason;
        if errors.len() > MAX_BUNDLE_ERRORS {
            reason = format!("{reason}; the first {MAX_BUNDLE_ERRORS} are listed");
        }
        let mut list = heapless::Vec::new();
        for (line, column, message) in errors.iter().take(MAX_BUNDLE_ERRORS) {
            let e = BundleError {
                line: *line,
                column: *column,
                message: truncated(message),
            };
            if list.push(e).is_err() {
                break;
            }
        }
        BundleStatus::Rejected {
            version,
            reason: truncated(&reason),
            errors: list,
        }
    }
}

// Both limits are the same today; a reason may carry an error message.
const _: () = assert!(MAX_REASON_LEN >= MAX_BUNDLE_ERROR_MESSAGE_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trips_and_survives_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = RuleStore::new(dir.path());
        assert_eq!(store.load().unwrap(), StoredState::default());
        let state = StoredState {
            current: Some(StoredBundle {
                version: 3,
                rules: "rule a\n".into(),
            }),
            previous: None,
        };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
    }
}
