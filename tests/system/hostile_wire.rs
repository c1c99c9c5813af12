//! System tests of input that must not wedge the agent (issue 29): the real `edgestream`
//! binary between two real mosquitto brokers.
//!
//! - an oversized QoS 1 message on either connection is acknowledged, counted and
//!   dead-lettered, and the traffic behind it flows at once (no reconnect loop);
//! - a burst of 1,000 cloud commands is answered at once, one final outcome each;
//! - pending commands for an unreachable device cannot block the command table: their
//!   lifetime has a ceiling, and a `cancel` command ends one;
//! - a broker that is down at start is logged at once (then at a bounded rate) and shows in
//!   health and metrics, for both connections.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::prometheus::scrape_parsed;
use edgestream_sim::{
    CloudCollector, CommandBehavior, FaultProxy, MetricSpec, Mosquitto, MqttDevice,
    MqttDeviceConfig, Profile, Signal,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const ALLOW: &str = r#"
[commands]
reply_timeout_ms = 10000
max_pending = 4096

[[commands.allow]]
name = "set_position"
devices = ["valve-*"]
args.percent = { type = "number", min = 0, max = 100, required = true }
"#;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn command(id: &str, device: &str, percent: u64) -> Value {
    let now = now_ms();
    json!({"v": 1, "id": id, "device": device, "name": "set_position",
           "args": {"percent": percent}, "issued_at": now, "expires_at": now + 60_000})
}

fn valve(name: &str) -> MqttDeviceConfig {
    let mut c = MqttDeviceConfig::new(
        name,
        vec![MetricSpec::new(
            "position",
            Signal::new(Profile::Constant(10.0), 0.0, 3),
        )],
        0.5,
    );
    c.commands = CommandBehavior::Succeed;
    c
}

const FINAL: [&str; 4] = ["succeeded", "failed", "rejected", "timed_out"];

/// Final outcomes per command id. The same outcome twice (same state, detail and time) is one:
/// an outbox record in flight when a connection drops is sent again.
fn finals(c: &CloudCollector) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for o in c.outcomes() {
        let state = o["state"].as_str().unwrap_or_default();
        if FINAL.contains(&state) && seen.insert(o.to_string()) {
            m.entry(o["id"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(state.to_string());
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_cloud_commands_is_answered_at_once() {
    let local = Mosquitto::start().await.expect("local broker");
    let mut device = MqttDevice::spawn("127.0.0.1", local.port(), valve("valve-b"));
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-burst")
        .await
        .expect("collector");
    // The proxy lets the test reconnect the agent afterwards: a command whose PUBACK was
    // lost would be delivered again then, and answered twice.
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    let dir = tempfile::tempdir().unwrap();
    // No health message during the test: a publish of the agent's own must not be what
    // moves the commands along.
    let config = config_toml(
        "gw-burst",
        &dir.path().join("data"),
        local.port(),
        proxy.port(),
        "",
        ALLOW,
    )
    .replace("interval_secs = 1\n", "interval_secs = 3600\n")
        + "[metrics]\nprometheus = true\nport = 0\n";
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    assert!(wait_online(&collector).await, "{}", agent.logs());
    assert!(
        wait_device_connected(&device).await,
        "the simulated valve never connected"
    );

    const N: usize = 1000;
    let start = Instant::now();
    for i in 0..N {
        let c = command(&format!("b-{i}"), "valve-b", (i % 100) as u64);
        collector.publish("commands", &c, false).await.unwrap();
    }
    let all = collector
        .wait_for(
            |msgs| {
                let mut ids = std::collections::HashSet::new();
                for m in msgs {
                    if m.topic.ends_with("/commands/outcomes")
                        && FINAL.contains(&m.payload["state"].as_str().unwrap_or_default())
                    {
                        ids.insert(m.payload["id"].as_str().unwrap_or_default().to_string());
                    }
                }
                ids.len() >= N
            },
            Duration::from_secs(5),
        )
        .await;
    let took = start.elapsed();
    let got = finals(&collector);
    assert!(
        all,
        "{} of {N} commands have a final outcome after {took:?}; missing e.g. {:?}",
        got.len(),
        (0..N)
            .map(|i| format!("b-{i}"))
            .filter(|id| !got.contains_key(id))
            .take(5)
            .collect::<Vec<_>>()
    );
    eprintln!("{N} cloud commands answered in {took:?}");
    // Every command was acknowledged: after a reconnect nothing is delivered again, so
    // nothing more arrives for them: one final outcome each, and all succeeded.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    let reconnected = collector
        .wait_for(
            |msgs| {
                msgs.iter()
                    .filter(|m| m.topic.ends_with("/status") && m.payload["state"] == "online")
                    .count()
                    >= 2
            },
            Duration::from_secs(20),
        )
        .await;
    assert!(reconnected, "{}", agent.logs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = scrape_parsed(metrics_port(&agent.logs()))
        .await
        .expect("scrape");
    assert_eq!(
        m.get("edgestream_commands_received_total{source=\"cloud\"}"),
        Some(&(N as f64)),
        "commands delivered again after the reconnect (their PUBACK was lost)"
    );
    let got = finals(&collector);
    for i in 0..N {
        let id = format!("b-{i}");
        assert_eq!(
            got.get(&id).map(Vec::as_slice),
            Some(&["succeeded".to_string()][..]),
            "{id}"
        );
    }
    assert_eq!(
        device.commands().len(),
        N,
        "each command reached the valve once"
    );
    assert!(agent.terminate(Duration::from_secs(10)).success());
    device.stop().await;
}

async fn wait_device_connected(device: &MqttDevice) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.is_connected() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Publishes one QoS 1 message of any size (up to the MQTT maximum) and waits for its PUBACK.
async fn publish_big(port: u16, topic: &str, payload: Vec<u8>) {
    let mut opts = MqttOptions::new(format!("big-{}", now_ms()), "127.0.0.1", port);
    opts.set_max_packet_size(300 << 20, 300 << 20);
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("big publisher lost its broker: {e}"),
            }
        }
    })
    .await
    .expect("the broker acknowledged the big publish");
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(300), events.poll()).await;
}

fn health_counter(c: &CloudCollector, name: &str) -> u64 {
    c.payloads_on("health")
        .last()
        .and_then(|h| h["counters"][name].as_u64())
        .unwrap_or(0)
}

async fn wait_health(c: &CloudCollector, ok: impl Fn(&Value) -> bool) -> bool {
    c.wait_for(
        |msgs| {
            msgs.iter()
                .rev()
                .find(|m| m.topic.ends_with("/health"))
                .is_some_and(|h| ok(&h.payload))
        },
        Duration::from_secs(10),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_on_either_connection_is_dead_lettered_and_traffic_flows_on() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-big")
        .await
        .expect("collector");
    let mut device = MqttDevice::spawn("127.0.0.1", local.port(), valve("valve-big"));
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        "gw-big",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        "",
        ALLOW,
    );
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    assert!(wait_online(&collector).await, "{}", agent.logs());
    assert!(wait_device_connected(&device).await);

    // Local: 1 MiB on a reading topic, then a good reading.
    publish_big(local.port(), "sensors/x/y", vec![b'7'; 1 << 20]).await;
    let t0 = now_ms();
    publish_samples(local.port(), &[sample("dev-ok", "temp", 21.5, t0)]).await;
    let sent = Instant::now();
    let flowed = collector
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/telemetry")
                        && m.payload["readings"]
                            .as_array()
                            .is_some_and(|rs| rs.iter().any(|r| r["device"] == "dev-ok"))
                })
            },
            Duration::from_secs(5),
        )
        .await;
    let took = sent.elapsed();
    assert!(
        flowed,
        "the reading behind the big one never arrived\n{}",
        agent.logs()
    );
    assert!(took < Duration::from_secs(1), "the reading took {took:?}");

    // Cloud: a 20 MiB command and a 5 MiB rule bundle, then a good command.
    let base = collector.base_topic().to_string();
    publish_big(
        cloud.port(),
        &format!("{base}/commands"),
        vec![b'{'; 20 << 20],
    )
    .await;
    publish_big(
        cloud.port(),
        &format!("{base}/rules/set"),
        vec![b'{'; 5 << 20],
    )
    .await;
    collector
        .publish("commands", &command("ok-1", "valve-big", 30), false)
        .await
        .unwrap();
    let sent = Instant::now();
    let answered = collector
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/commands/outcomes")
                        && m.payload["id"] == "ok-1"
                        && m.payload["state"] == "succeeded"
                })
            },
            Duration::from_secs(5),
        )
        .await;
    let took = sent.elapsed();
    assert!(
        answered,
        "the command behind the big ones was never answered\n{}",
        agent.logs()
    );
    assert!(took < Duration::from_secs(1), "the command took {took:?}");

    // Counted per connection, sampled with the reason, and no reconnect on either side.
    assert!(
        wait_health(&collector, |h| {
            h["counters"]["local_oversized"].as_u64() == Some(1)
                && h["counters"]["cloud_oversized"].as_u64() == Some(2)
        })
        .await,
        "{:?}",
        collector.payloads_on("health").last()
    );
    let dead = collector.payloads_on("deadletter");
    let too_big = |d: &&Value| {
        d["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("over the")
    };
    assert_eq!(dead.iter().filter(too_big).count(), 3, "{dead:?}");
    assert_eq!(
        health_counter(&collector, "uplink_connects"),
        1,
        "the uplink reconnected"
    );
    let logs = agent.logs();
    assert!(!logs.contains("lost local broker"), "{logs}");
    assert!(!logs.contains("lost cloud broker"), "{logs}");
    assert!(agent.terminate(Duration::from_secs(10)).success());
    device.stop().await;
}

/// Lines of `logs` at WARN or above that contain `needle`.
fn warnings(logs: &str, needle: &str) -> usize {
    logs.lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_at_start_are_logged_at_once_and_shown_in_health_and_metrics() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let local_proxy = FaultProxy::start(local.addr()).await.expect("proxy");
    let cloud_proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    local_proxy.cut();
    cloud_proxy.cut();
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-down")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        "gw-down",
        &dir.path().join("data"),
        local_proxy.port(),
        cloud_proxy.port(),
        "",
        "[metrics]\nprometheus = true\nport = 0\n",
    );
    // The default log level: what an operator sees.
    let mut agent =
        AgentProcess::start_with_env(dir.path(), &config, &[("RUST_LOG", "info".to_string())]);
    agent
        .wait_log("metrics endpoint listening", Duration::from_secs(10))
        .await;
    let port = metrics_port(&agent.logs());
    // Both failures are logged within 3 s of the start...
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let logs = agent.logs();
        if warnings(&logs, "local broker") >= 1 && warnings(&logs, "cloud broker") >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no warning within 3 s:\n{logs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and then not on every attempt (the backoff tries several times a second here).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let logs = agent.logs();
    assert_eq!(warnings(&logs, "local broker"), 1, "{logs}");
    assert_eq!(warnings(&logs, "cloud broker"), 1, "{logs}");
    let m = scrape_parsed(port).await.expect("scrape");
    assert_eq!(m.get("edgestream_local_online"), Some(&0.0), "{m:?}");
    assert_eq!(m.get("edgestream_uplink_online"), Some(&0.0), "{m:?}");
    assert!(
        m.get("edgestream_local_connect_failures_total")
            .copied()
            .unwrap_or(0.0)
            >= 3.0,
        "{m:?}"
    );
    assert!(
        m.get("edgestream_uplink_connect_failures_total")
            .copied()
            .unwrap_or(0.0)
            >= 3.0,
        "{m:?}"
    );

    // The cloud comes back: health says the local broker is still down.
    cloud_proxy.restore();
    assert!(wait_online(&collector).await, "{}", agent.logs());
    assert!(
        wait_health(&collector, |h| h["summary"]["local"]["online"] == false
            && h["summary"]["local"]["connect_failures"].as_u64() >= Some(3))
        .await,
        "{:?}",
        collector.payloads_on("health").last()
    );
    // The local broker comes back: connected, and health follows.
    local_proxy.restore();
    agent.wait_subscribed().await;
    assert!(
        wait_health(&collector, |h| h["summary"]["local"]["online"] == true).await,
        "{:?}",
        collector.payloads_on("health").last()
    );
    let m = scrape_parsed(port).await.expect("scrape");
    assert_eq!(m.get("edgestream_local_online"), Some(&1.0), "{m:?}");
    assert!(agent.terminate(Duration::from_secs(10)).success());
}

const SERIAL_ALLOW: &str = r#"
[commands]
reply_timeout_ms = 2000
max_pending = 5
max_lifetime_ms = 6000

[[commands.allow]]
name = "set_position"
devices = ["valve-*"]
args.percent = { type = "number", min = 0, max = 100, required = true }

[[commands.allow]]
name = "cancel"
devices = ["valve-*"]
args.id = { type = "string", required = true }

[[serial]]
path = "/nonexistent/ttyEDGE0"
framing = "key-value"
devices = ["valve-z"]
reconnect_min_ms = 50
reconnect_max_ms = 300
"#;

/// Waits for a final outcome of `id`; returns (state, detail).
async fn wait_final(
    c: &CloudCollector,
    agent: &AgentProcess,
    id: &str,
    within: Duration,
) -> (String, String) {
    let found = c
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/commands/outcomes")
                        && m.payload["id"] == id
                        && FINAL.contains(&m.payload["state"].as_str().unwrap_or_default())
                })
            },
            within,
        )
        .await;
    let all: Vec<(String, String)> = c
        .outcomes()
        .iter()
        .filter(|o| o["id"] == id)
        .map(|o| {
            (
                o["state"].as_str().unwrap_or_default().to_string(),
                o["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        found,
        "no final outcome for {id} within {within:?}: {all:?}\n{}",
        agent.logs()
    );
    all.into_iter()
        .find(|(s, _)| FINAL.contains(&s.as_str()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_commands_for_an_unreachable_device_expire_and_can_be_cancelled() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-pend")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        "gw-pend",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        "",
        SERIAL_ALLOW,
    );
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    assert!(wait_online(&collector).await, "{}", agent.logs());

    // Five commands that can never be delivered, claiming to stay valid almost forever.
    let forever = |id: &str| {
        let mut c = command(id, "valve-z", 10);
        c["expires_at"] = json!(u64::MAX - 1);
        c
    };
    for i in 1..=5 {
        collector
            .publish("commands", &forever(&format!("p-{i}")), false)
            .await
            .unwrap();
    }
    let accepted = collector
        .wait_for(
            |msgs| {
                msgs.iter()
                    .filter(|m| {
                        m.topic.ends_with("/commands/outcomes") && m.payload["state"] == "accepted"
                    })
                    .count()
                    >= 5
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(accepted, "{:?}\n{}", collector.outcomes(), agent.logs());
    let started = Instant::now();
    // The table is full: a sixth is refused.
    collector
        .publish("commands", &command("q-1", "valve-z", 20), false)
        .await
        .unwrap();
    let (state, detail) = wait_final(&collector, &agent, "q-1", Duration::from_secs(5)).await;
    assert_eq!(state, "rejected");
    assert!(detail.contains("too many pending"), "{detail}");

    // `cancel` ends p-1 even with the table full, and frees its place.
    let mut cancel = command("x-1", "valve-z", 0);
    cancel["name"] = json!("cancel");
    cancel["args"] = json!({"id": "p-1"});
    collector.publish("commands", &cancel, false).await.unwrap();
    let (state, detail) = wait_final(&collector, &agent, "p-1", Duration::from_secs(5)).await;
    assert_eq!(state, "failed", "{detail}");
    assert!(detail.contains("cancelled by `x-1`"), "{detail}");
    let (state, detail) = wait_final(&collector, &agent, "x-1", Duration::from_secs(5)).await;
    assert_eq!(state, "succeeded", "{detail}");
    // Cancelling what is not pending says so.
    let mut again = cancel.clone();
    again["id"] = json!("x-2");
    collector.publish("commands", &again, false).await.unwrap();
    let (state, detail) = wait_final(&collector, &agent, "x-2", Duration::from_secs(5)).await;
    assert_eq!(state, "rejected");
    assert!(detail.contains("no pending command `p-1`"), "{detail}");
    collector
        .publish("commands", &command("q-2", "valve-z", 20), false)
        .await
        .unwrap();
    let accepted = collector
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/commands/outcomes")
                        && m.payload["id"] == "q-2"
                        && m.payload["state"] == "accepted"
                })
            },
            Duration::from_secs(5),
        )
        .await;
    assert!(accepted, "{:?}", collector.outcomes());

    // The others end at the lifetime ceiling (6 s after acceptance), not at u64::MAX.
    for i in 2..=5 {
        let id = format!("p-{i}");
        let (state, detail) = wait_final(&collector, &agent, &id, Duration::from_secs(15)).await;
        assert_eq!(state, "timed_out", "{id}: {detail}");
        assert!(detail.contains("unreachable"), "{detail}");
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    // And the table takes commands again.
    collector
        .publish("commands", &command("q-3", "valve-z", 20), false)
        .await
        .unwrap();
    let accepted = collector
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/commands/outcomes")
                        && m.payload["id"] == "q-3"
                        && m.payload["state"] == "accepted"
                })
            },
            Duration::from_secs(5),
        )
        .await;
    assert!(accepted, "{:?}", collector.outcomes());
    assert!(agent.terminate(Duration::from_secs(10)).success());
}
