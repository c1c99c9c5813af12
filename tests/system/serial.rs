//! System tests of the serial source (issue 6): the real `edgestream` binary reads simulated
//! devices on real pseudo-terminals (by their by-id style links) and forwards to a real
//! mosquitto cloud broker.
//!
//! What a pty lets us assert, and what not: bytes the device writes while the agent has the
//! port open are all read, so every reading written then must arrive; bytes written to a pty
//! nobody has open yet, or still in the kernel's buffer when the device unplugs (the master
//! closes), are gone, as with real USB. So the tests assert (1) everything the agent counted as
//! read (`readings_in_serial`) reaches the cloud, (2) nothing arrives that the device did not
//! write, and (3) losses happen only at the edges of a connection (each plugged period arrives
//! as one gap-free run).
//!
//! The tests run one at a time: a closed pty's number is reused by the next pty opened, and the
//! simulator's link keeps pointing at the old number while unplugged (udev would remove it), so
//! another test's device could appear behind it.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::procstat::cpu_seconds;
use edgestream_sim::{
    CloudCollector, LineFormat, MetricSpec, Mosquitto, Profile, SerialDevice, SerialDeviceConfig,
    Signal,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn device(name: &str, format: LineFormat, rate_hz: f64, temperature: f64) -> SerialDeviceConfig {
    let mut c = SerialDeviceConfig::new(
        name,
        vec![
            MetricSpec::new(
                "temperature",
                Signal::new(Profile::Constant(temperature), 0.0, 1),
            ),
            MetricSpec::new("humidity", Signal::new(Profile::Constant(40.0), 0.0, 2)),
        ],
        rate_hz,
    );
    c.format = format;
    c
}

/// A `[[serial]]` table for `dev`.
fn port_toml(dev: &SerialDevice, framing: &str, extra: &str) -> String {
    format!(
        "\n[[serial]]\npath = \"{}\"\nframing = \"{framing}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n{extra}\n",
        dev.path().display()
    )
}

/// Distinct (device, metric, ts) of the readings at the cloud, with their values.
fn cloud_set(c: &CloudCollector, device: &str) -> Vec<(String, u64, f64)> {
    let mut seen = HashSet::new();
    cloud_readings(&c.telemetry_readings())
        .into_iter()
        .filter(|r| r.0 == device && seen.insert((r.1.clone(), r.3)))
        .map(|r| (r.1, r.3, r.2))
        .collect()
}

fn counter(c: &CloudCollector, name: &str) -> Option<u64> {
    c.payloads_on("health")
        .last()
        .and_then(|h| h["counters"][name].as_u64())
}

/// Waits until the last health message counts `readings_in_serial` equal to the distinct
/// serial readings at the cloud, and that count stopped moving. Returns it.
async fn settle(c: &CloudCollector, devices: &[&str], agent: &AgentProcess) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = u64::MAX;
    loop {
        let at_cloud: usize = devices.iter().map(|d| cloud_set(c, d).len()).sum();
        let read = counter(c, "readings_in_serial");
        if read == Some(at_cloud as u64) && last == at_cloud as u64 {
            return last;
        }
        last = at_cloud as u64;
        assert!(
            Instant::now() < deadline,
            "agent read {read:?} serial readings, {at_cloud} at the cloud\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// Every delivered reading was written, with the same value; returns the written indices
/// (sample numbers) that arrived.
fn delivered_indices(dev: &SerialDevice, got: &[(String, u64, f64)]) -> BTreeSet<u32> {
    let written = dev.written();
    got.iter()
        .map(|(metric, ts, value)| {
            let w = written
                .iter()
                .find(|w| &w.metric == metric && w.ts as u64 == *ts)
                .unwrap_or_else(|| panic!("{metric}@{ts} arrived but was never written"));
            assert_eq!(w.value, *value, "{metric}@{ts}");
            w.seq
        })
        .collect()
}

/// Runs of consecutive sample numbers.
fn runs(seqs: &BTreeSet<u32>) -> usize {
    let mut n = 0;
    let mut prev: Option<u32> = None;
    for &s in seqs {
        if prev.is_none_or(|p| s != p + 1) {
            n += 1;
        }
        prev = Some(s);
    }
    n
}

async fn start(
    gateway: &str,
    dir: &std::path::Path,
    ports: &str,
    rules: &str,
) -> (Mosquitto, Mosquitto, CloudCollector, AgentProcess) {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", gateway)
        .await
        .expect("collector");
    let cfg = config_toml(
        gateway,
        &dir.join("data"),
        local.port(),
        cloud.port(),
        rules,
        ports,
    );
    let agent = AgentProcess::start(dir, &cfg);
    (local, cloud, collector, agent)
}

async fn wait_opens(agent: &mut AgentProcess, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.logs().matches("serial port open").count() < n {
        assert!(
            Instant::now() < deadline && agent.is_running(),
            "agent opened {} of {n} ports\n{}",
            agent.logs().matches("serial port open").count(),
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_text_devices_reach_the_cloud_and_raise_an_alert() {
    let _one = ONE_AT_A_TIME.lock().await;
    // boiler-7 (binary frames) is at 90 degrees with 1 s of signal time per sample: the
    // overheat rule (> 80 for 30 s) fires after 31 samples.
    let mut boiler = device("boiler-7", LineFormat::Binary, 20.0, 90.0);
    boiler.ts_step = Duration::from_secs(1);
    let boiler = SerialDevice::spawn(boiler).expect("boiler");
    let json = SerialDevice::spawn(device("probe-j", LineFormat::Json, 20.0, 21.0)).unwrap();
    let kv = SerialDevice::spawn(device("probe-k", LineFormat::KeyValue, 20.0, 22.0)).unwrap();
    let csv = SerialDevice::spawn(device("probe-c", LineFormat::Csv, 20.0, 23.0)).unwrap();
    let columns: Vec<String> = csv.csv_columns().iter().map(|c| format!("{c:?}")).collect();
    let ports = [
        port_toml(&boiler, "binary", ""),
        port_toml(&json, "json", "device = \"probe-j\""),
        port_toml(&kv, "key-value", "device = \"probe-k\""),
        port_toml(
            &csv,
            "csv",
            &format!("device = \"probe-c\"\ncolumns = [{}]", columns.join(", ")),
        ),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let (_local, _cloud, collector, mut agent) =
        start("gw-serial", dir.path(), &ports, OVERHEAT_RULES).await;
    wait_opens(&mut agent, 4).await;

    let names = ["boiler-7", "probe-j", "probe-k", "probe-c"];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names.iter().all(|d| cloud_set(&collector, d).len() >= 60) {
        assert!(
            Instant::now() < deadline,
            "not every device reached the cloud: {:?}\n{}",
            names.map(|d| cloud_set(&collector, d).len()),
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (dev, name, temperature) in [
        (&boiler, "boiler-7", 90.0),
        (&json, "probe-j", 21.0),
        (&kv, "probe-k", 22.0),
        (&csv, "probe-c", 23.0),
    ] {
        let got = cloud_set(&collector, name);
        let seqs = delivered_indices(dev, &got);
        assert_eq!(runs(&seqs), 1, "{name}: a gap while connected: {seqs:?}");
        assert!(got
            .iter()
            .any(|(m, _, v)| m == "temperature" && *v == temperature));
        assert!(got.iter().any(|(m, _, v)| m == "humidity" && *v == 40.0));
    }
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/alerts")
                    && m.payload["device"] == "boiler-7"
                    && m.payload["state"] == "raised"),
                Duration::from_secs(20)
            )
            .await,
        "no overheat alert from the serial boiler\n{}",
        agent.logs()
    );
    assert!(
        collector.alerts().iter().all(|a| a["device"] == "boiler-7"),
        "{:?}",
        collector.alerts()
    );
    let status = agent.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "agent exited with {status}\n{}",
        agent.logs()
    );
    assert_eq!(agent.logs().matches("serial source stopped").count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_unplugs_reconnect_idle_and_lose_nothing_the_agent_read() {
    let _one = ONE_AT_A_TIME.lock().await;
    // The device is plugged in after the agent started: the simulator's pty master is opened
    // without O_CLOEXEC, so an agent spawned after it would inherit the master, and closing
    // it in the test process would then not hang up the port. The agent reads our own link,
    // which does not exist yet (a port missing at boot).
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("usb-probe-u");
    let ports = format!(
        "\n[[serial]]\npath = \"{}\"\nframing = \"key-value\"\ndevice = \"probe-u\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n",
        link.display()
    );
    let (_local, _cloud, collector, mut agent) = start("gw-unplug", dir.path(), &ports, "").await;
    agent
        .wait_log("cannot open serial port", Duration::from_secs(20))
        .await;
    let dev = SerialDevice::spawn(device("probe-u", LineFormat::KeyValue, 50.0, 21.0)).unwrap();
    std::os::unix::fs::symlink(dev.path(), &link).unwrap();
    wait_opens(&mut agent, 1).await;
    let mut cpu_share = Vec::new();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        dev.unplug().unwrap();
        if i == 4 {
            // A long outage: the backoff reaches its cap and the agent must sit idle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (t0, c0) = (Instant::now(), cpu_seconds(agent.pid()));
            tokio::time::sleep(Duration::from_secs(4)).await;
            let used = cpu_seconds(agent.pid()) - c0;
            cpu_share.push(used / t0.elapsed().as_secs_f64());
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        dev.replug().unwrap();
        wait_opens(&mut agent, i + 2).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    dev.unplug().unwrap();
    let read = settle(&collector, &["probe-u"], &agent).await;

    let logs = agent.logs();
    assert_eq!(logs.matches("serial port open").count(), 11, "{logs}");
    assert_eq!(
        logs.matches("serial port lost").count(),
        11,
        "one line per unplug, not per retry\n{logs}"
    );
    assert_eq!(
        logs.matches("cannot open serial port").count(),
        1,
        "only the outage at start is logged as such; retries log at debug\n{logs}"
    );
    assert!(
        cpu_share[0] < 0.05,
        "agent used {:.1}% CPU while the port was unplugged",
        cpu_share[0] * 100.0
    );
    let got = cloud_set(&collector, "probe-u");
    assert_eq!(
        got.len() as u64,
        read,
        "every reading the agent read arrived"
    );
    let seqs = delivered_indices(&dev, &got);
    let written: BTreeSet<u32> = dev.written().iter().map(|w| w.seq).collect();
    // 11 plugged periods; a period's run can only lose samples at its ends.
    assert!(
        runs(&seqs) <= 11,
        "gaps inside a connection: {} runs",
        runs(&seqs)
    );
    eprintln!(
        "unplug: {} samples written while plugged, {} read and delivered, {} lost at connection edges; {:.2}% CPU while unplugged",
        written.len(),
        seqs.len(),
        written.len() - seqs.len(),
        cpu_share[0] * 100.0
    );
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exited with {status}\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_and_sampled_and_good_frames_around_it_arrive() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut kv = device("probe-g", LineFormat::KeyValue, 50.0, 21.0);
    kv.max_samples = Some(400);
    let mut bin = device("boiler-g", LineFormat::Binary, 50.0, 70.0);
    bin.max_samples = Some(400);
    let kv = SerialDevice::spawn(kv).unwrap();
    let bin = SerialDevice::spawn(bin).unwrap();
    let ports = [
        port_toml(&kv, "key-value", "device = \"probe-g\""),
        port_toml(&bin, "binary", ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let (_local, _cloud, collector, mut agent) = start("gw-garbage", dir.path(), &ports, "").await;
    wait_opens(&mut agent, 2).await;
    // The agent opened the ports mid-stream, so a first partial line or frame may have been
    // rejected (correctly): count from a baseline taken once it has read for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = loop {
        if let Some(n) = counter(&collector, "rejected_serial") {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(before <= 2, "{before} rejections before any garbage");
    // Injected between whole lines/frames, while the agent has both ports open.
    let mut injected = 0;
    let mut overlong_line = b"overlong=".to_vec();
    overlong_line.resize(600, b'9');
    overlong_line.push(b'\n');
    let mut overlong_frame = vec![0x55; 2000];
    overlong_frame.push(0);
    for _ in 0..5 {
        kv.inject_garbage(40).unwrap();
        kv.write_raw(&overlong_line).unwrap();
        bin.inject_garbage(40).unwrap();
        bin.inject_corrupt_frame().unwrap();
        bin.write_raw(&overlong_frame).unwrap();
        injected += 5;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(kv.is_finished() && bin.is_finished()) {
        assert!(Instant::now() < deadline, "devices did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read = settle(&collector, &["probe-g", "boiler-g"], &agent).await;
    assert_eq!(
        counter(&collector, "rejected_serial"),
        Some(before + injected),
        "every garbage unit counted once\n{}",
        agent.logs()
    );
    let mut delivered = 0;
    for (dev, name) in [(&kv, "probe-g"), (&bin, "boiler-g")] {
        let got = cloud_set(&collector, name);
        delivered += got.len() as u64;
        let seqs = delivered_indices(dev, &got);
        // Everything from the first sample the agent read to the device's last one arrived:
        // garbage cost no good line or frame.
        let first = *seqs.first().expect("some readings");
        let written: BTreeSet<u32> = dev.written().iter().map(|w| w.seq).collect();
        let expected: BTreeSet<u32> = written.range(first..).copied().collect();
        assert_eq!(seqs, expected, "{name}: good samples lost around garbage");
        assert!(
            seqs.len() >= 100,
            "{name}: only {} samples read",
            seqs.len()
        );
    }
    assert_eq!(delivered, read);
    let letters = collector.payloads_on("deadletter");
    for (path, unit) in [(kv.path(), "line"), (bin.path(), "frame")] {
        let prefix = format!("{} {unit} ", path.display());
        assert!(
            letters.iter().any(|l| l["source"] == "serial"
                && l["where"].as_str().is_some_and(|w| w.starts_with(&prefix))
                && l["reason"].as_str().is_some_and(|r| !r.is_empty())),
            "no dead letter sampled for {prefix}: {letters:?}"
        );
    }
    assert!(letters
        .iter()
        .any(|l| l["reason"].as_str().unwrap_or("").contains("bad CRC")));
    let status = agent.terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "agent exited with {status}\n{}",
        agent.logs()
    );
}
