//! System tests of the Modbus sources: the real `edgestream` binary polls simulated slaves
//! ([`ModbusTcpSlave`], a real TCP server on 127.0.0.1; [`ModbusRtuSlave`], a bus on a real
//! pseudo-terminal) and forwards to a real mosquitto cloud
//! broker. The register layouts are written by the simulator's own encoder
//! (`edgestream_sim::registers_of`), not the agent's decoder.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::{
    registers_of, CloudCollector, ModbusFault, ModbusRtuSlave, ModbusTable, ModbusTcpSlave,
    Mosquitto,
};

struct Site {
    _local: Mosquitto,
    _cloud: Mosquitto,
    collector: CloudCollector,
    _dir: tempfile::TempDir,
    agent: AgentProcess,
}

async fn start_agent(gateway: &str, modbus_toml: &str) -> Site {
    start_agent_with_rules(gateway, "", modbus_toml).await
}

async fn start_agent_with_rules(gateway: &str, rules: &str, modbus_toml: &str) -> Site {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", gateway)
        .await
        .expect("collector");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_toml(
        gateway,
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        rules,
        modbus_toml,
    );
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    Site {
        _local: local,
        _cloud: cloud,
        collector,
        _dir: dir,
        agent,
    }
}

/// The latest value at the cloud of each metric of `device`.
fn latest(c: &CloudCollector, device: &str) -> HashMap<String, f64> {
    cloud_readings(&c.telemetry_readings())
        .into_iter()
        .filter(|r| r.0 == device)
        .map(|r| (r.1, r.2))
        .collect()
}

fn counter(c: &CloudCollector, name: &str) -> u64 {
    c.payloads_on("health")
        .last()
        .and_then(|h| h["counters"][name].as_u64())
        .unwrap_or(0)
}

async fn wait_until(what: &str, agent: &AgentProcess, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}\n{}", agent.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One entry of the register map: its TOML, and the value the cloud must see.
struct Entry {
    toml: String,
    metric: String,
    want: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_in_every_byte_and_word_order_reaches_the_cloud_with_scale_and_offset() {
    let slave = ModbusTcpSlave::start(&[7]).await.expect("slave");
    let mut entries = Vec::new();
    // (type, its bytes most significant first, the value they hold)
    let values: [(&str, Vec<u8>, f64); 8] = [
        ("u16", 0xfedcu16.to_be_bytes().to_vec(), 65_244.0),
        ("i16", (-300i16).to_be_bytes().to_vec(), -300.0),
        (
            "u32",
            4_000_000_001u32.to_be_bytes().to_vec(),
            4_000_000_001.0,
        ),
        (
            "i32",
            (-2_000_000_001i32).to_be_bytes().to_vec(),
            -2_000_000_001.0,
        ),
        ("f32", 230.5f32.to_be_bytes().to_vec(), 230.5),
        (
            "u64",
            0x0012_3456_789a_bcdeu64.to_be_bytes().to_vec(),
            0x0012_3456_789a_bcdeu64 as f64,
        ),
        (
            "i64",
            (-1_234_567_890_123i64).to_be_bytes().to_vec(),
            -1_234_567_890_123.0,
        ),
        (
            "f64",
            (-12_345.678_9f64).to_be_bytes().to_vec(),
            -12_345.678_9,
        ),
    ];
    let mut address = 0u16;
    for (t, bytes, want) in &values {
        for (byte, word) in [
            ("big", "big"),
            ("big", "little"),
            ("little", "big"),
            ("little", "little"),
        ] {
            let regs = registers_of(bytes, byte == "little", word == "little");
            // One unused register between values (read over with `max_gap = 1`).
            slave.set_registers(7, ModbusTable::Holding, address, &regs);
            let metric = format!("{t}_{byte}_{word}");
            entries.push(Entry {
                toml: format!("function = \"holding\"\naddress = {address}\ntype = \"{t}\"\nbyte_order = \"{byte}\"\nword_order = \"{word}\""),
                metric,
                want: *want,
            });
            address += regs.len() as u16 + 1;
        }
    }
    // Bits of a register, coils, discrete inputs, and scale and offset.
    slave.set_registers(7, ModbusTable::Holding, 300, &[0b1000_0000_0000_1000]);
    slave.set_bits(7, ModbusTable::Coil, 5, &[true, false]);
    slave.set_bits(7, ModbusTable::DiscreteInput, 9, &[true]);
    slave.set_registers(7, ModbusTable::Input, 400, &[650, (-5i16) as u16]);
    slave.set_registers(
        7,
        ModbusTable::Holding,
        410,
        &registers_of(&1500.25f32.to_be_bytes(), false, true),
    );
    for (metric, toml, want) in [
        ("bit3", "function = \"holding\"\naddress = 300\ntype = \"bit\"\nbit = 3", 1.0),
        ("bit4", "function = \"holding\"\naddress = 300\ntype = \"bit\"\nbit = 4", 0.0),
        ("bit15", "function = \"holding\"\naddress = 300\ntype = \"bit\"\nbit = 15", 1.0),
        ("coil5", "function = \"coil\"\naddress = 5", 1.0),
        ("coil6", "function = \"coil\"\naddress = 6", 0.0),
        ("discrete9", "function = \"discrete-input\"\naddress = 9", 1.0),
        ("celsius", "function = \"input\"\naddress = 400\ntype = \"i16\"\nscale = 0.1\noffset = -40.0", 25.0),
        ("celsius_low", "function = \"input\"\naddress = 401\ntype = \"i16\"\nscale = 0.1\noffset = -40.0", -40.5),
        ("kwh", "function = \"holding\"\naddress = 410\ntype = \"f32\"\nword_order = \"little\"\nscale = 1000.0\noffset = 1.0", 1_500_251.0),
    ] {
        entries.push(Entry {
            toml: toml.into(),
            metric: metric.into(),
            want,
        });
    }
    let mut modbus = format!(
        "\n[[modbus]]\ntransport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\ntimeout_ms = 1000\nmax_gap = 1\n\n[[modbus.slaves]]\nunit = 7\ndevice = \"meter-7\"\n",
        slave.port()
    );
    for e in &entries {
        modbus.push_str(&format!(
            "\n[[modbus.slaves.registers]]\nmetric = \"{}\"\ninterval_ms = 250\n{}\n",
            e.metric, e.toml
        ));
    }
    let site = start_agent("gw-modbus-types", &modbus).await;
    wait_until("every metric reaches the cloud", &site.agent, || {
        latest(&site.collector, "meter-7").len() == entries.len()
    })
    .await;
    let got = latest(&site.collector, "meter-7");
    let mut wrong = Vec::new();
    for e in &entries {
        let v = got[&e.metric];
        let ok = if e.want == 0.0 {
            v == 0.0
        } else {
            ((v - e.want) / e.want).abs() < 1e-12
        };
        if !ok {
            wrong.push(format!("{}: got {v}, want {}", e.metric, e.want));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Values one register apart were read together: the 32 of the matrix in one request, so
    // 6 requests carry the 41 values of a poll.
    wait_until("health counts the polls", &site.agent, || {
        counter(&site.collector, "modbus_polls") > 0
    })
    .await;
    let polls = counter(&site.collector, "modbus_polls");
    let read = counter(&site.collector, "readings_in_modbus");
    assert!(
        polls > 0 && read >= 3 * polls,
        "{read} readings in {polls} reads"
    );
    assert_eq!(counter(&site.collector, "modbus_errors_timeout"), 0);
}

/// A bus with four units behind one TCP endpoint (a Modbus gateway): one healthy, one that
/// answers with an exception, one that falls silent, one that answers short and then with
/// garbage. Each fault is counted with its reason and sampled on the dead-letter topic naming
/// its unit; the silent one is reported missing and a `missing()` rule raises its alert, and
/// the healthy one keeps its schedule. Then the whole bus is unplugged and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_counted_by_reason_and_the_healthy_slave_keeps_its_schedule() {
    let mut slave = ModbusTcpSlave::start(&[1, 2, 3, 4]).await.expect("slave");
    for unit in 1..=4u8 {
        slave.set_registers(unit, ModbusTable::Holding, 0, &[u16::from(unit) * 10]);
    }
    slave.set_fault(2, Some(ModbusFault::Exception(0x02)));
    slave.set_fault(4, Some(ModbusFault::Short));
    let mut modbus = format!(
        "\n[[modbus]]\ntransport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\ntimeout_ms = 400\nretries = 1\nmissing_after = 3\nreconnect_min_ms = 50\nreconnect_max_ms = 1000\n",
        slave.port()
    );
    for unit in 1..=4 {
        modbus.push_str(&format!(
            "\n[[modbus.slaves]]\nunit = {unit}\ndevice = \"unit-{unit}\"\n[[modbus.slaves.registers]]\nmetric = \"power\"\nfunction = \"holding\"\naddress = 0\ninterval_ms = 200\n"
        ));
    }
    let rules = "rule slave_silent\n  on device \"unit-*\"\n  when missing(power, 2s)\n  alert warning \"modbus slave silent\"\n";
    let mut site = start_agent_with_rules("gw-modbus-faults", rules, &modbus).await;
    let c = &site.collector;
    // Unit 3 answers first, then falls silent.
    wait_until("unit 3 answers", &site.agent, || {
        latest(c, "unit-3").get("power") == Some(&30.0)
    })
    .await;
    slave.set_fault(3, Some(ModbusFault::Silence));
    wait_until(
        "exception, timeout and short answers counted",
        &site.agent,
        || {
            counter(c, "modbus_errors_exception") >= 3
                && counter(c, "modbus_errors_timeout") >= 3
                && counter(c, "modbus_errors_short") >= 3
                && counter(c, "modbus_slaves_missing") >= 1
        },
    )
    .await;
    slave.set_fault(4, Some(ModbusFault::Garbage));
    wait_until("garbage counted", &site.agent, || {
        counter(c, "modbus_errors_garbage") >= 1
    })
    .await;
    // The healthy unit, measured over 4 s once the silent one is known to be missing. Were
    // the silent unit's timeouts (2 x 400 ms a poll) still in the way, it would be polled at
    // about 1 Hz, not 5.
    let before = slave.request_times(1).len();
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let polled = slave.request_times(1).len() - before;
    assert!(
        polled >= 14,
        "unit 1 (200 ms) was polled {polled} times in {window:?}\n{}",
        site.agent.logs()
    );
    assert!(latest(c, "unit-1").get("power") == Some(&10.0));
    for unit in [2, 4] {
        assert!(
            latest(c, &format!("unit-{unit}")).is_empty(),
            "unit {unit} gave readings"
        );
    }
    // Each fault sampled with its unit and reason.
    let dead = c.payloads_on("deadletter");
    for (unit, reason) in [
        (
            2,
            "exception: slave answered exception 0x02 (illegal data address)",
        ),
        (3, "timeout:"),
        (4, "short:"),
        (4, "garbage:"),
    ] {
        assert!(
            dead.iter().any(|d| d["source"] == "modbus"
                && d["where"]
                    .as_str()
                    .is_some_and(|w| w.contains(&format!(" unit {unit} holding 0+1")))
                && d["reason"].as_str().is_some_and(|r| r.starts_with(reason))),
            "no dead letter for unit {unit} {reason:?}: {dead:?}"
        );
    }
    assert!(site.agent.logs().contains("modbus slave not answering"));
    // Its readings stopped: a rule sees that with `missing()`.
    wait_until("the missing() rule raises its alert", &site.agent, || {
        c.alerts().iter().any(|a| {
            a["rule"] == "slave_silent" && a["device"] == "unit-3" && a["state"] == "raised"
        })
    })
    .await;
    assert!(
        c.alerts().iter().all(|a| a["device"] == "unit-3"),
        "only the silent unit: {:?}",
        c.alerts()
    );
    // Per slave and reason in the health message.
    let health = c.payloads_on("health").last().cloned().expect("health");
    let entry = |unit: u64| {
        health["modbus_slaves"]["slaves"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["unit"] == unit).cloned())
            .unwrap_or_else(|| panic!("unit {unit} not in {health}"))
    };
    assert!(entry(1)["polls"].as_u64() > Some(10), "{health}");
    assert_eq!(entry(1)["errors"], serde_json::json!({}), "{health}");
    assert!(
        entry(2)["errors"]["exception"].as_u64() > Some(0),
        "{health}"
    );
    assert!(entry(3)["errors"]["timeout"].as_u64() > Some(0), "{health}");
    assert_eq!(entry(3)["missing"], true, "{health}");
    assert_eq!(
        entry(2)["missing"],
        false,
        "an exception is an answer: {health}"
    );
    assert!(entry(4)["errors"]["short"].as_u64() > Some(0), "{health}");
    assert_eq!(entry(4)["device"], "unit-4");

    // Unplug the bus: counted as a lost connection and failed reconnects; back after replug.
    slave.unplug();
    wait_until("the lost connection is counted", &site.agent, || {
        counter(c, "modbus_disconnects") >= 1 && counter(c, "modbus_connect_failures") >= 1
    })
    .await;
    slave.set_registers(1, ModbusTable::Holding, 0, &[11]);
    slave.replug().await.expect("replug");
    wait_until("readings resume after the replug", &site.agent, || {
        latest(c, "unit-1").get("power") == Some(&11.0)
    })
    .await;
    // The silent and the garbled unit answer again: neither is missing any more.
    slave.set_fault(3, None);
    slave.set_fault(4, None);
    wait_until("the silent units are back", &site.agent, || {
        latest(c, "unit-3").get("power") == Some(&30.0)
            && latest(c, "unit-4").get("power") == Some(&40.0)
            && counter(c, "modbus_slaves_missing") == 0
    })
    .await;
    let status = site.agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", site.agent.logs());
}

/// Pseudo-terminal numbers are reused as soon as one closes, and an unplugged simulated bus's
/// link keeps pointing at its old number: RTU tests run one at a time.
static ONE_PTY_TEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Modbus RTU over a real pseudo-terminal at 9,600 baud 8E1: an energy meter's word-swapped
/// f32 and another slave's i32 arrive; every request is sent after at least 3.5 characters
/// (4.01 ms) of silence on the bus, which tokio-modbus alone does not keep; a slave whose
/// answers have a wrong CRC is counted as `crc` (not as a timeout) and dead-lettered; and an
/// unplugged adapter is counted, reopened by its path, and polled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_keeps_the_inter_frame_silence_counts_crc_errors_and_survives_an_unplug() {
    let _one = ONE_PTY_TEST_AT_A_TIME.lock().await;
    let bus = ModbusRtuSlave::start(&[1, 2, 3]).expect("rtu bus");
    bus.set_registers(
        1,
        ModbusTable::Input,
        0,
        &registers_of(&231.7f32.to_be_bytes(), false, true),
    );
    bus.set_registers(
        3,
        ModbusTable::Holding,
        10,
        &registers_of(&(-70_000i32).to_be_bytes(), false, false),
    );
    bus.set_registers(2, ModbusTable::Holding, 0, &[5]);
    bus.set_fault(2, Some(ModbusFault::BadCrc));
    let modbus = format!(
        r#"
[[modbus]]
transport = "rtu"
path = "{}"
baud_rate = 9600
parity = "even"
timeout_ms = 200
retries = 0
missing_after = 3
reconnect_min_ms = 50
reconnect_max_ms = 1000

[[modbus.slaves]]
unit = 1
device = "meter-1"
[[modbus.slaves.registers]]
metric = "voltage"
function = "input"
address = 0
type = "f32"
word_order = "little"
interval_ms = 100

[[modbus.slaves]]
unit = 2
device = "noisy-2"
[[modbus.slaves.registers]]
metric = "x"
function = "holding"
address = 0
interval_ms = 100

[[modbus.slaves]]
unit = 3
device = "drive-3"
[[modbus.slaves.registers]]
metric = "speed"
function = "holding"
address = 10
type = "i32"
interval_ms = 100
"#,
        bus.path().display()
    );
    let site = start_agent("gw-modbus-rtu", &modbus).await;
    let c = &site.collector;
    wait_until(
        "both good slaves' values and the CRC errors",
        &site.agent,
        || {
            let (m, d) = (latest(c, "meter-1"), latest(c, "drive-3"));
            m.get("voltage") == Some(&f64::from(231.7f32))
                && d.get("speed") == Some(&-70_000.0)
                && counter(c, "modbus_errors_crc") >= 3
        },
    )
    .await;
    assert_eq!(
        counter(c, "modbus_errors_timeout"),
        0,
        "a CRC error is not a timeout"
    );
    assert!(latest(c, "noisy-2").is_empty());
    let dead = c.payloads_on("deadletter");
    assert!(
        dead.iter().any(|d| d["where"]
            .as_str()
            .is_some_and(|w| w.starts_with("rtu ") && w.contains(" unit 2 holding 0+1"))
            && d["reason"].as_str().is_some_and(|r| r.starts_with("crc:"))),
        "{dead:?}"
    );
    // The silence before every request, as the bus saw it.
    wait_until("frames on the bus", &site.agent, || bus.gaps().len() >= 40).await;
    let gaps = bus.gaps();
    let silence = Duration::from_nanos(4_010_415); // 3.5 x 11 bits at 9600 baud
    let shortest = gaps.iter().min().copied().unwrap_or_default();
    assert!(
        shortest >= silence,
        "a request came {shortest:?} after the frame before it (at least {silence:?} required)"
    );
    assert_eq!(bus.bad_requests(), 0, "every request arrived whole");

    // Unplug the adapter: the port fails, is counted, and is reopened by its path.
    bus.unplug();
    wait_until("the lost port is counted", &site.agent, || {
        counter(c, "modbus_disconnects") >= 1
    })
    .await;
    bus.set_registers(
        3,
        ModbusTable::Holding,
        10,
        &registers_of(&(-70_001i32).to_be_bytes(), false, false),
    );
    bus.replug().expect("replug");
    wait_until("polled again after the replug", &site.agent, || {
        latest(c, "drive-3").get("speed") == Some(&-70_001.0)
    })
    .await;
}

/// (state, detail) of every outcome for `id` at the cloud, in arrival order.
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

fn command(id: &str, device: &str, name: &str, args: serde_json::Value) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    serde_json::json!({"v": 1, "id": id, "device": device, "name": name, "args": args,
                       "issued_at": now, "expires_at": now + 60_000})
}

/// Device commands to a Modbus slave: a setpoint (f32, word-swapped, scaled) and a coil are
/// written end to end with `succeeded` and read back by the next poll; the slave's exception
/// is the command's `failed` outcome; a command outside the allow-list's range, one not
/// allowed at all, and one whose value does not fit the register never reach the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_command_reaches_the_slave_and_a_refused_one_never_reaches_the_bus() {
    let slave = ModbusTcpSlave::start(&[1]).await.expect("slave");
    let modbus = format!(
        r#"
[commands]
reply_timeout_ms = 5000

[[commands.allow]]
name = "set_setpoint"
devices = ["boiler-*"]
args.value = {{ type = "number", min = 20, max = 90, required = true }}

[[commands.allow]]
name = "set_burner"
devices = ["boiler-*"]
args.enabled = {{ type = "bool", required = true }}

[[commands.allow]]
name = "set_code"
devices = ["boiler-*"]
args.value = {{ type = "integer", required = true }}

[[modbus]]
transport = "tcp"
host = "127.0.0.1"
port = {}
timeout_ms = 500

[[modbus.slaves]]
unit = 1
device = "boiler-1"

[[modbus.slaves.registers]]
metric = "setpoint"
function = "holding"
address = 100
type = "f32"
word_order = "little"
scale = 0.5
interval_ms = 200

[[modbus.slaves.registers]]
metric = "burner"
function = "coil"
address = 5
interval_ms = 200

[[modbus.slaves.registers]]
metric = "code"
function = "holding"
address = 110
type = "u16"
interval_ms = 200

[[modbus.slaves.writes]]
command = "set_setpoint"
metric = "setpoint"

[[modbus.slaves.writes]]
command = "set_burner"
arg = "enabled"
metric = "burner"

[[modbus.slaves.writes]]
command = "set_code"
metric = "code"
"#,
        slave.port()
    );
    let site = start_agent("gw-modbus-writes", &modbus).await;
    let c = &site.collector;
    wait_online(c).await;
    wait_until("first poll", &site.agent, || {
        latest(c, "boiler-1").get("setpoint") == Some(&0.0)
    })
    .await;

    for cmd in [
        command(
            "w-1",
            "boiler-1",
            "set_setpoint",
            serde_json::json!({"value": 72.5}),
        ),
        command(
            "w-2",
            "boiler-1",
            "set_burner",
            serde_json::json!({"enabled": true}),
        ),
        // Refused by the allow-list (range, unknown name) and by the register's range.
        command(
            "w-3",
            "boiler-1",
            "set_setpoint",
            serde_json::json!({"value": 150}),
        ),
        command("w-4", "boiler-1", "reboot", serde_json::json!({})),
        command(
            "w-5",
            "boiler-1",
            "set_code",
            serde_json::json!({"value": 70000}),
        ),
    ] {
        c.publish("commands", &cmd, false)
            .await
            .expect("publish command");
    }
    let finished = |id: &str| {
        outcomes(c, id)
            .iter()
            .any(|(s, _)| matches!(s.as_str(), "succeeded" | "failed" | "rejected"))
    };
    wait_until("every command finished", &site.agent, || {
        ["w-1", "w-2", "w-3", "w-4", "w-5"]
            .iter()
            .all(|id| finished(id))
    })
    .await;
    let last = |id: &str| outcomes(c, id).last().cloned().unwrap_or_default();
    assert_eq!(last("w-1").0, "succeeded", "{:?}", outcomes(c, "w-1"));
    assert_eq!(last("w-2").0, "succeeded", "{:?}", outcomes(c, "w-2"));
    assert_eq!(last("w-3").0, "rejected", "{:?}", outcomes(c, "w-3"));
    assert_eq!(last("w-4").0, "rejected", "{:?}", outcomes(c, "w-4"));
    assert_eq!(last("w-5").0, "failed", "{:?}", outcomes(c, "w-5"));
    assert!(last("w-5").1.contains("outside"), "{:?}", last("w-5"));
    // Exactly the two good writes reached the slave: 72.5 / 0.5 = 145.0 as a word-swapped
    // f32 in registers 100-101 (function 16), and coil 5 on (function 5).
    assert_eq!(
        slave.writes(1),
        vec![
            (16, 100, registers_of(&145.0f32.to_be_bytes(), false, true)),
            (5, 5, vec![1]),
        ]
    );
    wait_until("the written values read back", &site.agent, || {
        let b = latest(c, "boiler-1");
        b.get("setpoint") == Some(&72.5) && b.get("burner") == Some(&1.0)
    })
    .await;

    // The slave refuses: its exception is the outcome.
    slave.set_fault(1, Some(ModbusFault::Exception(0x04)));
    let cmd = command(
        "w-6",
        "boiler-1",
        "set_setpoint",
        serde_json::json!({"value": 30}),
    );
    c.publish("commands", &cmd, false)
        .await
        .expect("publish command");
    wait_until("the exception is the outcome", &site.agent, || {
        finished("w-6")
    })
    .await;
    let (state, detail) = last("w-6");
    assert_eq!(state, "failed");
    assert!(detail.contains("exception 0x04"), "{detail}");
    assert_eq!(slave.writes(1).len(), 2, "a refused write changes nothing");
}
