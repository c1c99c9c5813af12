//! Helpers shared by the outbox/uplink system tests (issue 5): fleets of simulated MQTT
//! devices and the check that every reading the local broker acknowledged reached the cloud.
#![allow(dead_code)] // each outbox_* test uses a different part

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use edgestream_sim::{CloudCollector, MetricSpec, MqttDeviceConfig, MqttFleet, Signal};

/// `n` devices `{prefix}-{i}` with one temperature metric each, at `hz` readings per second.
pub fn fleet(port: u16, prefix: &str, n: usize, hz: f64) -> MqttFleet {
    let configs = (0..n)
        .map(|i| {
            MqttDeviceConfig::new(
                format!("{prefix}-{i}"),
                vec![MetricSpec::new(
                    "temperature",
                    Signal::temperature(20.0, i as u64),
                )],
                hz,
            )
        })
        .collect();
    MqttFleet::spawn("127.0.0.1", port, configs)
}

/// What reached the cloud, per reading identity `(device, metric, ts)`.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Per device, the distinct readings in order of first arrival: (metric, ts).
    pub first_arrivals: HashMap<String, Vec<(String, i64)>>,
    /// Arrivals of an outbox sequence number already seen (resent in-flight publishes).
    pub dup_same_seq: usize,
    /// Arrivals of a reading already seen under another sequence number (stored again after a
    /// crash between the outbox flush and the local PUBACK; the broker redelivered it).
    pub dup_new_seq: usize,
    pub arrivals: usize,
}

pub fn delivery(collector: &CloudCollector) -> Delivery {
    let mut d = Delivery::default();
    let mut seqs = HashSet::new();
    let mut ids = HashSet::new();
    for r in collector.telemetry_readings() {
        d.arrivals += 1;
        let seq = r["seq"].as_u64().unwrap_or(u64::MAX);
        let device = r["device"].as_str().unwrap_or_default().to_string();
        let metric = r["metric"].as_str().unwrap_or_default().to_string();
        let ts = r["ts"].as_i64().unwrap_or(-1);
        if !seqs.insert(seq) {
            d.dup_same_seq += 1;
            continue;
        }
        if !ids.insert((device.clone(), metric.clone(), ts)) {
            d.dup_new_seq += 1;
            continue;
        }
        d.first_arrivals
            .entry(device)
            .or_default()
            .push((metric, ts));
    }
    d
}

/// Waits until every reading in `fleet.acked()` reached the cloud (by identity).
pub async fn wait_all_acked_delivered(
    collector: &CloudCollector,
    fleet: &MqttFleet,
    timeout: Duration,
) -> bool {
    let want: HashSet<(String, String, i64)> = fleet
        .acked()
        .into_iter()
        .map(|r| (r.device, r.metric, r.ts))
        .collect();
    collector
        .wait_for(
            |msgs| {
                let mut got = HashSet::new();
                for m in msgs.iter().filter(|m| m.topic.ends_with("/telemetry")) {
                    for r in m.payload["readings"].as_array().into_iter().flatten() {
                        got.insert((
                            r["device"].as_str().unwrap_or_default().to_string(),
                            r["metric"].as_str().unwrap_or_default().to_string(),
                            r["ts"].as_i64().unwrap_or(-1),
                        ));
                    }
                }
                want.iter().all(|w| got.contains(w))
            },
            timeout,
        )
        .await
}

/// Asserts: every acknowledged reading arrived (0 lost), and per device the distinct readings
/// arrived in the order the device took them.
pub fn assert_acked_delivered_in_order(fleet: &MqttFleet, d: &Delivery) {
    let mut lost = Vec::new();
    for dev in fleet.devices() {
        let got = d
            .first_arrivals
            .get(dev.name())
            .cloned()
            .unwrap_or_default();
        let got_set: HashSet<&(String, i64)> = got.iter().collect();
        for r in dev.acked() {
            if !got_set.contains(&(r.metric.clone(), r.ts)) {
                lost.push((r.device.clone(), r.ts));
            }
        }
        let ts: Vec<i64> = got.iter().map(|g| g.1).collect();
        assert!(
            ts.windows(2).all(|w| w[0] < w[1]),
            "device {}: readings out of order at the cloud: {:?}",
            dev.name(),
            ts.windows(2).find(|w| w[0] >= w[1])
        );
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged readings never reached the cloud, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Total size of the files under `dir`.
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}
