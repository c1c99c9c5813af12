//! Golden byte vectors: the exact bytes of every message type, frame and JSON
//! shape. A change to the wire format must fail here first; if it is
//! intended, bump the version and update README.md with the tests.

mod common;

use common::s;
use edgestream_protocol::frame::{encode_frame, frame_crc, FeedResult, FrameAccumulator};
use edgestream_protocol::json;
use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
use edgestream_protocol::types::*;

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

fn reading() -> Reading {
    Reading {
        device: s("boiler-1"),
        metric: s("temperature"),
        value: 23.5,
        ts: Some(1_700_000_000_123),
        seq: Some(42),
        quality: None,
    }
}

fn batch() -> ReadingBatch {
    let mut readings = heapless::Vec::new();
    readings
        .push(Reading {
            device: s("b"),
            metric: s("t"),
            value: 1.5,
            ts: None,
            seq: None,
            quality: None,
        })
        .unwrap();
    readings
        .push(Reading {
            device: s("b"),
            metric: s("p"),
            value: -2.0,
            ts: None,
            seq: Some(7),
            quality: Some(100),
        })
        .unwrap();
    ReadingBatch { readings }
}

fn command() -> Command {
    let mut args = CommandArgs::default();
    args.insert("percent", ArgValue::Int(40)).unwrap();
    args.insert("fast", ArgValue::Bool(true)).unwrap();
    args.insert("mode", ArgValue::Str(s("eco"))).unwrap();
    args.insert("gain", ArgValue::Float(0.5)).unwrap();
    Command {
        id: s("c-123"),
        device: s("valve-1"),
        name: s("set_position"),
        args,
        issued_at: 1_700_000_000_000,
        expires_at: 1_700_000_060_000,
    }
}

fn outcome() -> CommandOutcome {
    CommandOutcome {
        id: s("c-123"),
        device: s("valve-1"),
        state: OutcomeState::Succeeded,
        detail: s("moved to 40%"),
        ts: Some(1_700_000_000_500),
    }
}

fn telemetry() -> TelemetryReading {
    let mut tags = Tags::default();
    tags.insert("site", s("north")).unwrap();
    TelemetryReading {
        device: s("boiler-1"),
        metric: s("temperature"),
        value: 23.5,
        ts: 1_700_000_000_123,
        seq: 42,
        quality: None,
        tags,
    }
}

fn alert() -> AlertEvent {
    AlertEvent {
        seq: 43,
        rule: s("overheat"),
        device: s("boiler-1"),
        severity: Severity::Critical,
        state: AlertState::Raised,
        value: 81.2,
        ts: 1_700_000_000_123,
        message: s("boiler overheating"),
    }
}

fn aggregate() -> AggregateRecord {
    AggregateRecord {
        seq: 44,
        rule: s("r"),
        device: s("d"),
        metric: s("m"),
        start: 1_700_000_000_000,
        end: 1_700_000_060_000,
        count: 60,
        avg: 20.5,
        min: 19.0,
        max: 22.0,
    }
}

fn applied() -> BundleStatus {
    BundleStatus::Applied {
        version: 7,
        hash: s("9f86d081"),
        rule_count: 12,
        memory_bytes: 40960,
    }
}

fn rejected() -> BundleStatus {
    let mut errors = heapless::Vec::new();
    errors
        .push(BundleError {
            line: 3,
            column: 7,
            message: s("unknown metric `tmp`"),
        })
        .unwrap();
    BundleStatus::Rejected {
        version: 7,
        reason: s("compile failed"),
        errors,
    }
}

fn frame_of(msg: DeviceMessage) -> Vec<u8> {
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    encode_frame(&msg, &mut buf).unwrap().to_vec()
}

/// Checks encoding gives exactly `want` and decoding gives the message back.
fn check_frame(msg: DeviceMessage, want: &str) {
    let got = frame_of(msg.clone());
    assert_eq!(hex(&got), want, "frame bytes changed for {msg:?}");
    let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
    match acc.feed(&unhex(want)) {
        FeedResult::Frame { message, remaining } => {
            assert_eq!(message, msg);
            assert!(remaining.is_empty());
        }
        other => panic!("golden frame did not decode: {other:?}"),
    }
}

#[test]
#[ignore = "prints the current vectors; run with --ignored --nocapture when the format changes on purpose"]
fn print_golden() {
    for (name, m) in [
        ("reading", DeviceMessage::Reading(reading())),
        ("batch", DeviceMessage::Batch(batch())),
        ("outcome", DeviceMessage::Outcome(outcome())),
        ("command", DeviceMessage::Command(command())),
    ] {
        println!("frame {name}: {}", hex(&frame_of(m.clone())));
        println!(
            "postcard {name}: {}",
            hex(&postcard::to_allocvec(&m).unwrap())
        );
    }
    let mut out = Vec::new();
    json::encode_telemetry_batch("gw-1", &[telemetry()], &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_alert("gw-1", &alert(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_aggregate("gw-1", &aggregate(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_command(&command(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_outcome(&outcome(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_bundle_status(&applied(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_bundle_status(&rejected(), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_status("gw-1", json::GatewayState::Online, Some(7), &mut out).unwrap();
    println!("{}", String::from_utf8_lossy(&out));
    json::encode_dead_letter(
        "gw-1",
        "local-mqtt",
        "sensors/x/y",
        "not JSON",
        b"{oops",
        &mut out,
    )
    .unwrap();
    println!("{}", String::from_utf8_lossy(&out));
}

#[test]
fn crc_is_crc32_iso_hdlc() {
    // The standard check value, so firmware authors can verify their CRC.
    assert_eq!(frame_crc(b"123456789"), 0xCBF4_3926);
}

#[test]
fn golden_frames() {
    check_frame(
        DeviceMessage::Reading(reading()),
        "02 01 16 08 62 6f 69 6c 65 72 2d 31 0b 74 65 6d 70 65 72 61 74 75 72 65 01 01 01 01 \
         0d 80 37 40 01 fb d0 95 ff bc 31 01 2a 05 98 9c f5 d2 00",
    );
    check_frame(
        DeviceMessage::Batch(batch()),
        "08 01 01 02 01 62 01 74 01 01 01 01 01 03 f8 3f 01 01 05 01 62 01 70 01 01 01 01 01 01 \
         02 c0 09 01 07 01 64 0a 3a aa 3e 00",
    );
    check_frame(
        DeviceMessage::Outcome(outcome()),
        "2a 01 02 05 63 2d 31 32 33 07 76 61 6c 76 65 2d 31 02 0c 6d 6f 76 65 64 20 74 6f 20 34 \
         30 25 01 f4 d3 95 ff bc 31 9f de be 84 00",
    );
    check_frame(
        DeviceMessage::Command(command()),
        "27 01 03 05 63 2d 31 32 33 07 76 61 6c 76 65 2d 31 0c 73 65 74 5f 70 6f 73 69 74 69 6f \
         6e 04 07 70 65 72 63 65 6e 74 19 50 04 66 61 73 74 02 01 04 6d 6f 64 65 03 03 65 63 6f \
         04 67 61 69 6e 01 01 01 01 01 01 13 e0 3f 80 d0 95 ff bc 31 e0 a4 99 ff bc 31 a9 76 14 \
         c9 00",
    );
}

#[test]
fn golden_postcard_messages() {
    // The message bytes inside the frames above, as a firmware author's
    // postcard (or hand-written) encoder must produce them.
    let cases = [
        (
            DeviceMessage::Reading(reading()),
            "00 08 62 6f 69 6c 65 72 2d 31 0b 74 65 6d 70 65 72 61 74 75 72 65 00 00 00 00 00 80 \
             37 40 01 fb d0 95 ff bc 31 01 2a 00",
        ),
        (
            DeviceMessage::Batch(batch()),
            "01 02 01 62 01 74 00 00 00 00 00 00 f8 3f 00 00 00 01 62 01 70 00 00 00 00 00 00 00 \
             c0 00 01 07 01 64",
        ),
        (
            DeviceMessage::Outcome(outcome()),
            "02 05 63 2d 31 32 33 07 76 61 6c 76 65 2d 31 02 0c 6d 6f 76 65 64 20 74 6f 20 34 30 \
             25 01 f4 d3 95 ff bc 31",
        ),
        (
            DeviceMessage::Command(command()),
            "03 05 63 2d 31 32 33 07 76 61 6c 76 65 2d 31 0c 73 65 74 5f 70 6f 73 69 74 69 6f 6e \
             04 07 70 65 72 63 65 6e 74 00 50 04 66 61 73 74 02 01 04 6d 6f 64 65 03 03 65 63 6f \
             04 67 61 69 6e 01 00 00 00 00 00 00 e0 3f 80 d0 95 ff bc 31 e0 a4 99 ff bc 31",
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(
            hex(&postcard::to_allocvec(&msg).unwrap()),
            hex(&unhex(want))
        );
        assert_eq!(
            postcard::from_bytes::<DeviceMessage>(&unhex(want)).unwrap(),
            msg
        );
    }
}

fn encoded(f: impl FnOnce(&mut Vec<u8>) -> Result<(), json::JsonError>) -> String {
    let mut out = Vec::new();
    f(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn golden_json_shapes() {
    let batch = r#"{"v":1,"gateway":"gw-1","readings":[{"device":"boiler-1","metric":"temperature","value":23.5,"ts":1700000000123,"seq":42,"tags":{"site":"north"}}]}"#;
    assert_eq!(
        encoded(|o| json::encode_telemetry_batch("gw-1", &[telemetry()], o)),
        batch
    );
    let decoded = json::decode_telemetry_batch(batch.as_bytes()).unwrap();
    assert_eq!(
        (decoded.gateway.as_str(), decoded.readings),
        ("gw-1", vec![telemetry()])
    );

    let alert_json = r#"{"v":1,"gateway":"gw-1","seq":43,"rule":"overheat","device":"boiler-1","severity":"critical","state":"raised","value":81.2,"ts":1700000000123,"message":"boiler overheating"}"#;
    assert_eq!(
        encoded(|o| json::encode_alert("gw-1", &alert(), o)),
        alert_json
    );
    assert_eq!(
        json::decode_alert(alert_json.as_bytes()).unwrap(),
        (s("gw-1"), alert())
    );
    // An alert without a value (its rule's first metric had no reading yet) leaves the
    // field out; a missing or null value reads back as NaN.
    let no_value = AlertEvent {
        value: f64::NAN,
        ..alert()
    };
    let no_value_json = r#"{"v":1,"gateway":"gw-1","seq":43,"rule":"overheat","device":"boiler-1","severity":"critical","state":"raised","ts":1700000000123,"message":"boiler overheating"}"#;
    assert_eq!(
        encoded(|o| json::encode_alert("gw-1", &no_value, o)),
        no_value_json
    );
    let null_json = no_value_json.replace(r#""ts""#, r#""value":null,"ts""#);
    for text in [no_value_json, &null_json] {
        let (gw, a) = json::decode_alert(text.as_bytes()).unwrap();
        assert!(a.value.is_nan(), "{text}");
        assert_eq!(
            (gw, AlertEvent { value: 0.0, ..a }),
            (
                s("gw-1"),
                AlertEvent {
                    value: 0.0,
                    ..alert()
                }
            )
        );
    }
    let infinite = AlertEvent {
        value: f64::INFINITY,
        ..alert()
    };
    assert!(json::encode_alert("gw-1", &infinite, &mut Vec::new()).is_err());

    let agg = r#"{"v":1,"gateway":"gw-1","seq":44,"rule":"r","device":"d","metric":"m","start":1700000000000,"end":1700000060000,"count":60,"avg":20.5,"min":19.0,"max":22.0}"#;
    assert_eq!(
        encoded(|o| json::encode_aggregate("gw-1", &aggregate(), o)),
        agg
    );
    assert_eq!(
        json::decode_aggregate(agg.as_bytes()).unwrap(),
        (s("gw-1"), aggregate())
    );

    let cmd = r#"{"v":1,"id":"c-123","device":"valve-1","name":"set_position","args":{"percent":40,"fast":true,"mode":"eco","gain":0.5},"issued_at":1700000000000,"expires_at":1700000060000}"#;
    assert_eq!(encoded(|o| json::encode_command(&command(), o)), cmd);
    assert_eq!(json::decode_command(cmd.as_bytes()).unwrap(), command());

    let out = r#"{"v":1,"id":"c-123","device":"valve-1","state":"succeeded","detail":"moved to 40%","ts":1700000000500}"#;
    assert_eq!(encoded(|o| json::encode_outcome(&outcome(), o)), out);
    assert_eq!(json::decode_outcome(out.as_bytes()).unwrap(), outcome());
    let no_ts = CommandOutcome {
        ts: None,
        state: OutcomeState::TimedOut,
        ..outcome()
    };
    assert_eq!(
        encoded(|o| json::encode_outcome(&no_ts, o)),
        r#"{"v":1,"id":"c-123","device":"valve-1","state":"timed_out","detail":"moved to 40%"}"#
    );

    let ok = r#"{"v":1,"version":7,"state":"applied","hash":"9f86d081","rule_count":12,"memory_bytes":40960}"#;
    assert_eq!(encoded(|o| json::encode_bundle_status(&applied(), o)), ok);
    assert_eq!(
        json::decode_bundle_status(ok.as_bytes()).unwrap(),
        applied()
    );
    let bad = r#"{"v":1,"version":7,"state":"rejected","reason":"compile failed","errors":[{"line":3,"column":7,"message":"unknown metric `tmp`"}]}"#;
    assert_eq!(encoded(|o| json::encode_bundle_status(&rejected(), o)), bad);
    assert_eq!(
        json::decode_bundle_status(bad.as_bytes()).unwrap(),
        rejected()
    );

    let bundle = r#"{"v":1,"version":7,"rules":"rule overheat ...","rollback":false,"meta":{}}"#;
    let b = json::decode_bundle(bundle.as_bytes()).unwrap();
    assert_eq!(
        (b.version, b.rules.as_str(), b.rollback, b.meta.len()),
        (7, "rule overheat ...", false, 0)
    );
    assert_eq!(encoded(|o| json::encode_bundle(&b, o)), bundle);

    assert_eq!(
        encoded(|o| json::encode_status("gw-1", json::GatewayState::Online, Some(7), o)),
        r#"{"v":1,"gateway":"gw-1","state":"online","rules_version":7}"#
    );
    assert_eq!(
        encoded(|o| json::encode_status("gw-1", json::GatewayState::Offline, None, o)),
        r#"{"v":1,"gateway":"gw-1","state":"offline"}"#
    );
    assert_eq!(
        encoded(|o| json::encode_dead_letter(
            "gw-1",
            "local-mqtt",
            "sensors/x/y",
            "not JSON",
            b"{oops",
            o
        )),
        r#"{"v":1,"gateway":"gw-1","source":"local-mqtt","where":"sensors/x/y","reason":"not JSON","payload":"{oops"}"#
    );
}
