//! System tests of device commands (issue 6): the real `edgestream` binary between two real
//! mosquitto brokers, simulated devices on real pseudo-terminals and on the local broker.
//!
//! - a rule fires on serial readings and its commands reach a text-line device and a
//!   binary-frame device, which reply; the outcomes reach the cloud;
//! - cloud commands reach a serial device and an MQTT device and succeed; an unknown command,
//!   bad arguments, an expired command, a reused id, a malformed command and a device that
//!   never answers each end with the expected outcome and reason;
//! - a restart (SIGKILL) with a command waiting for its reply, and another with a command not
//!   yet delivered (its port unplugged), neither loses nor repeats either.
//!
//! The tests run one at a time (like `serial.rs`): pty numbers are reused as soon as one closes.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use edgestream_sim::{
    CloudCollector, CommandBehavior, FaultProxy, LineFormat, MetricSpec, Mosquitto, MqttDevice,
    MqttDeviceConfig, Profile, SerialDevice, SerialDeviceConfig, Signal,
};
use serde_json::{json, Value};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ALLOW: &str = r#"
[commands]
reply_timeout_ms = 2000

[[commands.allow]]
name = "set_position"
devices = ["valve-*"]
args.percent = { type = "number", min = 0, max = 100, required = true }

[[commands.allow]]
name = "open_vent"
devices = ["vent-*"]
args.percent = { type = "integer", min = 0, max = 100, required = true }

[[commands.allow]]
name = "set_burner"
devices = ["boiler-*"]
args.enabled = { type = "bool", required = true }
"#;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn command(id: &str, device: &str, name: &str, args: Value) -> Value {
    let now = now_ms();
    json!({"v": 1, "id": id, "device": device, "name": name, "args": args,
           "issued_at": now, "expires_at": now + 60_000})
}

fn serial_device(name: &str, format: LineFormat, temperature: f64) -> SerialDeviceConfig {
    let mut c = SerialDeviceConfig::new(
        name,
        vec![MetricSpec::new(
            "temperature",
            Signal::new(Profile::Constant(temperature), 0.0, 1),
        )],
        20.0,
    );
    c.format = format;
    c
}

fn mqtt_device(name: &str, behavior: CommandBehavior) -> MqttDeviceConfig {
    let mut c = MqttDeviceConfig::new(
        name,
        vec![MetricSpec::new(
            "position",
            Signal::new(Profile::Constant(10.0), 0.0, 3),
        )],
        2.0,
    );
    c.commands = behavior;
    c
}

fn port_toml(dev: &SerialDevice, framing: &str, extra: &str) -> String {
    format!(
        "\n[[serial]]\npath = \"{}\"\nframing = \"{framing}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n{extra}\n",
        dev.path().display()
    )
}

/// (state, detail) of every outcome for `id`, in arrival order.
fn outcomes(c: &CloudCollector, id: &str) -> Vec<(String, String)> {
    c.outcomes()
        .iter()
        .filter(|o| o["id"] == id)
        .map(|o| {
            (
                o["state"].as_str().unwrap_or_default().to_string(),
                o["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits for an outcome of `id` in `state`; returns its detail.
async fn wait_outcome(c: &CloudCollector, agent: &AgentProcess, id: &str, state: &str) -> String {
    let arrived = c
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/commands/outcomes")
                        && m.payload["id"] == id
                        && m.payload["state"] == state
                })
            },
            Duration::from_secs(30),
        )
        .await;
    assert!(
        arrived,
        "no `{state}` outcome for {id}; outcomes so far: {:?}\n{}",
        outcomes(c, id),
        agent.logs()
    );
    outcomes(c, id)
        .into_iter()
        .find(|(s, _)| s == state)
        .map(|(_, d)| d)
        .unwrap_or_default()
}

/// The distinct states reported for `id`, in first-arrival order.
fn states(c: &CloudCollector, id: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for (s, _) in outcomes(c, id) {
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

async fn wait_port_open(agent: &mut AgentProcess, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.logs().matches("serial port open").count() < n {
        assert!(
            std::time::Instant::now() < deadline && agent.is_running(),
            "serial ports not open\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cloud broker, its collector and the agent between `local` and it: online, subscribed,
/// its one serial port open.
struct Gateway {
    cloud: Mosquitto,
    collector: CloudCollector,
    dir: tempfile::TempDir,
    config: String,
    agent: AgentProcess,
}

impl Gateway {
    async fn start(gateway: &str, local: &Mosquitto, extra: &str) -> Gateway {
        let cloud = Mosquitto::start().await.expect("cloud broker");
        let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", gateway)
            .await
            .expect("collector");
        let dir = tempfile::tempdir().unwrap();
        let config = config_toml(
            gateway,
            &dir.path().join("data"),
            local.port(),
            cloud.port(),
            "",
            extra,
        );
        let mut agent = AgentProcess::start(dir.path(), &config);
        agent.wait_subscribed().await;
        assert!(wait_online(&collector).await, "{}", agent.logs());
        wait_port_open(&mut agent, 1).await;
        Gateway {
            cloud,
            collector,
            dir,
            config,
            agent,
        }
    }
}

fn health_counter(c: &CloudCollector, name: &str) -> u64 {
    c.payloads_on("health")
        .last()
        .and_then(|h| h["counters"][name].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_serial_readings_commands_serial_devices_while_offline_and_the_outcomes_follow() {
    let _one = ONE_AT_A_TIME.lock().await;
    // boiler-3 speaks binary frames at 90 degrees, 1 s of signal time per sample: the rule
    // (> 80 for 30 s) raises after 31 samples, once. vent-1 speaks JSON lines.
    let mut boiler = serial_device("boiler-3", LineFormat::Binary, 90.0);
    boiler.ts_step = Duration::from_secs(1);
    let boiler = SerialDevice::spawn(boiler).expect("boiler");
    let vent = SerialDevice::spawn(serial_device("vent-1", LineFormat::Json, 20.0)).expect("vent");
    let rules = r#"
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  alert critical "boiler overheating"
  command open_vent(percent = 100) to device "vent-1"
  command set_burner(enabled = false)
"#;
    let extra = [
        ALLOW.to_string(),
        port_toml(&boiler, "binary", ""),
        port_toml(&vent, "json", "device = \"vent-1\""),
    ]
    .concat();
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-cmd-rule")
        .await
        .expect("collector");
    // The cloud is unreachable from the start: local rules must act without it.
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml(
        "gw-cmd-rule",
        &dir.path().join("data"),
        local.port(),
        proxy.port(),
        rules,
        &extra,
    );
    let mut agent = AgentProcess::start(dir.path(), &config);
    wait_port_open(&mut agent, 2).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while vent.commands().is_empty() || boiler.commands().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no command while offline\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(collector.outcomes().is_empty(), "the cloud was reachable?");
    proxy.restore();

    // Both commands are issued by the rule, accepted, written, answered and reported.
    let found = collector
        .wait_for(
            |msgs| {
                msgs.iter()
                    .filter(|m| {
                        m.topic.ends_with("/commands/outcomes") && m.payload["state"] == "succeeded"
                    })
                    .count()
                    >= 2
            },
            Duration::from_secs(40),
        )
        .await;
    assert!(
        found,
        "outcomes: {:?}\n{}",
        collector.outcomes(),
        agent.logs()
    );
    assert!(
        collector
            .alerts()
            .iter()
            .any(|a| a["rule"] == "overheat" && a["device"] == "boiler-3"),
        "the alert reached the cloud"
    );
    let vent_cmds = vent.commands();
    assert_eq!(vent_cmds.len(), 1, "vent got {vent_cmds:?}");
    assert_eq!(vent_cmds[0]["name"], "open_vent");
    assert_eq!(vent_cmds[0]["args"]["percent"], 100);
    let boiler_cmds = boiler.commands();
    assert_eq!(boiler_cmds.len(), 1, "boiler got {boiler_cmds:?}");
    assert_eq!(boiler_cmds[0]["name"], "set_burner");
    assert_eq!(boiler_cmds[0]["args"]["enabled"], false);
    for cmd in vent_cmds.iter().chain(&boiler_cmds) {
        let id = cmd["id"].as_str().expect("command id");
        assert_eq!(states(&collector, id), ["accepted", "succeeded"], "{id}");
        let accepted = &outcomes(&collector, id)[0].1;
        assert!(accepted.contains("rule `overheat`"), "{accepted}");
    }
    assert!(agent.terminate(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_reach_serial_and_mqtt_devices_and_bad_ones_are_rejected_with_a_reason() {
    let _one = ONE_AT_A_TIME.lock().await;
    let valve_s =
        SerialDevice::spawn(serial_device("valve-s", LineFormat::KeyValue, 20.0)).expect("valve");
    let extra = [
        ALLOW.to_string(),
        port_toml(&valve_s, "key-value", "device = \"valve-s\""),
    ]
    .concat();
    let local = Mosquitto::start().await.expect("local broker");
    let mut valve_m = MqttDevice::spawn(
        "127.0.0.1",
        local.port(),
        mqtt_device("valve-m", CommandBehavior::Succeed),
    );
    let mut valve_mute = MqttDevice::spawn(
        "127.0.0.1",
        local.port(),
        mqtt_device("valve-mute", CommandBehavior::Ignore),
    );
    let Gateway {
        cloud: _cloud,
        collector,
        dir: _dir,
        mut agent,
        ..
    } = Gateway::start("gw-cmd", &local, &extra).await;

    let good_mqtt = command("c-m1", "valve-m", "set_position", json!({"percent": 40}));
    let good_serial = command("c-s1", "valve-s", "set_position", json!({"percent": 60.5}));
    let mut expired = command("c-old", "valve-m", "set_position", json!({"percent": 1}));
    expired["issued_at"] = json!(now_ms() - 20_000);
    expired["expires_at"] = json!(now_ms() - 10_000);
    let sends = [
        good_mqtt.clone(),
        good_serial,
        command("c-unknown", "valve-m", "reboot_all", json!({})),
        command(
            "c-range",
            "valve-m",
            "set_position",
            json!({"percent": 140}),
        ),
        command(
            "c-type",
            "valve-m",
            "set_position",
            json!({"percent": "wide"}),
        ),
        command("c-where", "pump-1", "set_position", json!({"percent": 5})),
        expired,
        command(
            "c-mute",
            "valve-mute",
            "set_position",
            json!({"percent": 5}),
        ),
        // No id: only the dead-letter topic can say why.
        json!({"v": 1, "device": "valve-m", "name": "set_position"}),
    ];
    for c in &sends {
        collector.publish("commands", c, false).await.unwrap();
    }
    let detail = wait_outcome(&collector, &agent, "c-m1", "succeeded").await;
    assert_eq!(detail, "position set to 40");
    wait_outcome(&collector, &agent, "c-s1", "succeeded").await;
    // The same id again, after it finished: refused, and the device is not asked twice.
    collector
        .publish("commands", &good_mqtt, false)
        .await
        .unwrap();

    let expect_rejected = [
        ("c-unknown", "unknown command `reboot_all`"),
        ("c-range", "`percent` = 140 is above the maximum 100"),
        ("c-type", "`percent` must be a number, got a string"),
        ("c-where", "not allowed for device `pump-1`"),
        ("c-old", "expired"),
    ];
    for (id, why) in expect_rejected {
        let detail = wait_outcome(&collector, &agent, id, "rejected").await;
        assert!(detail.contains(why), "{id}: {detail:?} should say {why:?}");
        assert_eq!(states(&collector, id), ["rejected"], "{id}");
    }
    // The reused id is refused on the dead-letter topic; its outcomes stay one final one.
    let dup = collector
        .wait_for(
            |msgs| {
                msgs.iter().any(|m| {
                    m.topic.ends_with("/deadletter")
                        && m.payload["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("duplicate id `c-m1`"))
                })
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(dup, "no dead letter for the reused id\n{}", agent.logs());
    assert_eq!(states(&collector, "c-m1"), ["accepted", "succeeded"]);
    // The mute device never answers: timed out after reply_timeout_ms (2 s).
    let why = wait_outcome(&collector, &agent, "c-mute", "timed_out").await;
    assert!(why.contains("no reply"), "{why}");
    let dead = collector.payloads_on("deadletter");
    assert!(
        dead.iter().any(|d| d["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("malformed command")),
        "{dead:?}"
    );

    // Each device got exactly the commands that were accepted for it.
    let m_cmds = valve_m.commands();
    assert_eq!(m_cmds.len(), 1, "{m_cmds:?}");
    assert_eq!(m_cmds[0]["id"], "c-m1");
    assert_eq!(m_cmds[0]["args"]["percent"], 40);
    let s_cmds = valve_s.commands();
    assert_eq!(s_cmds.len(), 1, "{s_cmds:?}");
    assert_eq!(s_cmds[0]["id"], "c-s1");
    assert_eq!(s_cmds[0]["args"]["percent"], 60.5);
    assert_eq!(valve_mute.commands().len(), 1);

    // The health message counts them.
    // `wait_for` holds the collector's lock while it asks: read the messages it passes.
    let counted = collector
        .wait_for(
            |msgs| {
                msgs.iter()
                    .rev()
                    .find(|m| m.topic.ends_with("/health"))
                    .is_some_and(|h| {
                        h.payload["counters"]["commands_rejected"].as_u64() >= Some(6)
                            && h.payload["counters"]["commands_duplicate"].as_u64() >= Some(1)
                            && h.payload["counters"]["commands_timed_out"].as_u64() >= Some(1)
                    })
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(counted, "{:?}", collector.payloads_on("health").last());
    assert_eq!(health_counter(&collector, "commands_received_cloud"), 10);
    assert_eq!(health_counter(&collector, "commands_accepted"), 3);
    assert_eq!(health_counter(&collector, "commands_succeeded"), 2);
    assert_eq!(health_counter(&collector, "commands_timed_out"), 1);
    assert_eq!(health_counter(&collector, "commands_rejected"), 6);
    assert_eq!(health_counter(&collector, "commands_duplicate"), 1);
    assert!(agent.terminate(Duration::from_secs(10)).success());
    valve_m.stop().await;
    valve_mute.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_loses_nor_repeats_an_accepted_command() {
    let _one = ONE_AT_A_TIME.lock().await;
    let valve_s =
        SerialDevice::spawn(serial_device("valve-s", LineFormat::KeyValue, 20.0)).expect("valve");
    let extra = [
        ALLOW.replace("reply_timeout_ms = 2000", "reply_timeout_ms = 30000"),
        port_toml(
            &valve_s,
            "key-value",
            "device = \"valve-s\"\ndevices = [\"valve-s\"]",
        ),
    ]
    .concat();
    let local = Mosquitto::start().await.expect("local broker");
    // A slow actuator: it answers 3 s after the command.
    let mut valve_m = MqttDevice::spawn(
        "127.0.0.1",
        local.port(),
        mqtt_device(
            "valve-m",
            CommandBehavior::SucceedAfter(Duration::from_secs(3)),
        ),
    );
    let Gateway {
        cloud: _cloud,
        collector,
        dir: tmp,
        config,
        mut agent,
    } = Gateway::start("gw-cmd-kill", &local, &extra).await;
    let dir = tmp.path();

    // 1. Sent and waiting for its reply when the agent is killed; the reply arrives while
    //    the agent is down and the local broker keeps it for the agent's session.
    collector
        .publish(
            "commands",
            &command("c-slow", "valve-m", "set_position", json!({"percent": 70})),
            false,
        )
        .await
        .unwrap();
    wait_outcome(&collector, &agent, "c-slow", "accepted").await;
    assert!(valve_m.wait_commands(1, Duration::from_secs(10)).await);
    agent.kill();

    // 2. Accepted while its serial device is unplugged, then the agent is killed.
    valve_s.unplug().expect("unplug");
    agent = AgentProcess::start(dir, &config);
    agent.wait_subscribed().await;
    collector
        .publish(
            "commands",
            &command("c-later", "valve-s", "set_position", json!({"percent": 30})),
            false,
        )
        .await
        .unwrap();
    wait_outcome(&collector, &agent, "c-later", "accepted").await;
    // c-slow's reply was waiting at the local broker: matched after the restart.
    let detail = wait_outcome(&collector, &agent, "c-slow", "succeeded").await;
    assert_eq!(detail, "position set to 70");
    agent.kill();
    assert!(valve_s.commands().is_empty(), "sent to an unplugged port?");

    // 3. Replugged and restarted: c-later is delivered exactly once.
    valve_s.replug().expect("replug");
    agent = AgentProcess::start(dir, &config);
    let detail = wait_outcome(&collector, &agent, "c-later", "succeeded").await;
    assert!(detail.contains("set to 30"), "{detail}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        valve_m.commands().len(),
        1,
        "c-slow repeated: {:?}",
        valve_m.commands()
    );
    let s_cmds = valve_s.commands();
    assert_eq!(s_cmds.len(), 1, "c-later lost or repeated: {s_cmds:?}");
    assert_eq!(states(&collector, "c-slow"), ["accepted", "succeeded"]);
    assert_eq!(states(&collector, "c-later"), ["accepted", "succeeded"]);
    assert!(agent.terminate(Duration::from_secs(10)).success());
    valve_m.stop().await;
}

/// A reply counts only for the device whose replies topic it came on: one on
/// `devices/valve-3/replies` that claims to be valve-2's is refused (dead-lettered), and
/// valve-2's command still waits for valve-2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_for_another_device_is_refused() {
    let _one = ONE_AT_A_TIME.lock().await;
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-spoof")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        "gw-spoof",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        "",
        ALLOW,
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    assert!(wait_online(&collector).await, "{}", agent.logs());
    collector
        .publish(
            "commands",
            &command("c-v2", "valve-2", "set_position", json!({"percent": 30})),
            false,
        )
        .await
        .unwrap();
    wait_outcome(&collector, &agent, "c-v2", "accepted").await;
    let spoof = json!({"v": 1, "id": "c-v2", "device": "valve-2", "state": "succeeded",
                       "detail": "not really", "ts": now_ms()});
    publish_raw(
        local.port(),
        &[(
            "devices/valve-3/replies".to_string(),
            spoof.to_string().into_bytes(),
        )],
    )
    .await;
    // Nobody answers for valve-2: it times out (reply_timeout_ms = 2000).
    let why = wait_outcome(&collector, &agent, "c-v2", "timed_out").await;
    assert!(why.contains("no reply"), "{why}");
    assert!(
        !states(&collector, "c-v2").contains(&"succeeded".to_string()),
        "{:?}",
        outcomes(&collector, "c-v2")
    );
    let dead = collector.payloads_on("deadletter");
    assert!(
        dead.iter().any(|d| d["where"] == "devices/valve-3/replies"
            && d["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("names device `valve-2`")),
        "{dead:?}"
    );
    assert!(agent.is_running());
}
