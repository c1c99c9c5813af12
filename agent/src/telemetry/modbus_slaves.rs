//! Per-slave figures of the Modbus buses: polls answered, failed reads by reason, and whether
//! the slave is missing now. The Modbus poll tasks write them (relaxed atomics, like
//! [`Metrics`](super::metrics::Metrics)); the health message lists them under
//! `modbus_slaves`. The table is fixed when the agent starts: one entry per configured slave.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{json, Map, Value};

/// Slaves listed in one health message; the others are counted in `not_listed` (the
/// Prometheus counters and the dead letters still cover them).
pub const MAX_SLAVES_IN_HEALTH: usize = 64;

/// The reasons a read fails, as the `edgestream_modbus_errors_total` counter names them.
pub const REASONS: [&str; 7] = [
    "exception",
    "timeout",
    "short",
    "mismatch",
    "garbage",
    "crc",
    "connection",
];

#[derive(Debug)]
struct Entry {
    bus: String,
    unit: u8,
    device: String,
    polls: AtomicU64,
    errors: [AtomicU64; REASONS.len()],
    missing: AtomicBool,
}

/// Every configured slave's figures, in configuration order.
#[derive(Debug, Default)]
pub struct SlaveTable {
    entries: Vec<Entry>,
}

impl SlaveTable {
    /// One entry per `(bus, unit, device)`, in that order; entry `i` is the `i`-th given.
    pub fn new(slaves: impl IntoIterator<Item = (String, u8, String)>) -> Self {
        Self {
            entries: slaves
                .into_iter()
                .map(|(bus, unit, device)| Entry {
                    bus,
                    unit,
                    device,
                    polls: AtomicU64::new(0),
                    errors: Default::default(),
                    missing: AtomicBool::new(false),
                })
                .collect(),
        }
    }

    pub fn polled(&self, i: usize) {
        if let Some(e) = self.entries.get(i) {
            e.polls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A failed read of slave `i`; `reason` is one of [`REASONS`].
    pub fn failed(&self, i: usize, reason: &str) {
        let (Some(e), Some(r)) = (
            self.entries.get(i),
            REASONS.iter().position(|r| *r == reason),
        ) else {
            return;
        };
        e.errors[r].fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_missing(&self, i: usize, missing: bool) {
        if let Some(e) = self.entries.get(i) {
            e.missing.store(missing, Ordering::Relaxed);
        }
    }

    /// `{"slaves": [{"bus", "unit", "device", "polls", "errors": {reason: n, ...}, "missing"}],
    /// "not_listed": n}`; only reasons that happened are in `errors`.
    pub fn to_json(&self) -> Value {
        let slaves: Vec<Value> = self
            .entries
            .iter()
            .take(MAX_SLAVES_IN_HEALTH)
            .map(|e| {
                let mut errors = Map::new();
                for (r, n) in REASONS.iter().zip(&e.errors) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        errors.insert((*r).into(), n.into());
                    }
                }
                json!({
                    "bus": e.bus,
                    "unit": e.unit,
                    "device": e.device,
                    "polls": e.polls.load(Ordering::Relaxed),
                    "errors": errors,
                    "missing": e.missing.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "slaves": slaves,
            "not_listed": self.entries.len().saturating_sub(MAX_SLAVES_IN_HEALTH),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_slave_and_reason_and_bounds_the_listing() {
        let t = SlaveTable::new((0..70u8).map(|u| ("tcp h:502".to_string(), u, format!("d-{u}"))));
        t.polled(1);
        t.failed(1, "crc");
        t.failed(1, "crc");
        t.failed(2, "timeout");
        t.failed(2, "no such reason");
        t.set_missing(2, true);
        t.polled(500);
        let v = t.to_json();
        assert_eq!(v["not_listed"], 6);
        assert_eq!(v["slaves"].as_array().unwrap().len(), MAX_SLAVES_IN_HEALTH);
        assert_eq!(v["slaves"][1]["polls"], 1);
        assert_eq!(v["slaves"][1]["errors"], json!({"crc": 2}));
        assert_eq!(v["slaves"][2]["errors"], json!({"timeout": 1}));
        assert_eq!(v["slaves"][2]["missing"], true);
        assert_eq!(v["slaves"][0]["errors"], json!({}));
    }
}
