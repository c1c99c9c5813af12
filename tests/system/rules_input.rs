//! Sensor input cannot switch rules off silently: a reading stamped far in the future is
//! rejected (counted, dead-lettered) instead of making every later reading of its device late,
//! and a rule whose device table is full says so.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use edgestream_sim::prometheus::{parse, scrape};
use edgestream_sim::{CloudCollector, Mosquitto};

const GATEWAY: &str = "gw-input";

/// Raises at once on one hot reading.
const HOT_RULE: &str = r#"
rule hot
  on device "boiler-*"
  when temperature > 80
  clear when temperature < 75
  alert critical "boiler too hot"
  max_devices 1
"#;

/// Both brokers, the cloud collector and the agent with its Prometheus endpoint.
async fn start() -> (
    Mosquitto,
    Mosquitto,
    CloudCollector,
    tempfile::TempDir,
    AgentProcess,
    u16,
) {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", GATEWAY)
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        GATEWAY,
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        HOT_RULE,
        "[metrics]\nprometheus = true\nport = 0\n",
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent
        .wait_log("metrics endpoint listening", Duration::from_secs(20))
        .await;
    let port = metrics_port(&agent.logs());
    agent.wait_subscribed().await;
    (local, cloud, collector, dir, agent, port)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_timestamp_does_not_silence_the_rules() {
    let (local, _cloud, collector, _dir, mut agent, port) = start().await;
    publish_samples(
        local.port(),
        &[sample("boiler-1", "temperature", 20.0, u64::MAX)],
    )
    .await;
    let now = now_ms();
    publish_samples(
        local.port(),
        &[sample("boiler-1", "temperature", 95.0, now)],
    )
    .await;
    let raised = collector
        .wait_for(
            |m| {
                m.iter()
                    .any(|m| m.topic.ends_with("/alerts") && m.payload["state"] == "raised")
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(
        raised,
        "no alert for 95 °C after a far-future reading\n{}",
        agent.logs()
    );
    let alert = &collector.alerts()[0];
    assert_eq!(alert["device"], "boiler-1");
    assert_eq!(alert["ts"].as_u64(), Some(now));
    // The far-future reading was dead-lettered with the reason, and counted.
    let dead_lettered = collector
        .wait_for(
            |m| {
                m.iter().any(|m| {
                    m.topic.ends_with("/deadletter")
                        && m.payload["source"] == "rules"
                        && m.payload["reason"]
                            .as_str()
                            .unwrap_or("")
                            .contains("max_clock_skew_ms")
                })
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(dead_lettered, "{:?}", collector.payloads_on("deadletter"));
    let v = parse(&scrape(port).await.unwrap());
    assert_eq!(
        v[r#"edgestream_readings_rejected_total{reason="clock_skew"}"#],
        1.0
    );
    // Only the good reading reached the cloud.
    let readings = cloud_readings(&collector.telemetry_readings());
    assert!(readings.iter().all(|r| r.3 == now), "{readings:?}");
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_device_table_is_counted_sampled_and_logged() {
    let (local, _cloud, collector, _dir, mut agent, port) = start().await;
    let now = now_ms();
    publish_samples(
        local.port(),
        &[
            sample("boiler-1", "temperature", 70.0, now),
            sample("boiler-2", "temperature", 95.0, now),
            sample("boiler-3", "temperature", 95.0, now),
        ],
    )
    .await;
    assert!(
        wait_unique_readings(&collector, 3, Duration::from_secs(10)).await,
        "{}",
        agent.logs()
    );
    let full = collector
        .wait_for(
            |m| {
                m.iter().any(|m| {
                    m.topic.ends_with("/deadletter")
                        && m.payload["reason"]
                            .as_str()
                            .unwrap_or("")
                            .contains("hot at max_devices")
                })
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(full, "{:?}", collector.payloads_on("deadletter"));
    let v = parse(&scrape(port).await.unwrap());
    assert_eq!(
        v[r#"edgestream_rule_devices_refused_total{limit="rule"}"#],
        2.0
    );
    // Logged once for the interval, not once per device.
    agent.wait_log("max_devices", Duration::from_secs(5)).await;
    assert_eq!(
        agent.logs().matches("at max_devices").count(),
        1,
        "{}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_1024_payload_bytes_and_cuts_a_long_topic() {
    let (local, _cloud, collector, _dir, agent, _port) = start().await;
    let topic = format!("sensors/{}/temperature", "d".repeat(10 * 1024));
    publish_raw(local.port(), &[(topic.clone(), vec![b'x'; 2000])]).await;
    let arrived = collector
        .wait_for(
            |m| m.iter().any(|m| m.topic.ends_with("/deadletter")),
            Duration::from_secs(10),
        )
        .await;
    assert!(arrived, "{}", agent.logs());
    let d = &collector.payloads_on("deadletter")[0];
    assert_eq!(d["payload"].as_str().unwrap().len(), 1024, "{d}");
    let at = d["where"].as_str().unwrap();
    assert!(at.len() < 300, "`where` not cut: {} bytes", at.len());
    assert!(
        at.ends_with(&format!("…[cut, {} bytes]", topic.len())),
        "{at}"
    );
}
