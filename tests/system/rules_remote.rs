//! System tests of rule bundles over MQTT (issue 7): versioned, validated, atomic, persisted,
//! reported. Real binary, real mosquitto brokers, bundles pushed by a cloud-side client.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use edgestream_sim::CloudCollector;
use serde_json::{json, Value};

const T0: u64 = 1_700_000_000_000;

fn bundle(version: u64, threshold: u32) -> Value {
    json!({
        "v": 1,
        "version": version,
        "rules": format!("rule hot\n  on device \"dev-*\"\n  when temperature > {threshold}\n  clear when temperature < 75\n  alert warning \"too hot\"\n"),
        "rollback": false,
        "meta": {"author": "test"}
    })
}

/// Waits for the status reply to `version` and returns it.
async fn status_for(collector: &CloudCollector, version: u64, nth: usize) -> Value {
    let found = collector
        .wait_for(
            |m| {
                m.iter()
                    .filter(|m| {
                        m.topic.ends_with("/rules/status") && m.payload["version"] == version
                    })
                    .count()
                    > nth
            },
            Duration::from_secs(20),
        )
        .await;
    assert!(
        found,
        "no status reply #{nth} for version {version}: {:?}",
        collector.payloads_on("rules/status")
    );
    collector
        .payloads_on("rules/status")
        .into_iter()
        .filter(|p| p["version"] == version)
        .nth(nth)
        .unwrap_or(Value::Null)
}

/// Waits until at least `n` alerts reached the cloud.
async fn wait_alerts(collector: &CloudCollector, n: usize) -> bool {
    collector
        .wait_for(
            |m| m.iter().filter(|m| m.topic.ends_with("/alerts")).count() >= n,
            Duration::from_secs(20),
        )
        .await
}

fn alert_states(collector: &CloudCollector) -> Vec<(String, f64)> {
    collector
        .alerts()
        .iter()
        .map(|a| {
            (
                a["state"].as_str().unwrap_or("").to_string(),
                a["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_versioned_validated_swapped_atomically_and_reported() {
    let rig = Rig::start("gw-rules", "", false).await;
    let Rig {
        local,
        collector,
        mut agent,
        ..
    } = rig;
    assert!(wait_online(&collector).await, "{}", agent.logs());

    // v1: alert above 80.
    collector
        .publish("rules/set", &bundle(1, 80), false)
        .await
        .unwrap();
    let s1 = status_for(&collector, 1, 0).await;
    assert_eq!(s1["state"], "applied", "{s1}");
    assert_eq!(s1["rule_count"], 1, "{s1}");
    assert!(s1["hash"].as_str().is_some_and(|h| !h.is_empty()), "{s1}");
    assert!(s1["memory_bytes"].as_u64().is_some(), "{s1}");

    let mut sent = Vec::new();
    let mut push = |v: f64| {
        let s = sample("dev-1", "temperature", v, T0 + sent.len() as u64 * 1000);
        sent.push(s.clone());
        s
    };
    let phase1: Vec<Sample> = [70.0, 85.0, 70.0].into_iter().map(&mut push).collect();
    publish_samples(local.port(), &phase1).await;
    assert!(wait_alerts(&collector, 2).await, "{}", agent.logs());
    assert_eq!(
        alert_states(&collector),
        vec![("raised".into(), 85.0), ("cleared".into(), 70.0)]
    );

    // v2: the threshold moves to 90. 85 no longer alerts; 95 does.
    collector
        .publish("rules/set", &bundle(2, 90), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 2, 0).await["state"], "applied");
    let phase2: Vec<Sample> = [85.0, 70.0, 95.0].into_iter().map(&mut push).collect();
    publish_samples(local.port(), &phase2).await;
    assert!(wait_alerts(&collector, 3).await, "{}", agent.logs());
    assert_eq!(
        alert_states(&collector),
        vec![
            ("raised".into(), 85.0),
            ("cleared".into(), 70.0),
            ("raised".into(), 95.0)
        ],
        "readings after the swap must follow v2"
    );

    // A bundle with a syntax error and a type error: refused with every error and its
    // position; v2 keeps running.
    let broken = json!({"v": 1, "version": 3, "rules": "rule a\n  when temperature > > 1\n  alert warning \"x\"\nrule b\n  when avrg(temperature, 5m) > 1\n  alert critical \"y\"\n"});
    collector
        .publish("rules/set", &broken, false)
        .await
        .unwrap();
    let s3 = status_for(&collector, 3, 0).await;
    assert_eq!(s3["state"], "rejected", "{s3}");
    let errors = s3["errors"].as_array().cloned().unwrap_or_default();
    assert!(errors.len() >= 2, "every error must be reported: {s3}");
    assert!(
        errors
            .iter()
            .all(|e| e["line"].as_u64().is_some_and(|l| l > 0)
                && e["column"].as_u64().is_some_and(|c| c > 0)),
        "{s3}"
    );
    assert!(
        errors.iter().any(|e| e["line"] == 2) && errors.iter().any(|e| e["line"] == 5),
        "{s3}"
    );

    // Older and equal versions are refused with a reason; a rollback is applied.
    collector
        .publish("rules/set", &bundle(1, 50), false)
        .await
        .unwrap();
    let old = status_for(&collector, 1, 1).await;
    assert_eq!(old["state"], "rejected", "{old}");
    assert!(
        old["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not newer")),
        "{old}"
    );
    collector
        .publish("rules/set", &bundle(2, 50), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 2, 1).await["state"], "rejected");

    // Still v2: 85 does not alert, 70 clears the 95 alert.
    let phase3: Vec<Sample> = [85.0, 70.0].into_iter().map(&mut push).collect();
    publish_samples(local.port(), &phase3).await;
    assert!(wait_alerts(&collector, 4).await);

    let mut rollback = bundle(1, 80);
    rollback["rollback"] = json!(true);
    collector
        .publish("rules/set", &rollback, false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 1, 2).await["state"], "applied");
    let phase4: Vec<Sample> = [85.0].into_iter().map(&mut push).collect();
    publish_samples(local.port(), &phase4).await;
    assert!(wait_alerts(&collector, 5).await, "{}", agent.logs());
    assert_eq!(
        alert_states(&collector),
        vec![
            ("raised".into(), 85.0),
            ("cleared".into(), 70.0),
            ("raised".into(), 95.0),
            ("cleared".into(), 70.0),
            ("raised".into(), 85.0)
        ]
    );

    // No reading lost or evaluated twice across the swaps.
    assert!(wait_unique_readings(&collector, sent.len(), Duration::from_secs(20)).await);
    assert_all_delivered_in_order(&sent, &cloud_readings(&collector.telemetry_readings()));
    // The retained status names the running version.
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/status")
                    && m.payload["rules_version"] == 1
                    && m.payload["state"] == "online"),
                Duration::from_secs(10)
            )
            .await,
        "{:?}",
        collector.payloads_on("status")
    );
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_on_the_last_applied_bundle_with_the_cloud_unreachable() {
    let rig = Rig::start("gw-restart", "", true).await;
    let Rig {
        local,
        proxy,
        collector,
        dir,
        config: cfg,
        mut agent,
        ..
    } = rig;
    let proxy = proxy.expect("proxy");
    collector
        .publish("rules/set", &bundle(5, 90), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 5, 0).await["state"], "applied");
    assert!(agent.terminate(Duration::from_secs(15)).success());

    proxy.cut();
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    agent
        .wait_log("rules_version=5", Duration::from_secs(10))
        .await;
    let samples = vec![
        sample("dev-1", "temperature", 85.0, T0),
        sample("dev-1", "temperature", 95.0, T0 + 1000),
    ];
    publish_samples(local.port(), &samples).await;
    proxy.restore();
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/alerts")),
                Duration::from_secs(20)
            )
            .await,
        "{}",
        agent.logs()
    );
    // Only 95 crossed v5's threshold of 90.
    assert_eq!(alert_states(&collector), vec![("raised".into(), 95.0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_non_utf8_bundles_are_refused_without_reconnecting() {
    let rig = Rig::start("gw-big", "", true).await;
    let Rig {
        cloud,
        proxy,
        collector,
        mut agent,
        ..
    } = rig;
    let proxy = proxy.expect("proxy");
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/status")),
                Duration::from_secs(20)
            )
            .await
    );
    let connections_before = proxy.stats().accepted;

    let huge = json!({"v": 1, "version": 7, "rules": "#".repeat(300 * 1024)});
    collector.publish("rules/set", &huge, false).await.unwrap();
    // Refused before decoding, but its version is read and named.
    let s = status_for(&collector, 7, 0).await;
    assert_eq!(s["state"], "rejected", "{s}");
    assert!(
        s["reason"].as_str().is_some_and(|r| r.contains("limit")),
        "{s}"
    );

    // Raw bytes that are not UTF-8, published with a plain client.
    let mut opts = rumqttc::MqttOptions::new("raw-pub", "127.0.0.1", cloud.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(
            "edgestream/gw-big/rules/set",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![0xff, 0xfe, b'{', 0x80],
        )
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(ev) = events.poll().await {
            if matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) {
                break;
            }
        }
    })
    .await;
    // No version to read: 0, and the reason says so.
    let s = status_for(&collector, 0, 0).await;
    assert_eq!(s["state"], "rejected", "{s}");
    assert!(
        s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("UTF-8") || r.contains("malformed")),
        "{s}"
    );

    // A good bundle still works afterwards, on the same connection.
    collector
        .publish("rules/set", &bundle(8, 80), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 8, 0).await["state"], "applied");
    assert_eq!(
        proxy.stats().accepted,
        connections_before,
        "the agent reconnected: {:?}\n{}",
        proxy.stats(),
        agent.logs()
    );
    assert!(agent.is_running());
}

/// Waits until the retained status names `version` as the running one.
async fn running_version_is(collector: &CloudCollector, version: u64) -> bool {
    collector
        .wait_for(
            |m| {
                m.iter()
                    .rev()
                    .find(|m| m.topic.ends_with("/status"))
                    .is_some_and(|m| m.payload["rules_version"] == version)
            },
            Duration::from_secs(10),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_have_a_ceiling_rollbacks_keep_theirs_and_every_status_names_one() {
    let rig = Rig::start("gw-versions", "", false).await;
    let Rig {
        collector,
        mut agent,
        ..
    } = rig;
    assert!(wait_online(&collector).await, "{}", agent.logs());

    // v10, then v11; an empty rollback (request version 1) restores v10 under its version.
    for v in [10, 11] {
        collector
            .publish("rules/set", &bundle(v, 80), false)
            .await
            .unwrap();
        assert_eq!(status_for(&collector, v, 0).await["state"], "applied");
    }
    let rollback = json!({"v": 1, "version": 1, "rules": "", "rollback": true, "meta": {}});
    collector
        .publish("rules/set", &rollback, false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 1, 0).await["state"], "applied");
    assert!(
        running_version_is(&collector, 10).await,
        "the restored bundle should run as version 10: {:?}\n{}",
        collector.payloads_on("status"),
        agent.logs()
    );
    // v10 runs, so v10 is not newer, and v11 is.
    collector
        .publish("rules/set", &bundle(10, 80), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 10, 1).await["state"], "rejected");

    // u64::MAX is above the ceiling: refused, and a newer version can still be pushed.
    collector
        .publish("rules/set", &bundle(u64::MAX, 80), false)
        .await
        .unwrap();
    let max = status_for(&collector, u64::MAX, 0).await;
    assert_eq!(max["state"], "rejected", "{max}");
    assert!(
        max["reason"].as_str().unwrap_or("").contains("ceiling"),
        "{max}"
    );
    collector
        .publish("rules/set", &bundle(12, 80), false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 12, 0).await["state"], "applied");

    // Refused before decoding (too large, or malformed): the status still names the version.
    let mut big = bundle(13, 80);
    big["meta"] = json!({"pad": "x".repeat(300 * 1024)});
    collector.publish("rules/set", &big, false).await.unwrap();
    let s13 = status_for(&collector, 13, 0).await;
    assert_eq!(s13["state"], "rejected", "{s13}");
    assert!(
        s13["reason"].as_str().unwrap_or("").contains("limit"),
        "{s13}"
    );
    let malformed = json!({"v": 1, "version": 14, "rules": 5});
    collector
        .publish("rules/set", &malformed, false)
        .await
        .unwrap();
    assert_eq!(status_for(&collector, 14, 0).await["state"], "rejected");
    // Nothing readable: version 0, and the reason says why.
    collector
        .publish("rules/set", &json!("not a bundle"), false)
        .await
        .unwrap();
    let s0 = status_for(&collector, 0, 0).await;
    assert!(
        s0["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("version unreadable: "),
        "{s0}"
    );
    assert!(agent.is_running());
}
