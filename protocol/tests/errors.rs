//! Every refusal has its own clear error, and every limit is enforced.

mod common;

use common::s;
use edgestream_protocol::frame::{
    decode_frame, encode_frame, frame_crc, EncodeError, FeedResult, FrameAccumulator, FrameError,
};
use edgestream_protocol::json::{self, JsonError, PayloadError};
use edgestream_protocol::limits::*;
use edgestream_protocol::text::{
    parse_json_line, parse_kv_line, CsvMap, CsvMapError, LineAccumulator, LineError, LineFeed,
    TextError, TextErrorKind,
};
use edgestream_protocol::types::*;

fn reading(device: &str, value: f64) -> Reading {
    Reading {
        device: s(device),
        metric: s("t"),
        value,
        ts: None,
        seq: None,
        quality: None,
    }
}

/// Frames `body` (version + message + CRC already laid out by the caller).
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; body.len() + body.len() / 254 + 2];
    let n = cobs::try_encode(body, &mut out).unwrap();
    out.truncate(n);
    out.push(0);
    out
}

fn with_crc(mut covered: Vec<u8>) -> Vec<u8> {
    let crc = frame_crc(&covered);
    covered.extend_from_slice(&crc.to_le_bytes());
    covered
}

fn feed_one<const N: usize>(
    acc: &mut FrameAccumulator<N>,
    bytes: &[u8],
) -> Result<DeviceMessage, FrameError> {
    match acc.feed(bytes) {
        FeedResult::Frame { message, remaining } => {
            assert!(remaining.is_empty());
            Ok(message)
        }
        FeedResult::Error { error, remaining } => {
            assert!(remaining.is_empty());
            Err(error)
        }
        FeedResult::Consumed => panic!("no frame completed"),
    }
}

/// The `cobs` functions `frame` calls keep the canonical COBS of the README.
#[test]
fn cobs_matches_the_published_examples() {
    // Examples from the COBS paper / Wikipedia, without the trailing delimiter.
    let cases: [(&[u8], &[u8]); 5] = [
        (&[0x00], &[0x01, 0x01]),
        (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
        (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
        (&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]),
        (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
    ];
    for (raw, enc) in cases {
        let mut out = [0u8; 16];
        let n = cobs::try_encode(raw, &mut out).unwrap();
        assert_eq!(&out[..n], enc);
        let mut dec = enc.to_vec();
        let r = cobs::decode_in_place_report(&mut dec).unwrap();
        assert_eq!((r.src_used, &dec[..r.dst_used]), (enc.len(), raw));
    }
    // 254 non-zero bytes: one full block, no trailing code byte.
    let raw: Vec<u8> = (1..=254).collect();
    let mut out = [0u8; 300];
    let n = cobs::try_encode(&raw, &mut out).unwrap();
    assert_eq!(n, 255);
    assert_eq!(out[0], 0xff);
    // 255 non-zero bytes: a full block, then a block of one.
    let raw: Vec<u8> = (1..=255).collect();
    let n = cobs::try_encode(&raw, &mut out).unwrap();
    assert_eq!(&out[n - 2..n], &[0x02, 0xff]);
    // Too small an output buffer is refused, not overrun.
    assert!(cobs::try_encode(&raw, &mut [0u8; 100]).is_err());
}

#[test]
fn encode_frame_refuses_every_short_buffer() {
    // A body ending in 0x00 ends in an empty COBS block (`01` before the
    // delimiter), whose code byte is written last: the case where
    // `cobs::try_encode` may report a length past `buf`.
    let msg = (0..u32::MAX)
        .map(|seq| {
            DeviceMessage::Reading(Reading {
                seq: Some(seq),
                ..reading("d", 1.0)
            })
        })
        .find(|m| encode_frame(m, &mut [0u8; 64]).is_ok_and(|f| f[f.len() - 2] == 0x01))
        .expect("some sequence number gives a CRC ending in 0x00");
    let mut buf = [0u8; 64];
    let frame = encode_frame(&msg, &mut buf).unwrap().to_vec();
    for len in 0..frame.len() {
        let mut short = vec![0u8; len];
        assert_eq!(
            encode_frame(&msg, &mut short),
            Err(EncodeError::BufferTooSmall),
            "buffer of {len} bytes"
        );
    }
    let mut exact = vec![0u8; frame.len()];
    assert_eq!(encode_frame(&msg, &mut exact), Ok(&frame[..]));
}

#[test]
fn each_bad_frame_has_its_own_error() {
    let mut acc = FrameAccumulator::<64>::new();
    let good = postcard::to_allocvec(&DeviceMessage::Reading(reading("d", 1.0))).unwrap();

    // Too long for the accumulator: discarded up to the delimiter, then the
    // next frame is read normally.
    let mut long = vec![0x55u8; 200];
    long.push(0);
    assert_eq!(feed_one(&mut acc, &long), Err(FrameError::TooLong));

    // A block length running past the end of the frame.
    assert_eq!(
        feed_one(&mut acc, &[0x09, 0x01, 0x00]),
        Err(FrameError::Cobs)
    );

    // Shorter than version + CRC.
    assert_eq!(
        feed_one(&mut acc, &raw_frame(&[1, 2, 3])),
        Err(FrameError::TooShort)
    );

    // CRC mismatch: says what it got and what it computed.
    let mut body = with_crc([vec![FRAME_VERSION], good.clone()].concat());
    let n = body.len();
    body[n - 1] ^= 0x80;
    match feed_one(&mut acc, &raw_frame(&body)) {
        Err(FrameError::BadCrc { received, computed }) => assert_ne!(received, computed),
        other => panic!("{other:?}"),
    }

    // Right CRC, unknown version.
    let body = with_crc([vec![2], good.clone()].concat());
    assert_eq!(
        feed_one(&mut acc, &raw_frame(&body)),
        Err(FrameError::UnknownVersion(2))
    );

    // Right CRC and version, not a DeviceMessage (unknown variant 9).
    let body = with_crc(vec![FRAME_VERSION, 9, 1, 2]);
    assert_eq!(
        feed_one(&mut acc, &raw_frame(&body)),
        Err(FrameError::BadEncoding)
    );

    // Trailing bytes after a valid message.
    let body = with_crc([vec![FRAME_VERSION], good.clone(), vec![0xaa]].concat());
    assert_eq!(
        feed_one(&mut acc, &raw_frame(&body)),
        Err(FrameError::BadEncoding)
    );

    // Well-formed but breaking a content rule: NaN value, `/` in a device id.
    for bad in [reading("d", f64::NAN), reading("a/b", 1.0)] {
        let msg = postcard::to_allocvec(&DeviceMessage::Reading(bad)).unwrap();
        let body = with_crc([vec![FRAME_VERSION], msg].concat());
        assert!(matches!(
            feed_one(&mut acc, &raw_frame(&body)),
            Err(FrameError::Invalid(_))
        ));
    }

    // And the accumulator still works.
    let body = with_crc([vec![FRAME_VERSION], good].concat());
    assert_eq!(
        feed_one(&mut acc, &raw_frame(&body)),
        Ok(DeviceMessage::Reading(reading("d", 1.0)))
    );

    // decode_frame gives the same answers on a single frame.
    let mut frame = raw_frame(&with_crc(vec![7, 0]));
    frame.pop();
    assert_eq!(decode_frame(&mut frame), Err(FrameError::UnknownVersion(7)));
}

#[test]
fn encoder_refuses_invalid_messages_and_small_buffers() {
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    let bad = DeviceMessage::Reading(reading("", 1.0));
    assert!(
        matches!(encode_frame(&bad, &mut buf), Err(EncodeError::Invalid(f)) if f.field == "device")
    );
    let inf = DeviceMessage::Reading(reading("d", f64::INFINITY));
    assert!(
        matches!(encode_frame(&inf, &mut buf), Err(EncodeError::Invalid(f)) if f.field == "value")
    );
    let ok = DeviceMessage::Reading(reading("d", 1.0));
    assert_eq!(
        encode_frame(&ok, &mut [0u8; 8]),
        Err(EncodeError::BufferTooSmall)
    );
    let cmd = Command {
        id: s("c"),
        device: s("d"),
        name: s("n"),
        args: CommandArgs::default(),
        issued_at: 10,
        expires_at: 9,
    };
    assert!(matches!(
        encode_frame(&DeviceMessage::Command(cmd), &mut buf),
        Err(EncodeError::Invalid(f)) if f.field == "expires_at"
    ));
    assert!(matches!(
        encode_frame(&DeviceMessage::Batch(ReadingBatch::default()), &mut buf),
        Err(EncodeError::Invalid(f)) if f.field == "readings"
    ));
}

#[test]
fn a_stream_of_delimiters_is_not_an_error_and_does_not_recurse() {
    let mut acc = FrameAccumulator::<64>::new();
    let zeros = vec![0u8; 1 << 20];
    assert!(matches!(acc.feed(&zeros), FeedResult::Consumed));
}

#[test]
fn over_long_lines_are_discarded_and_reported_once() {
    let mut acc = LineAccumulator::<16>::new();
    let input = b"t=1\nthis line is far too long for sixteen bytes\nt=2\r\n\n\xff\xfe\n";
    let mut results = Vec::new();
    let mut rest: &[u8] = input;
    // Feed one byte at a time to cross every boundary.
    let mut pending: Vec<u8> = Vec::new();
    while !rest.is_empty() || !pending.is_empty() {
        if pending.is_empty() {
            pending.push(rest[0]);
            rest = &rest[1..];
        }
        let chunk = std::mem::take(&mut pending);
        let mut input = &chunk[..];
        loop {
            match acc.feed(input) {
                LineFeed::Consumed => break,
                LineFeed::Line { line, remaining } => {
                    results.push(Ok(line.to_owned()));
                    input = remaining;
                }
                LineFeed::Error { error, remaining } => {
                    results.push(Err(error));
                    input = remaining;
                }
            }
        }
    }
    assert_eq!(
        results,
        vec![
            Ok("t=1".to_owned()),
            Err(LineError::TooLong { len: 44 }), // 43 bytes + newline
            Ok("t=2".to_owned()),
            Err(LineError::NotUtf8),
        ]
    );
}

fn kind(r: Result<impl std::fmt::Debug, TextError>) -> (usize, TextErrorKind) {
    let e = r.unwrap_err();
    assert!(!e.to_string().is_empty());
    (e.field, e.kind)
}

#[test]
fn each_malformed_text_line_has_its_own_error() {
    use TextErrorKind::*;
    assert_eq!(kind(parse_kv_line("t=1 humidity")), (2, MissingEquals));
    assert_eq!(kind(parse_kv_line("=1")), (1, BadKey));
    assert_eq!(kind(parse_kv_line("a/b=1")), (1, BadKey));
    assert_eq!(kind(parse_kv_line("t=warm")), (1, BadNumber));
    assert_eq!(kind(parse_kv_line("t=inf")), (1, NonFinite));
    assert_eq!(kind(parse_kv_line("t=NaN")), (1, NonFinite));
    assert_eq!(kind(parse_kv_line("t=1 ts=-5")), (2, BadInteger));
    assert_eq!(kind(parse_kv_line("t=1 quality=300")), (2, BadInteger));
    assert_eq!(kind(parse_kv_line("t=1 seq=4294967296")), (2, BadInteger));
    assert_eq!(kind(parse_kv_line("device=a/b t=1")), (1, BadDevice));
    assert_eq!(kind(parse_kv_line("t=1 t=2")), (2, DuplicateKey));
    assert_eq!(kind(parse_kv_line("ts=5")), (0, NoValues));
    let many: Vec<String> = (0..=MAX_LINE_VALUES).map(|i| format!("m{i}=1")).collect();
    assert_eq!(
        kind(parse_kv_line(&many.join(" "))),
        (MAX_LINE_VALUES + 1, TooManyValues)
    );
    let long_key = format!("{}=1", "k".repeat(MAX_METRIC_LEN + 1));
    assert_eq!(kind(parse_kv_line(&long_key)), (1, BadKey));

    assert_eq!(kind(parse_json_line("{\"t\":")), (0, NotJson));
    assert_eq!(kind(parse_json_line("{\"t\":1} x")), (0, NotJson));
    assert_eq!(kind(parse_json_line("[1,2]")), (0, NotObject));
    assert_eq!(kind(parse_json_line("{\"t\":\"hot\"}")), (1, BadNumber));
    assert_eq!(
        kind(parse_json_line("{\"t\":1,\"ts\":1.5}")),
        (2, BadInteger)
    );
    assert_eq!(
        kind(parse_json_line("{\"device\":7,\"t\":1}")),
        (1, BadDevice)
    );
    assert_eq!(
        kind(parse_json_line("{\"t\":1,\"t\":2}")),
        (2, DuplicateKey)
    );
    assert_eq!(kind(parse_json_line("{}")), (0, NoValues));
    let ok = parse_json_line("{\"t\":1,\"extra\":[1,{\"a\":2}]}");
    assert_eq!(kind(ok), (2, BadNumber));

    let map = CsvMap::new(["ts", "temperature", "_", "humidity"], ',').unwrap();
    assert_eq!(
        kind(map.parse("1,2,3")),
        (
            0,
            ColumnCount {
                expected: 4,
                found: 3
            }
        )
    );
    assert_eq!(
        kind(map.parse("1,2,3,4,5")),
        (
            0,
            ColumnCount {
                expected: 4,
                found: 5
            }
        )
    );
    assert_eq!(
        kind(map.parse("ts,temperature,x,humidity")),
        (1, BadInteger)
    );
    assert_eq!(kind(map.parse("1,,x,4")), (2, BadNumber));
    let rec = map.parse("1700000000123, 21.5 ,whatever,40").unwrap();
    assert_eq!(rec.ts, Some(1_700_000_000_123));
    assert_eq!(
        rec.values
            .iter()
            .map(|(m, v)| (m.as_str(), *v))
            .collect::<Vec<_>>(),
        [("temperature", 21.5), ("humidity", 40.0)]
    );
    let readings: Vec<Reading> = rec.readings(&s("port-sensor")).collect();
    assert_eq!(readings[1].device.as_str(), "port-sensor");
    assert_eq!(readings[1].ts, Some(1_700_000_000_123));

    assert_eq!(CsvMap::new(["ts"], ','), Err(CsvMapError::NoMetric));
    assert_eq!(
        CsvMap::new(["a", "a"], ','),
        Err(CsvMapError::Duplicate { index: 1 })
    );
    assert_eq!(
        CsvMap::new(["a b"], ','),
        Err(CsvMapError::BadName { index: 0 })
    );
    assert_eq!(CsvMap::new(["a"], '.'), Err(CsvMapError::BadDelimiter));
    let names: Vec<String> = (0..=MAX_CSV_COLUMNS).map(|i| format!("m{i}")).collect();
    assert_eq!(
        CsvMap::new(names.iter().map(String::as_str), ','),
        Err(CsvMapError::TooManyColumns)
    );
}

#[test]
fn local_reading_errors_say_what_is_wrong() {
    use PayloadError::*;
    let d = |p: &str| json::decode_local_reading(p.as_bytes());
    assert_eq!(d("23.5").unwrap().value, 23.5);
    assert_eq!(d(" -4 ").unwrap().value, -4.0);
    let r =
        d(r#"{"value": 23.5, "ts": 1700000000123, "seq": 9, "quality": 80, "unit": "C"}"#).unwrap();
    assert_eq!(
        (r.value, r.ts, r.seq, r.quality),
        (23.5, Some(1_700_000_000_123), Some(9), Some(80))
    );

    assert!(matches!(d("{\"value\":"), Err(NotJson { .. })));
    assert!(matches!(d("23.5 24"), Err(NotJson { .. })));
    assert!(matches!(d(""), Err(NotJson { .. })));
    assert_eq!(d("\"hot\""), Err(NotObjectOrNumber { found: "string" }));
    assert_eq!(d("[1]"), Err(NotObjectOrNumber { found: "array" }));
    assert_eq!(d("null"), Err(NotObjectOrNumber { found: "null" }));
    assert_eq!(d("{\"ts\":1}"), Err(MissingValue));
    assert_eq!(
        d("{\"value\":\"23.5\"}"),
        Err(WrongType {
            field: "value",
            expected: "a number",
            found: "string"
        })
    );
    assert_eq!(
        d("{\"value\":null}"),
        Err(WrongType {
            field: "value",
            expected: "a number",
            found: "null"
        })
    );
    assert!(matches!(
        d("{\"value\":1,\"ts\":\"now\"}"),
        Err(WrongType { field: "ts", .. })
    ));
    assert!(matches!(
        d("{\"value\":1,\"ts\":1.5}"),
        Err(WrongType { field: "ts", .. })
    ));
    assert_eq!(
        d("{\"value\":1,\"ts\":-1}"),
        Err(OutOfRange { field: "ts" })
    );
    assert_eq!(
        d("{\"value\":1,\"seq\":4294967296}"),
        Err(OutOfRange { field: "seq" })
    );
    assert_eq!(
        d("{\"value\":1,\"quality\":256}"),
        Err(OutOfRange { field: "quality" })
    );
    assert_eq!(d("1e999"), Err(NonFinite));
    assert_eq!(d("{\"value\":-1e999}"), Err(NonFinite));
    assert_eq!(
        d("{\"value\":1,\"value\":2}"),
        Err(Duplicate { field: "value" })
    );
    let big = format!(
        "{{\"value\":1,\"pad\":\"{}\"}}",
        "x".repeat(MAX_PAYLOAD_LEN)
    );
    assert_eq!(d(&big), Err(TooLarge { len: big.len() }));
    for e in [MissingValue, NonFinite, TooLarge { len: 2000 }] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn json_versions_are_checked_before_the_shape() {
    let d = |p: &str| json::decode_command(p.as_bytes());
    let cmd = r#""id":"c","device":"d","name":"n","issued_at":1,"expires_at":2"#;
    assert!(d(&format!("{{\"v\":1,{cmd}}}")).is_ok());
    assert_eq!(d(&format!("{{{cmd}}}")), Err(JsonError::MissingVersion));
    assert_eq!(
        d(r#"{"totally":"different","v":2}"#),
        Err(JsonError::UnsupportedVersion { found: "2".into() })
    );
    assert_eq!(
        d(&format!("{{\"v\":\"1\",{cmd}}}")),
        Err(JsonError::UnsupportedVersion {
            found: "\"1\"".into()
        })
    );
    assert_eq!(
        d(&format!("{{\"v\":1.0,{cmd}}}")),
        Err(JsonError::UnsupportedVersion {
            found: "1.0".into()
        })
    );
    let e = d(r#"{"v":2}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported schema version v=2, this build speaks v=1"
    );
    assert!(matches!(d("{\"v\":1"), Err(JsonError::Syntax { .. })));
    assert!(matches!(d("[1]"), Err(JsonError::Schema(_))));
    assert!(matches!(d("[2]"), Err(JsonError::Schema(_))));
    assert!(
        matches!(d(r#"{"v":2,"v":1}"#), Err(JsonError::Schema(m)) if m.contains("duplicate field"))
    );
    // Every other decoder checks the version too.
    assert_eq!(
        json::decode_outcome(br#"{"v":3}"#),
        Err(JsonError::UnsupportedVersion { found: "3".into() })
    );
    assert_eq!(
        json::decode_bundle(br#"{"v":0}"#),
        Err(JsonError::UnsupportedVersion { found: "0".into() })
    );
    assert_eq!(
        json::decode_bundle_status(br#"{}"#),
        Err(JsonError::MissingVersion)
    );
    assert_eq!(
        json::decode_telemetry_batch(br#"{"v":9}"#),
        Err(JsonError::UnsupportedVersion { found: "9".into() })
    );
    assert_eq!(
        json::decode_alert(br#"{"v":9}"#),
        Err(JsonError::UnsupportedVersion { found: "9".into() })
    );
    assert_eq!(
        json::decode_aggregate(br#"{"v":9}"#),
        Err(JsonError::UnsupportedVersion { found: "9".into() })
    );
}

#[test]
fn json_limits_and_content_rules_are_enforced() {
    let d = |p: &str| json::decode_command(p.as_bytes());
    let schema = |r: Result<Command, JsonError>| match r {
        Err(JsonError::Schema(m)) => m,
        other => panic!("expected a schema error, got {other:?}"),
    };
    // Missing field, wrong type, too long a string, too many args, duplicate arg.
    assert!(schema(d(
        r#"{"v":1,"id":"c","device":"d","name":"n","issued_at":1}"#
    ))
    .contains("expires_at"));
    assert!(schema(d(
        r#"{"v":1,"id":"c","device":"d","name":"n","issued_at":"x","expires_at":2}"#
    ))
    .contains("line 1"));
    let long = "d".repeat(MAX_DEVICE_LEN + 1);
    assert!(schema(d(&format!(
        r#"{{"v":1,"id":"c","device":"{long}","name":"n","issued_at":1,"expires_at":2}}"#
    )))
    .contains("invalid length"));
    let args: Vec<String> = (0..=MAX_COMMAND_ARGS)
        .map(|i| format!("\"a{i}\":{i}"))
        .collect();
    let many = format!(
        r#"{{"v":1,"id":"c","device":"d","name":"n","args":{{{}}},"issued_at":1,"expires_at":2}}"#,
        args.join(",")
    );
    assert!(schema(d(&many)).contains("invalid length"));
    let dup = r#"{"v":1,"id":"c","device":"d","name":"n","args":{"a":1,"a":2},"issued_at":1,"expires_at":2}"#;
    assert!(schema(d(dup)).contains("duplicate key"));
    let arr =
        r#"{"v":1,"id":"c","device":"d","name":"n","args":{"a":[1]},"issued_at":1,"expires_at":2}"#;
    assert!(schema(d(arr)).contains("a number, a bool or a string"));
    // Content rules.
    let topic = r#"{"v":1,"id":"c","device":"valve/#","name":"n","issued_at":1,"expires_at":2}"#;
    assert!(matches!(d(topic), Err(JsonError::Invalid(f)) if f.field == "device"));
    let order = r#"{"v":1,"id":"c","device":"d","name":"n","issued_at":3,"expires_at":2}"#;
    assert!(matches!(d(order), Err(JsonError::Invalid(f)) if f.field == "expires_at"));
    // Payload limits are checked before parsing.
    let huge = vec![b' '; MAX_COMMAND_JSON_LEN + 1];
    assert_eq!(
        d(std::str::from_utf8(&huge).unwrap()),
        Err(JsonError::TooLarge {
            len: huge.len(),
            max: MAX_COMMAND_JSON_LEN
        })
    );
    let huge = vec![b' '; MAX_BUNDLE_JSON_LEN + 1];
    assert!(matches!(
        json::decode_bundle(&huge),
        Err(JsonError::TooLarge { .. })
    ));
    // Bundles: version at least 1, rules unless rolling back.
    assert!(matches!(
        json::decode_bundle(br#"{"v":1,"version":0,"rules":"x"}"#),
        Err(JsonError::Invalid(_))
    ));
    assert!(matches!(
        json::decode_bundle(br#"{"v":1,"version":3,"rules":"  "}"#),
        Err(JsonError::Invalid(_))
    ));
    assert!(
        json::decode_bundle(br#"{"v":1,"version":3,"rollback":true}"#)
            .unwrap()
            .rollback
    );
    // Encoders refuse what decoders would refuse.
    let mut out = Vec::new();
    assert!(matches!(
        json::encode_telemetry_batch("gw-1", &[], &mut out),
        Err(JsonError::Invalid(_))
    ));
    assert!(matches!(
        json::encode_status("gw/1", json::GatewayState::Online, None, &mut out),
        Err(JsonError::Invalid(_))
    ));
    // Dead letters are bounded and survive bytes that are not UTF-8.
    let junk = vec![0xffu8; 5000];
    json::encode_dead_letter(
        "gw-1",
        "serial",
        "/dev/ttyUSB0",
        "bad frame",
        &junk,
        &mut out,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["payload"].as_str().unwrap().len() <= json::MAX_DEAD_LETTER_PAYLOAD_LEN);
}
