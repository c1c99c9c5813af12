//! The simulator's MQTT parts against real brokers: mosquitto (spawned) and
//! rumqttd (in-process).

use std::time::Duration;

use edgestream_sim::{
    CloudCollector, CommandBehavior, FaultProxy, InProcessBroker, MetricSpec, Mosquitto,
    MqttDevice, MqttDeviceConfig, Signal,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn device(name: &str, samples: u64) -> MqttDeviceConfig {
    let mut c = MqttDeviceConfig::new(
        name,
        vec![
            MetricSpec::new("temperature", Signal::temperature(60.0, 1)),
            MetricSpec::new("pressure", Signal::pressure(2.0, 2)),
        ],
        200.0,
    );
    c.max_samples = Some(samples);
    c
}

/// Every acknowledged reading reached a subscriber, with the value, ts and
/// seq the device recorded.
async fn readings_arrive(port: u16) {
    // A collector on prefix "sensors" and "gateway" dev-1 is a subscriber to
    // sensors/dev-1/#.
    let sub = CloudCollector::connect("127.0.0.1", port, "sensors", "dev-1")
        .await
        .expect("subscriber");
    let mut dev = MqttDevice::spawn("127.0.0.1", port, device("dev-1", 50));
    assert!(dev.wait_finished(WAIT).await, "device did not finish");
    let acked = dev.acked();
    assert_eq!(acked.len(), 100, "stats: {:?}", dev.stats());
    assert!(
        sub.wait_for(|m| m.len() >= 100, WAIT).await,
        "subscriber got {}",
        sub.len()
    );
    let temps = sub.payloads_on("temperature");
    let acked_temps: Vec<_> = acked.iter().filter(|r| r.metric == "temperature").collect();
    assert_eq!(temps.len(), acked_temps.len());
    for (got, want) in temps.iter().zip(&acked_temps) {
        assert_eq!(got["value"].as_f64(), Some(want.value));
        assert_eq!(got["ts"].as_i64(), Some(want.ts));
        assert_eq!(got["seq"].as_u64(), Some(u64::from(want.seq)));
    }
    dev.stop().await;
}

#[tokio::test]
async fn readings_arrive_through_mosquitto() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    readings_arrive(broker.port()).await;
}

#[tokio::test]
async fn readings_arrive_through_inprocess_broker() {
    let broker = InProcessBroker::start().await.expect("rumqttd");
    readings_arrive(broker.port()).await;
}

#[tokio::test]
async fn devices_answer_commands_as_configured() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let cloud = CloudCollector::connect("127.0.0.1", broker.port(), "devices", "valve-1")
        .await
        .expect("collector");
    let dev = MqttDevice::spawn("127.0.0.1", broker.port(), device("valve-1", 1));
    assert!(dev.wait_connected(WAIT).await);
    // Give the device's SUBSCRIBE a moment to be processed before commanding.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cmd = |id: &str| {
        json!({"v":1,"id":id,"device":"valve-1","name":"set_position","args":{"percent":40},
               "issued_at":1,"expires_at":i64::MAX})
    };
    cloud.publish("commands", &cmd("c-1"), false).await.unwrap();
    assert!(
        cloud
            .wait_for(|m| m.iter().any(|m| m.topic.ends_with("/replies")), WAIT)
            .await
    );
    dev.set_command_behavior(CommandBehavior::Fail("jammed".into()));
    cloud.publish("commands", &cmd("c-2"), false).await.unwrap();
    assert!(
        cloud
            .wait_for(
                |m| m.iter().filter(|m| m.topic.ends_with("/replies")).count() >= 2,
                WAIT
            )
            .await
    );
    dev.set_command_behavior(CommandBehavior::SucceedAfter(Duration::from_millis(500)));
    let asked = std::time::Instant::now();
    cloud
        .publish("commands", &cmd("c-slow"), false)
        .await
        .unwrap();
    assert!(
        cloud
            .wait_for(
                |m| m.iter().filter(|m| m.topic.ends_with("/replies")).count() >= 3,
                WAIT
            )
            .await
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    dev.set_command_behavior(CommandBehavior::Ignore);
    cloud.publish("commands", &cmd("c-3"), false).await.unwrap();
    assert!(dev.wait_commands(4, WAIT).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let replies = cloud.payloads_on("replies");
    assert_eq!(replies[0]["id"], "c-1");
    assert_eq!(replies[0]["state"], "succeeded");
    assert_eq!(replies[0]["detail"], "position set to 40");
    assert_eq!(replies[1]["id"], "c-2");
    assert_eq!(replies[1]["state"], "failed");
    assert_eq!(replies[1]["detail"], "jammed");
    assert_eq!(replies[2]["id"], "c-slow");
    assert_eq!(replies[2]["state"], "succeeded");
    assert_eq!(replies.len(), 3, "an ignored command got a reply");
    assert_eq!(dev.commands()[3]["id"], "c-3");
}

#[tokio::test]
async fn proxy_cut_disconnects_and_restore_reconnects() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let proxy = FaultProxy::start(broker.addr()).await.expect("proxy");
    let mut cfg = device("dev-p", u64::MAX);
    cfg.rate = edgestream_sim::Rate::PerSecond(50.0);
    let dev = MqttDevice::spawn("127.0.0.1", proxy.port(), cfg);
    assert!(dev.wait_acked(10, WAIT).await);
    assert_eq!(proxy.live_connections(), 1);

    proxy.cut();
    let deadline = tokio::time::Instant::now() + WAIT;
    while dev.is_connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dev.is_connected(), "device still connected after cut");
    let acked_at_cut = dev.stats().acked;
    // While cut, reconnect attempts are refused and nothing is acknowledged.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = proxy.stats();
    assert!(stats.refused >= 1, "{stats:?}");
    assert_eq!(stats.live, 0, "{stats:?}");
    assert!(
        dev.stats().acked
            <= acked_at_cut + 2 * u64::from(edgestream_sim::devices::mqtt::DEFAULT_MAX_INFLIGHT)
    );
    assert!(dev.stats().skipped_offline > 0);

    proxy.restore();
    assert!(dev.wait_connected(WAIT).await);
    let after = dev.stats().acked;
    assert!(dev.wait_acked(after + 10, WAIT).await);
    assert!(dev.stats().connects >= 2);
}

#[tokio::test]
async fn proxy_blackhole_holds_bytes_until_restore() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let proxy = FaultProxy::start(broker.addr()).await.expect("proxy");
    let mut cfg = device("dev-b", u64::MAX);
    cfg.rate = edgestream_sim::Rate::PerSecond(50.0);
    let dev = MqttDevice::spawn("127.0.0.1", proxy.port(), cfg);
    assert!(dev.wait_acked(5, WAIT).await);
    proxy.blackhole();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frozen = dev.stats().acked;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dev.stats().acked, frozen, "acks flowed through a blackhole");
    assert!(
        dev.is_connected(),
        "a blackhole must not close the connection"
    );
    proxy.restore();
    assert!(dev.wait_acked(frozen + 10, WAIT).await);
    assert_eq!(dev.stats().connects, 1);
}

#[tokio::test]
async fn mosquitto_restart_keeps_port_and_retained_messages() {
    let mut broker = Mosquitto::start().await.expect("mosquitto");
    let port = broker.port();
    let cloud = CloudCollector::connect("127.0.0.1", port, "edgestream", "gw-r")
        .await
        .expect("collector");
    cloud
        .publish("status", &json!({"state": "online"}), true)
        .await
        .unwrap();
    assert!(cloud.wait_for(|m| !m.is_empty(), WAIT).await);
    broker.restart().await.expect("restart");
    assert_eq!(broker.port(), port);
    let late = CloudCollector::connect("127.0.0.1", port, "edgestream", "gw-r")
        .await
        .expect("collector after restart");
    assert!(late.wait_for(|m| !m.is_empty(), WAIT).await);
    let status = late.messages_on("status");
    assert!(status[0].retained);
    assert_eq!(status[0].payload, json!({"state": "online"}));
    // The first collector reconnects by itself.
    assert!(tokio::time::timeout(WAIT, async {
        while !cloud.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok());
    let _: Vec<Value> = cloud.alerts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_out_devices_get_everything_acknowledged() {
    let broker = InProcessBroker::start().await.expect("rumqttd");
    let mosq = Mosquitto::start().await.expect("mosquitto");
    for port in [broker.port(), mosq.port()] {
        let mut cfg = device("fast-1", 2000);
        cfg.rate = edgestream_sim::Rate::FlatOut;
        let start = std::time::Instant::now();
        let mut dev = MqttDevice::spawn("127.0.0.1", port, cfg);
        assert!(dev.wait_finished(WAIT).await, "{:?}", dev.stats());
        let s = dev.stats();
        assert_eq!(s.acked, 4000, "{s:?}");
        assert_eq!(
            s.skipped_backpressure + s.skipped_offline + s.unacked_lost,
            0,
            "{s:?}"
        );
        // Every (metric, seq) exactly once.
        let mut keys: Vec<(String, u32)> =
            dev.acked().into_iter().map(|r| (r.metric, r.seq)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 4000);
        eprintln!(
            "port {port}: 4000 readings acknowledged in {:?}",
            start.elapsed()
        );
        dev.stop().await;
    }
}

#[tokio::test]
async fn mosquitto_kill_then_restart_comes_back_on_the_same_port() {
    let mut broker = Mosquitto::start().await.expect("mosquitto");
    let port = broker.port();
    let mut cfg = device("dev-k", u64::MAX);
    cfg.rate = edgestream_sim::Rate::PerSecond(100.0);
    let dev = MqttDevice::spawn("127.0.0.1", port, cfg);
    assert!(dev.wait_acked(10, WAIT).await);
    broker.kill();
    assert!(!broker.is_running());
    let deadline = tokio::time::Instant::now() + WAIT;
    while dev.is_connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dev.is_connected());
    broker.restart().await.expect("restart");
    assert_eq!(broker.port(), port);
    assert!(broker.is_running());
    assert!(
        dev.wait_connected(WAIT).await,
        "device did not reconnect\n{}",
        broker.log_tail()
    );
    let n = dev.stats().acked;
    assert!(dev.wait_acked(n + 10, WAIT).await);
}

#[tokio::test]
async fn mosquitto_tls_listener_completes_a_verified_handshake() {
    let certs = tempfile::tempdir().unwrap();
    let tls = edgestream_sim::broker::generate_test_certs(certs.path())
        .expect("test certificates (needs the openssl CLI)")
        .server;
    let ca = tls.ca.clone();
    let broker = Mosquitto::start_with(edgestream_sim::MosquittoOptions {
        tls: Some(tls),
        extra_config: Vec::new(),
    })
    .await
    .expect("mosquitto with TLS");
    let tls_port = broker.tls_port().expect("tls port");
    assert_ne!(tls_port, broker.port());
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{tls_port}"),
            "-CAfile",
        ])
        .arg(&ca)
        .args(["-verify_return_error", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Verification: OK"), "{text}");
}

/// What outage tests rely on: a persistent session and the QoS 1 messages
/// queued for it survive `restart()`.
#[tokio::test]
async fn mosquitto_restart_keeps_persistent_sessions_and_their_queues() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let mut broker = Mosquitto::start().await.expect("mosquitto");
    let port = broker.port();
    let opts = || {
        let mut o = MqttOptions::new("persist-1", "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    // Subscribe with a persistent session, then vanish.
    {
        let (client, mut el) = AsyncClient::new(opts(), 10);
        client
            .subscribe("sensors/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(WAIT, el.poll())
                .await
                .expect("suback in time")
            {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    }
    let mut dev = MqttDevice::spawn("127.0.0.1", broker.port(), device("dev-q", 5));
    assert!(dev.wait_finished(WAIT).await);
    dev.stop().await;
    broker.restart().await.expect("restart");

    let (_client, mut el) = AsyncClient::new(opts(), 10);
    let mut got = 0;
    let mut session_present = false;
    while got < 10 {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("queued messages in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => session_present = ack.session_present,
            Ok(Event::Incoming(Packet::Publish(_))) => got += 1,
            Ok(_) => {}
            Err(e) => panic!("subscriber after restart: {e}"),
        }
    }
    assert!(session_present);
}

#[tokio::test]
async fn proxy_delay_slows_acknowledgements() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let proxy = FaultProxy::start(broker.addr()).await.expect("proxy");
    let mut cfg = device("dev-slow", 3);
    cfg.max_inflight = 1;
    cfg.rate = edgestream_sim::Rate::FlatOut;
    proxy.set_delay(Duration::from_millis(100));
    let start = std::time::Instant::now();
    let dev = MqttDevice::spawn("127.0.0.1", proxy.port(), cfg);
    assert!(dev.wait_finished(WAIT).await);
    // CONNECT/CONNACK plus 3 samples' publish/ack round trips (both metrics
    // of a sample go together), each direction delayed 100 ms: >= 800 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(750),
        "{:?}",
        start.elapsed()
    );
    proxy.set_delay(Duration::ZERO);
    assert_eq!(dev.stats().acked, 6);
}

#[tokio::test]
async fn devices_drop_a_blackholed_link_after_the_keep_alive() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let proxy = FaultProxy::start(broker.addr()).await.expect("proxy");
    let mut cfg = device("dev-ka", u64::MAX);
    cfg.keep_alive = Duration::from_secs(1);
    cfg.rate = edgestream_sim::Rate::PerSecond(20.0);
    let dev = MqttDevice::spawn("127.0.0.1", proxy.port(), cfg);
    assert!(dev.wait_acked(5, WAIT).await);
    proxy.blackhole();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dev.is_connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dev.is_connected(), "a dead link was never noticed");
    proxy.restore();
    assert!(dev.wait_connected(WAIT).await);
}

#[tokio::test]
async fn stop_waits_for_the_acks_of_readings_in_flight() {
    let broker = Mosquitto::start().await.expect("mosquitto");
    let proxy = FaultProxy::start(broker.addr()).await.expect("proxy");
    let mut cfg = device("dev-stop", u64::MAX);
    cfg.rate = edgestream_sim::Rate::PerSecond(100.0);
    let mut dev = MqttDevice::spawn("127.0.0.1", proxy.port(), cfg);
    assert!(dev.wait_acked(10, WAIT).await);
    // Acks now take 300 ms to come back, so some are in flight at stop.
    proxy.set_delay(Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.stop().await;
    let s = dev.stats();
    assert_eq!(s.unacked_lost, 0, "{s:?}");
    assert_eq!(s.acked, s.published, "{s:?}");
}
