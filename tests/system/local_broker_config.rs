//! The recommended local mosquitto configuration (board-configs/mosquitto/) against the real
//! agent: the largest message it lets through reaches the agent, which refuses it as one bad
//! input (dead letter) and keeps reading; a larger one is dropped by the broker and never
//! reaches the agent.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use edgestream_sim::{CloudCollector, Mosquitto, MosquittoOptions};

const RECOMMENDED: &str = include_str!("../../board-configs/mosquitto/edgestream-local.conf");

/// The recommended settings, without the listener the test broker defines itself on a free
/// port (persistence is on in both).
fn recommended_lines() -> Vec<String> {
    RECOMMENDED
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !l.starts_with("listener") && !l.starts_with("allow_anonymous"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_message_the_recommended_broker_forwards_is_one_dead_letter() {
    let lines = recommended_lines();
    let limit: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("message_size_limit "))
        .expect("message_size_limit in the recommended config")
        .trim()
        .parse()
        .unwrap();
    let local = Mosquitto::start_with(MosquittoOptions {
        extra_config: lines,
        ..MosquittoOptions::default()
    })
    .await
    .expect("local broker with the recommended config");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-mq")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        "gw-mq",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        OVERHEAT_RULES,
        "",
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;

    // The longest topic MQTT allows, with the largest payload the broker accepts.
    let long_topic = format!("sensors/{}/t", "d".repeat(65_535 - "sensors//t".len()));
    assert_eq!(long_topic.len(), 65_535);
    publish_raw(
        local.port(),
        &[
            (long_topic, vec![b'1'; limit]),
            ("sensors/big/t".into(), vec![b'1'; limit + 1]),
            ("sensors/boiler-1/temperature".into(), b"21.5".to_vec()),
        ],
    )
    .await;
    assert!(
        wait_unique_readings(&collector, 1, Duration::from_secs(10)).await,
        "the reading after the large messages did not arrive\n{}",
        agent.logs()
    );
    let dead = collector
        .wait_for(
            |m| m.iter().any(|m| m.topic.ends_with("/deadletter")),
            Duration::from_secs(10),
        )
        .await;
    assert!(dead, "{}", agent.logs());
    // Only the message within the limit reached the agent; nothing made it reconnect.
    let letters = collector.payloads_on("deadletter");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(!letters[0]["where"].as_str().unwrap().contains("big"));
    assert_eq!(agent.logs().matches("connected to local broker").count(), 1);
    assert!(agent.is_running());
}
