//! Serial devices on real pseudo-terminals, read the way the agent reads
//! them: by opening the by-id path with serialport.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use edgestream_sim::{LineFormat, MetricSpec, SerialDevice, SerialDeviceConfig, Signal};

fn open(path: &std::path::Path) -> serialport::TTYPort {
    serialport::new(path.to_string_lossy(), 115_200)
        .timeout(Duration::from_millis(200))
        .open_native()
        .expect("open the device path")
}

fn config(format: LineFormat) -> SerialDeviceConfig {
    let mut c = SerialDeviceConfig::new(
        "probe-1",
        vec![
            MetricSpec::new("temperature", Signal::temperature(21.0, 1)),
            MetricSpec::new("humidity", Signal::humidity(40.0, 2)),
        ],
        100.0,
    );
    c.format = format;
    c
}

/// Reads whole lines until `n` were read or `timeout` passed.
fn read_lines(port: &mut serialport::TTYPort, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut reader = BufReader::new(port);
    let mut lines = Vec::new();
    while lines.len() < n && Instant::now() < deadline {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => lines.push(line[..line.len() - 1].to_vec()),
            // A timeout mid-line: the bytes read so far are in `line`; keep
            // them by continuing to read into a fresh buffer is not needed
            // for these tests, which only count whole lines.
            Ok(_) | Err(_) => {}
        }
    }
    lines
}

#[test]
fn key_value_lines_are_readable_from_the_path() {
    let dev = SerialDevice::spawn(config(LineFormat::KeyValue)).expect("device");
    assert!(dev
        .path()
        .to_string_lossy()
        .contains("/by-id/usb-edgestream_sim_probe-1"));
    let mut port = open(dev.path());
    let lines = read_lines(&mut port, 20, Duration::from_secs(5));
    assert!(lines.len() >= 20, "read {} lines", lines.len());
    // Lines written before we opened may have been flushed by the pty; check
    // the last one fully and the shape of all.
    for l in &lines {
        let text = std::str::from_utf8(l).unwrap();
        assert!(text.starts_with("temperature="), "{text}");
        assert!(text.contains(" humidity=") && text.contains(" ts=") && text.contains(" seq="));
    }
    let last = std::str::from_utf8(lines.last().unwrap())
        .unwrap()
        .to_string();
    let seq: u32 = last.rsplit("seq=").next().unwrap().parse().unwrap();
    // The device records a line once its write returned, which can be just after we read it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let r = loop {
        let found = dev
            .written()
            .into_iter()
            .find(|r| r.seq == seq && r.metric == "temperature");
        match found {
            Some(r) => break r,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            None => panic!("the line with seq {seq} is not recorded as written"),
        }
    };
    assert!(
        last.starts_with(&format!("temperature={} ", r.value)),
        "{last} vs {r:?}"
    );
}

#[test]
fn json_and_csv_lines() {
    let dev = SerialDevice::spawn(config(LineFormat::Json)).expect("device");
    let mut port = open(dev.path());
    let lines = read_lines(&mut port, 3, Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_slice(lines.last().unwrap()).unwrap();
    assert!(v["temperature"].is_number() && v["humidity"].is_number() && v["ts"].is_i64());

    let dev = SerialDevice::spawn(config(LineFormat::Csv)).expect("device");
    assert_eq!(dev.csv_columns(), ["ts", "temperature", "humidity"]);
    let mut port = open(dev.path());
    let lines = read_lines(&mut port, 3, Duration::from_secs(5));
    let last = std::str::from_utf8(lines.last().unwrap()).unwrap();
    assert_eq!(last.split(',').count(), 3, "{last}");
}

#[test]
fn commands_get_json_replies() {
    let dev = SerialDevice::spawn(config(LineFormat::KeyValue)).expect("device");
    let mut port = open(dev.path());
    port.write_all(
        b"{\"v\":1,\"id\":\"c-9\",\"device\":\"probe-1\",\"name\":\"calibrate\",\"args\":{}}\n",
    )
    .unwrap();
    let lines = read_lines(&mut port, 400, Duration::from_secs(3));
    let reply = lines
        .iter()
        .find(|l| l.starts_with(b"{"))
        .expect("a reply line");
    let v: serde_json::Value = serde_json::from_slice(reply).unwrap();
    assert_eq!(v["id"], "c-9");
    assert_eq!(v["state"], "succeeded");
    assert_eq!(dev.commands().len(), 1);

    dev.set_command_behavior(edgestream_sim::CommandBehavior::SucceedAfter(
        Duration::from_millis(400),
    ));
    let asked = Instant::now();
    port.write_all(b"{\"v\":1,\"id\":\"c-10\",\"device\":\"probe-1\",\"name\":\"calibrate\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&mut port);
    loop {
        assert!(asked.elapsed() < Duration::from_secs(5), "no delayed reply");
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).is_ok() && line.starts_with(b"{") {
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["id"], "c-10");
            break;
        }
    }
    assert!(asked.elapsed() >= Duration::from_millis(400));
}

#[test]
fn garbage_and_overlong_lines_are_injected() {
    let mut c = config(LineFormat::KeyValue);
    c.overlong_every = Some((5, 1000));
    let dev = SerialDevice::spawn(c).expect("device");
    let mut port = open(dev.path());
    dev.inject_garbage(32).unwrap();
    let lines = read_lines(&mut port, 40, Duration::from_secs(5));
    assert!(lines.iter().any(|l| l.len() >= 1000), "no over-long line");
    assert!(dev.stats().overlong_injected >= 1);
    assert_eq!(dev.stats().garbage_injected, 1);
}

#[test]
fn unplug_fails_reads_and_replug_moves_the_link() {
    let dev = SerialDevice::spawn(config(LineFormat::KeyValue)).expect("device");
    let first_pty = dev.pty_path();
    assert_eq!(std::fs::read_link(dev.path()).unwrap(), first_pty);
    let mut port = open(dev.path());
    assert!(!read_lines(&mut port, 2, Duration::from_secs(5)).is_empty());

    dev.unplug().unwrap();
    // Drain what was buffered; then reads must fail or report EOF, never
    // time out forever as if the device were just quiet.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut saw_disconnect = false;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match port.read(&mut buf) {
            Ok(0) => {
                saw_disconnect = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                saw_disconnect = true;
                break;
            }
        }
    }
    assert!(saw_disconnect, "reader never saw the unplug");
    assert!(!dev.is_plugged());

    let second_pty = dev.replug().unwrap();
    assert_ne!(second_pty, first_pty);
    assert_eq!(std::fs::read_link(dev.path()).unwrap(), second_pty);
    let mut port = open(dev.path());
    assert!(read_lines(&mut port, 3, Duration::from_secs(5)).len() >= 3);
    assert_eq!(dev.stats().unplugs, 1);
}

mod binary {
    use super::*;
    use edgestream_protocol::frame::{
        encode_frame, DefaultFrameAccumulator, FeedResult, FrameError,
    };
    use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
    use edgestream_protocol::types::{Command, DeviceMessage, OutcomeState};

    /// Reads frames until `pred` has seen what it wants or `timeout` passes.
    fn read_frames(
        port: &mut serialport::TTYPort,
        timeout: Duration,
        mut want: impl FnMut(&Result<DeviceMessage, FrameError>) -> bool,
    ) -> bool {
        let mut acc = Box::new(DefaultFrameAccumulator::new());
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let n = match port.read(&mut buf) {
                Ok(n) => n,
                Err(_) => continue,
            };
            let mut input = &buf[..n];
            loop {
                let (got, rest) = match acc.feed(input) {
                    FeedResult::Consumed => break,
                    FeedResult::Frame { message, remaining } => (Ok(message), remaining),
                    FeedResult::Error { error, remaining } => (Err(error), remaining),
                };
                if want(&got) {
                    return true;
                }
                input = rest;
            }
        }
        false
    }

    #[test]
    fn binary_frames_carry_batches_and_answer_commands() {
        let dev = SerialDevice::spawn(config(LineFormat::Binary)).expect("device");
        let mut port = open(dev.path());
        let mut batches = 0;
        assert!(read_frames(&mut port, Duration::from_secs(5), |m| {
            if let Ok(DeviceMessage::Batch(b)) = m {
                assert_eq!(b.readings.len(), 2);
                assert_eq!(b.readings[0].metric.as_str(), "temperature");
                assert_eq!(b.readings[1].metric.as_str(), "humidity");
                assert!(b.readings[0].ts.is_some() && b.readings[0].seq.is_some());
                batches += 1;
            }
            batches >= 5
        }));

        let cmd = DeviceMessage::Command(Command {
            id: "c-7".try_into().unwrap(),
            device: "probe-1".try_into().unwrap(),
            name: "calibrate".try_into().unwrap(),
            args: Default::default(),
            issued_at: 1,
            expires_at: u64::MAX,
        });
        let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
        port.write_all(encode_frame(&cmd, &mut buf).unwrap())
            .unwrap();
        assert!(read_frames(
            &mut port,
            Duration::from_secs(5),
            |m| matches!(
                m,
                Ok(DeviceMessage::Outcome(o)) if o.id.as_str() == "c-7" && o.state == OutcomeState::Succeeded
            )
        ));
        assert_eq!(dev.commands()[0]["name"], "calibrate");

        dev.inject_corrupt_frame().unwrap();
        dev.inject_garbage(20).unwrap();
        let mut errors = 0;
        assert!(read_frames(&mut port, Duration::from_secs(5), |m| {
            if m.is_err() {
                errors += 1;
            }
            errors >= 2
        }));
    }
}
