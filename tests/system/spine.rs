//! System tests of the spine (issue 2): the real `edgestream` binary between two real
//! mosquitto brokers, fed by a test publisher, watched by a cloud subscriber.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;

const T0: u64 = 1_700_000_000_000;

/// boiler-1 is above 80 for 40 s of reading time (alert raised, then cleared), boiler-3 only
/// for 10 s (no alert), boiler-2 never, and pump-1 is hot but not a boiler (no alert).
fn scenario() -> Vec<Sample> {
    let mut v = Vec::new();
    for i in 0..60u64 {
        let ts = T0 + i * 1000;
        let b1 = if (10..50).contains(&i) {
            85.0
        } else {
            70.0 + i as f64 / 100.0
        };
        v.push(sample("boiler-1", "temperature", b1, ts));
        v.push(sample("boiler-1", "pressure", 2.0 + i as f64 / 1000.0, ts));
        v.push(sample("boiler-2", "temperature", 70.0 + (i % 5) as f64, ts));
        v.push(sample(
            "boiler-3",
            "temperature",
            if i < 10 { 85.0 } else { 70.0 },
            ts,
        ));
        v.push(sample("pump-1", "temperature", 90.0, ts));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_reading_in_order_and_raises_only_the_expected_alerts() {
    let rig = Rig::start("gw-spine", OVERHEAT_RULES, false).await;
    let Rig {
        local,
        collector,
        mut agent,
        ..
    } = rig;
    assert!(
        wait_online(&collector).await,
        "agent never reported online\n{}",
        agent.logs()
    );

    agent.wait_subscribed().await;
    let samples = scenario();
    publish_samples(local.port(), &samples).await;
    assert!(
        wait_unique_readings(&collector, samples.len(), Duration::from_secs(30)).await,
        "only {} of {} readings reached the cloud\n{}",
        collector.telemetry_readings().len(),
        samples.len(),
        agent.logs()
    );
    assert_all_delivered_in_order(&samples, &cloud_readings(&collector.telemetry_readings()));

    // Alerts are sent ahead of telemetry, so they are in by now; give stragglers a moment.
    collector
        .wait_for(
            |m| m.iter().filter(|m| m.topic.ends_with("/alerts")).count() >= 2,
            Duration::from_secs(5),
        )
        .await;
    let alerts: Vec<(String, String, String)> = collector
        .alerts()
        .iter()
        .map(|a| {
            (
                a["rule"].as_str().unwrap_or("").to_string(),
                a["device"].as_str().unwrap_or("").to_string(),
                a["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        alerts,
        vec![
            ("overheat".into(), "boiler-1".into(), "raised".into()),
            ("overheat".into(), "boiler-1".into(), "cleared".into()),
        ],
        "unexpected alerts\n{}",
        agent.logs()
    );
    let raised = &collector.alerts()[0];
    assert_eq!(raised["severity"], "critical");
    // Raised once 30 s of reading time above 80 had passed: the reading at t = 40 s.
    assert_eq!(
        raised["ts"].as_u64(),
        Some(T0 + 40_000),
        "raised at the wrong reading: {raised}"
    );

    let status = agent.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "agent exited with {status}\n{}",
        agent.logs()
    );
    assert!(
        collector
            .wait_for(
                |m| m
                    .iter()
                    .any(|m| m.topic.ends_with("/status") && m.payload["state"] == "offline"),
                Duration::from_secs(5)
            )
            .await,
        "graceful stop did not publish the offline status"
    );
    let logs = agent.logs();
    assert!(!logs.contains("ERROR"), "errors logged:\n{logs}");
}

/// Readings number `range`, spread over four devices, 100 ms apart.
fn readings(range: std::ops::Range<u64>) -> Vec<Sample> {
    range
        .map(|i| {
            sample(
                &format!("dev-{}", i % 4),
                "temperature",
                i as f64,
                T0 + i * 100,
            )
        })
        .collect()
}

/// A rig with the fault proxy in front of `proxy_in`, once `first` has reached the cloud.
async fn proxied_rig(
    gateway: &str,
    proxy_in: ProxyIn,
    first: &[Sample],
) -> (Rig, edgestream_sim::FaultProxy) {
    let mut rig = Rig::start_with(gateway, OVERHEAT_RULES, proxy_in).await;
    let proxy = rig.proxy.take().expect("proxy");
    publish_samples(rig.local.port(), first).await;
    assert!(
        wait_unique_readings(&rig.collector, first.len(), Duration::from_secs(30)).await,
        "the first {} readings did not arrive\n{}",
        first.len(),
        rig.agent.logs()
    );
    (rig, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_after_the_cloud_was_unreachable() {
    let first = readings(0..200);
    let (rig, proxy) = proxied_rig("gw-outage", ProxyIn::Cloud, &first).await;
    let Rig {
        local,
        collector,
        agent,
        ..
    } = &rig;

    proxy.cut();
    let during = readings(200..700);
    publish_samples(local.port(), &during).await;
    // Longer than the linger and the backoff: the agent has tried and failed by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let arrived_during = collector.telemetry_readings().len();
    assert_eq!(
        arrived_during,
        first.len(),
        "readings crossed a cut connection"
    );

    proxy.restore();
    let all: Vec<Sample> = first.iter().chain(during.iter()).cloned().collect();
    assert!(
        wait_unique_readings(collector, all.len(), Duration::from_secs(30)).await,
        "only {} of {} readings after the outage\n{}",
        collector.telemetry_readings().len(),
        all.len(),
        agent.logs()
    );
    assert_all_delivered_in_order(&all, &cloud_readings(&collector.telemetry_readings()));
    assert!(
        proxy.stats().accepted >= 2,
        "the agent never reconnected: {:?}",
        proxy.stats()
    );
}

/// The link to the local broker is cut while readings flow, then restored. The agent
/// reconnects to its persistent session and every reading the broker accepted reaches the
/// cloud, in order per device. A reading stored whose PUBACK was lost in the cut is delivered
/// again by the broker and may arrive twice, under a new `seq` (the documented in-flight
/// window); nothing may be missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_local_link_loses_nothing_the_local_broker_accepted() {
    let first = readings(0..300);
    let (rig, proxy) = proxied_rig("gw-local-cut", ProxyIn::Local, &first).await;
    let Rig {
        local,
        collector,
        agent,
        ..
    } = &rig;

    // The cut lands while the agent is taking readings and acknowledging them in bulk.
    let during = readings(300..2300);
    let feed = {
        let during = during.clone();
        let port = local.port();
        tokio::spawn(async move {
            for chunk in during.chunks(100) {
                publish_samples(port, chunk).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    feed.await.expect("test publisher");

    let all: Vec<Sample> = first.iter().chain(during.iter()).cloned().collect();
    let key = |device: &str, ts: u64| (device.to_string(), ts);
    let wanted: std::collections::HashSet<(String, u64)> =
        all.iter().map(|s| key(&s.device, s.ts)).collect();
    let arrived = collector
        .wait_for(
            |msgs| {
                let mut got = std::collections::HashSet::new();
                for m in msgs.iter().filter(|m| m.topic.ends_with("/telemetry")) {
                    for r in m.payload["readings"].as_array().into_iter().flatten() {
                        let device = r["device"].as_str().unwrap_or_default();
                        got.insert(key(device, r["ts"].as_u64().unwrap_or(0)));
                    }
                }
                wanted.is_subset(&got)
            },
            Duration::from_secs(60),
        )
        .await;
    let cloud = cloud_readings(&collector.telemetry_readings());
    assert!(
        arrived,
        "{} of {} readings at the cloud after the cut\n{}",
        cloud.len(),
        all.len(),
        agent.logs()
    );
    // First arrivals, per device, are the samples in the order they were published.
    let mut seen = std::collections::HashSet::new();
    let mut firsts: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for r in &cloud {
        if seen.insert(key(&r.0, r.3)) {
            firsts.entry(r.0.clone()).or_default().push(r.3);
        }
    }
    let mut expected: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for s in &all {
        expected.entry(s.device.clone()).or_default().push(s.ts);
    }
    assert_eq!(firsts, expected, "lost or reordered readings");
    let stats = proxy.stats();
    assert!(
        stats.accepted >= 2,
        "the agent never reconnected to the local broker: {stats:?}"
    );
    eprintln!(
        "local cut: {} readings, {} arrivals ({} again after redelivery), {stats:?}",
        all.len(),
        cloud.len(),
        cloud.len() - all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_sampled_and_never_stop_good_readings() {
    let rig = Rig::start("gw-bad", OVERHEAT_RULES, false).await;
    let Rig {
        local,
        collector,
        mut agent,
        ..
    } = rig;

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("sensors/dev-1/temperature", b"not json at all".to_vec()),
        ("sensors/dev-1/temperature", br#"{"value": "hot"}"#.to_vec()),
        (
            "sensors/dev-1/temperature",
            br#"{"ts": 1700000000000}"#.to_vec(),
        ),
        ("sensors/dev-1/temperature", vec![b'9'; 100_000]),
        ("sensors/dev-1/temperature", vec![0xff, 0xfe, 0x00]),
        ("sensors/dev 1/temperature", b"21.5".to_vec()),
    ];
    let mut items = Vec::new();
    let mut good = Vec::new();
    for i in 0..60u64 {
        let s = sample("dev-1", "temperature", 20.0 + i as f64, T0 + i * 1000);
        items.push((
            format!("sensors/{}/{}", s.device, s.metric),
            serde_json::json!({"value": s.value, "ts": s.ts})
                .to_string()
                .into_bytes(),
        ));
        good.push(s);
        if i % 10 == 5 {
            let (t, p) = &bad[(i / 10) as usize];
            items.push((t.to_string(), p.clone()));
        }
    }
    publish_raw(local.port(), &items).await;
    assert!(
        wait_unique_readings(&collector, good.len(), Duration::from_secs(30)).await,
        "{}",
        agent.logs()
    );
    assert_all_delivered_in_order(&good, &cloud_readings(&collector.telemetry_readings()));

    // Every rejection went upstream as a dead letter with its reason.
    assert!(
        collector
            .wait_for(
                |m| m
                    .iter()
                    .filter(|m| m.topic.ends_with("/deadletter"))
                    .count()
                    >= bad.len(),
                Duration::from_secs(10)
            )
            .await,
        "dead letters: {:?}\n{}",
        collector.messages_on("deadletter"),
        agent.logs()
    );
    let reasons: Vec<String> = collector
        .payloads_on("deadletter")
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("100000 bytes")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("device or metric name")),
        "{reasons:?}"
    );
    assert!(collector
        .payloads_on("deadletter")
        .iter()
        .all(|d| d["where"]
            .as_str()
            .is_some_and(|w| w.starts_with("sensors/"))));

    // And they are counted: the health message carries the counter.
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/health")
                    && m.payload["counters"]["rejected_mqtt"] == bad.len()),
                Duration::from_secs(10)
            )
            .await,
        "health never counted {} rejections: {:?}",
        bad.len(),
        collector.payloads_on("health").last()
    );
    assert!(
        agent.is_running(),
        "agent died on bad input\n{}",
        agent.logs()
    );
    // Logged once per source per interval, not once per payload.
    let warnings = agent.logs().matches("rejected input").count();
    assert!(
        warnings >= 1 && warnings < bad.len(),
        "{warnings} rejection log lines for {} rejections",
        bad.len()
    );
}

#[test]
fn check_reports_every_mistake_with_its_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[gateway]
id = "gw 1/bad"
data_dir = "/tmp/x"
worker_threads = 0

[cloud]
host = "127.0.0.1"
tls = false
batch_size = 0

[outbox]
max_bites = 5
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check passed a bad config");
    assert!(stderr.contains("gateway.id"), "{stderr}");
    assert!(stderr.contains("cloud.batch_size"), "{stderr}");
    assert!(stderr.contains("gateway.worker_threads"), "{stderr}");
    assert!(
        stderr.contains("outbox") && stderr.contains("max_bites"),
        "{stderr}"
    );
    assert!(stderr.contains("4 problem(s)"), "{stderr}");

    std::fs::write(
        &path,
        config_toml(
            "gw-1",
            &dir.path().join("d"),
            1883,
            1884,
            OVERHEAT_RULES,
            "",
        ),
    )
    .unwrap();
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_it_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let local = edgestream_sim::Mosquitto::start()
        .await
        .expect("local broker");
    let cloud = edgestream_sim::Mosquitto::start()
        .await
        .expect("cloud broker");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let cfg = config_toml(
        "gw-notify",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        OVERHEAT_RULES,
        "",
    );
    let mut agent = AgentProcess::start_with_env(
        dir.path(),
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".to_string()),
        ],
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.iter().any(|m: &String| m == "WATCHDOG=1") {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); got {got:?}\n{}", agent.logs()));
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got[0], "READY=1", "{got:?}");
    assert!(agent.terminate(Duration::from_secs(15)).success());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
}
