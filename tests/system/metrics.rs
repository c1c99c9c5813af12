//! System test of the metrics (issue 9): the real `edgestream` binary between two real
//! mosquitto brokers, with its Prometheus endpoint on; the counters scraped over HTTP, and the
//! summary in the health message, must match what the test sent.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::prometheus::{parse, scrape};
use edgestream_sim::{CloudCollector, Mosquitto};

const T0: u64 = 1_700_000_000_000;
const GATEWAY: &str = "gw-metrics";

/// 60 s of boiler-1 temperature (above 80 from 10 s to 50 s: one alert raised, one cleared)
/// and pressure: 120 readings.
fn scenario() -> Vec<Sample> {
    (0..60u64)
        .flat_map(|i| {
            let ts = T0 + i * 1000;
            let t = if (10..50).contains(&i) { 85.0 } else { 70.0 };
            [
                sample("boiler-1", "temperature", t, ts),
                sample("boiler-1", "pressure", 2.0, ts),
            ]
        })
        .collect()
}

/// Scrapes until `ok` holds for the values or `timeout` passes; returns the last scrape.
async fn scrape_until(
    port: u16,
    timeout: Duration,
    ok: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let values = parse(&scrape(port).await.expect("scrape /metrics"));
        if ok(&values) || Instant::now() > deadline {
            return values;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_counters_match_what_was_sent() {
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
        OVERHEAT_RULES,
        "[metrics]\nprometheus = true\nport = 0\n",
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent
        .wait_log("metrics endpoint listening", Duration::from_secs(20))
        .await;
    let port = metrics_port(&agent.logs());
    agent.wait_subscribed().await;

    // Before any input: every counter is there, and zero.
    let before = parse(&scrape(port).await.expect("first scrape"));
    assert_eq!(
        before[r#"edgestream_readings_in_total{source="mqtt"}"#],
        0.0
    );
    assert_eq!(
        before[r#"edgestream_parse_errors_total{source="mqtt"}"#],
        0.0
    );

    let samples = scenario();
    publish_samples(local.port(), &samples).await;
    let malformed: Vec<(String, Vec<u8>)> =
        [b"hot".as_slice(), br#"{"value":"warm"}"#, br#"{"ts":1}"#]
            .iter()
            .map(|p| ("sensors/boiler-9/temperature".to_string(), p.to_vec()))
            .collect();
    publish_raw(local.port(), &malformed).await;
    assert!(
        wait_unique_readings(&collector, samples.len(), Duration::from_secs(30)).await,
        "only {} of {} readings reached the cloud\n{}",
        collector.telemetry_readings().len(),
        samples.len(),
        agent.logs()
    );

    let n = samples.len() as f64;
    // CPU time counts in clock ticks (10 ms): a fast agent can finish this work within one,
    // so the scrape also waits for the first tick to show.
    let v = scrape_until(port, Duration::from_secs(10), |v| {
        v["edgestream_outbox_records"] == 0.0
            && v[r#"edgestream_parse_errors_total{source="mqtt"}"#] == 3.0
            && v.get("process_cpu_seconds_total").is_some_and(|c| *c > 0.0)
    })
    .await;
    let kernel_cpu = edgestream_sim::procstat::cpu_seconds(agent.pid());
    let get = |k: &str| *v.get(k).unwrap_or_else(|| panic!("{k} not scraped"));
    assert_eq!(get(r#"edgestream_readings_in_total{source="mqtt"}"#), n);
    assert_eq!(get(r#"edgestream_parse_errors_total{source="mqtt"}"#), 3.0);
    assert_eq!(get("edgestream_rule_evaluations_total"), n);
    assert_eq!(get(r#"edgestream_alerts_total{transition="raised"}"#), 1.0);
    assert_eq!(get(r#"edgestream_alerts_total{transition="cleared"}"#), 1.0);
    // Every rejected input is either sampled as a dead letter or counted as suppressed.
    assert_eq!(
        get("edgestream_deadletters_total")
            + get(r#"edgestream_records_dropped_total{reason="deadletter_rate_limit"}"#),
        3.0
    );
    assert_eq!(
        get(r#"edgestream_records_dropped_total{reason="rule"}"#),
        0.0
    );
    assert_eq!(
        get(r#"edgestream_records_dropped_total{reason="outbox_full"}"#),
        0.0
    );
    assert_eq!(get("edgestream_outbox_records"), 0.0);
    assert_eq!(get("edgestream_outbox_bytes"), 0.0);
    // Readings + 2 alerts + dead letters went through the outbox and were acknowledged.
    let records = n + 2.0 + get("edgestream_deadletters_total");
    assert_eq!(get("edgestream_outbox_appended_total"), records);
    assert_eq!(get("edgestream_outbox_acked_total"), records);
    assert!(get("edgestream_uplink_records_sent_total") >= records);
    assert!(get("edgestream_uplink_bytes_sent_total") > 0.0);
    assert_eq!(get("edgestream_uplink_online"), 1.0);
    assert_eq!(get("edgestream_uplink_connects_total"), 1.0);
    let rss = get("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 64e6, "RSS {rss}");
    let cpu = get("process_cpu_seconds_total");
    assert!(
        cpu > 0.0 && cpu <= kernel_cpu,
        "agent CPU {cpu} s, kernel says {kernel_cpu} s since"
    );

    // The health message (every second in this config) carries the same figures.
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/health")
                    && m.payload["summary"]["readings_in"]["mqtt"] == samples.len()
                    && m.payload["summary"]["parse_errors"]["mqtt"] == 3
                    && m.payload["summary"]["alerts"]["raised"] == 1
                    && m.payload["summary"]["outbox"]["records"] == 0
                    && m.payload["summary"]["uplink"]["online"] == true),
                Duration::from_secs(10)
            )
            .await,
        "no health message with the expected summary: {:?}",
        collector.payloads_on("/health").last()
    );

    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exited with {status}");
    let logs = agent.logs();
    assert!(!logs.contains("ERROR"), "errors logged:\n{logs}");
}

/// Idle connections cannot hold the endpoint: with 200 connections open and silent, a scrape
/// is still answered within a second, and the connections are closed by the agent, not kept
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_delay_a_scrape() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        GATEWAY,
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        OVERHEAT_RULES,
        "[metrics]\nprometheus = true\nport = 0\n",
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent
        .wait_log("metrics endpoint listening", Duration::from_secs(20))
        .await;
    let port = metrics_port(&agent.logs());

    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("open an idle connection"),
        );
    }
    // Let the agent accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for attempt in 0..3 {
        let start = Instant::now();
        let scraped = tokio::time::timeout(Duration::from_secs(1), scrape(port)).await;
        let body = scraped
            .unwrap_or_else(|_| {
                panic!("scrape {attempt} took more than 1 s with idle connections open")
            })
            .expect("scrape /metrics");
        assert!(parse(&body).contains_key("edgestream_readings_in_total{source=\"mqtt\"}"));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    assert!(agent.is_running());
    drop(idle);
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exited with {status}");
}
