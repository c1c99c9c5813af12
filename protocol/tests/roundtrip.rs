//! Round-trip property tests: every type through every codec and framing.

mod common;

use common::*;
use edgestream_protocol::frame::{encode_frame, FeedResult, FrameAccumulator};
use edgestream_protocol::json;
use edgestream_protocol::limits::*;
use edgestream_protocol::text::{
    parse_json_line, parse_kv_line, CsvMap, LineAccumulator, LineFeed, TextRecord,
};
use edgestream_protocol::types::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// Feeds `bytes` to `acc` in the given chunk sizes (cycled) and collects
/// every result as `Ok(message)` / `Err(error)`.
fn feed_frames<const N: usize>(
    acc: &mut FrameAccumulator<N>,
    bytes: &[u8],
    chunks: &[usize],
) -> Vec<Result<DeviceMessage, edgestream_protocol::frame::FrameError>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = chunks[i % chunks.len()].min(bytes.len() - pos);
        i += 1;
        let mut input = &bytes[pos..pos + n];
        pos += n;
        loop {
            match acc.feed(input) {
                FeedResult::Consumed => break,
                FeedResult::Frame { message, remaining } => {
                    out.push(Ok(message));
                    input = remaining;
                }
                FeedResult::Error { error, remaining } => {
                    out.push(Err(error));
                    input = remaining;
                }
            }
        }
    }
    out
}

fn feed_lines<const N: usize>(
    acc: &mut LineAccumulator<N>,
    bytes: &[u8],
    chunks: &[usize],
) -> Vec<Result<String, edgestream_protocol::text::LineError>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = chunks[i % chunks.len()].min(bytes.len() - pos);
        i += 1;
        let mut input = &bytes[pos..pos + n];
        pos += n;
        loop {
            match acc.feed(input) {
                LineFeed::Consumed => break,
                LineFeed::Line { line, remaining } => {
                    out.push(Ok(line.to_owned()));
                    input = remaining;
                }
                LineFeed::Error { error, remaining } => {
                    out.push(Err(error));
                    input = remaining;
                }
            }
        }
    }
    out
}

const RESERVED: [&str; 4] = ["device", "ts", "seq", "quality"];

/// A text record small enough for one line of MAX_LINE_LEN bytes.
fn text_record() -> impl Strategy<Value = TextRecord> {
    // Short names and at most 4 values keep the longest rendering (JSON with
    // every optional key and 24-character floats) under MAX_LINE_LEN.
    let metric =
        "[A-Za-z_][A-Za-z0-9_.-]{0,7}".prop_filter("reserved", |m| !RESERVED.contains(&m.as_str()));
    (
        proptest::option::of("[a-z0-9-]{1,12}"),
        any::<Option<u64>>(),
        any::<Option<u32>>(),
        any::<Option<u8>>(),
        proptest::collection::btree_map(metric, finite(), 1..=4),
    )
        .prop_map(|(device, ts, seq, quality, values)| {
            let mut rec = TextRecord {
                device: device.map(|d| s(&d)),
                ts,
                seq,
                quality,
                ..TextRecord::default()
            };
            for (m, v) in values {
                rec.values.push((s(&m), v)).unwrap();
            }
            rec
        })
}

fn render_kv(rec: &TextRecord, sep: &str) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &rec.device {
        parts.push(format!("device={d}"));
    }
    for (m, v) in &rec.values {
        parts.push(format!("{m}={v:?}"));
    }
    if let Some(ts) = rec.ts {
        parts.push(format!("ts={ts}"));
    }
    if let Some(q) = rec.seq {
        parts.push(format!("seq={q}"));
    }
    if let Some(q) = rec.quality {
        parts.push(format!("quality={q}"));
    }
    parts.join(sep)
}

fn render_json(rec: &TextRecord) -> String {
    let mut obj = serde_json::Map::new();
    if let Some(d) = &rec.device {
        obj.insert("device".into(), d.as_str().into());
    }
    for (m, v) in &rec.values {
        obj.insert(m.to_string(), (*v).into());
    }
    if let Some(ts) = rec.ts {
        obj.insert("ts".into(), ts.into());
    }
    if let Some(q) = rec.seq {
        obj.insert("seq".into(), q.into());
    }
    if let Some(q) = rec.quality {
        obj.insert("quality".into(), q.into());
    }
    serde_json::Value::Object(obj).to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip_in_any_chunking(
        msgs in vec(device_message(), 1..8),
        chunks in vec(1usize..64, 1..8),
    ) {
        let mut wire = Vec::new();
        let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
        for m in &msgs {
            let frame = encode_frame(m, &mut buf).unwrap();
            prop_assert!(frame.len() <= MAX_ENCODED_FRAME_LEN + 1);
            prop_assert_eq!(frame.iter().filter(|&&b| b == 0).count(), 1);
            wire.extend_from_slice(frame);
        }
        let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
        let got = feed_frames(&mut acc, &wire, &chunks);
        let want: Vec<_> = msgs.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(acc.pending(), 0);
    }

    #[test]
    fn cobs_round_trips_any_bytes(data in vec(any::<u8>(), 1..1200)) {
        let mut enc = vec![0u8; data.len() + data.len() / 254 + 2];
        let n = cobs::try_encode(&data, &mut enc).unwrap();
        prop_assert!(!enc[..n].contains(&0));
        prop_assert!(n <= data.len() + data.len().div_ceil(254));
        let mut dec = enc[..n].to_vec();
        let r = cobs::decode_in_place_report(&mut dec).unwrap();
        prop_assert_eq!(r.src_used, n);
        prop_assert_eq!(&dec[..r.dst_used], &data[..]);
    }

    #[test]
    fn json_commands_round_trip(cmd in command()) {
        let mut out = Vec::new();
        json::encode_command(&cmd, &mut out).unwrap();
        prop_assert!(out.len() <= MAX_COMMAND_JSON_LEN);
        prop_assert_eq!(json::decode_command(&out).unwrap(), cmd);
    }

    #[test]
    fn json_outcomes_round_trip(o in outcome()) {
        let mut out = Vec::new();
        json::encode_outcome(&o, &mut out).unwrap();
        prop_assert!(out.len() <= MAX_OUTCOME_JSON_LEN);
        prop_assert_eq!(json::decode_outcome(&out).unwrap(), o);
    }

    #[test]
    fn json_telemetry_batches_round_trip(gw in name::<MAX_GATEWAY_LEN>(), rs in vec(telemetry(), 1..20)) {
        let mut out = Vec::new();
        json::encode_telemetry_batch(&gw, &rs, &mut out).unwrap();
        let b = json::decode_telemetry_batch(&out).unwrap();
        prop_assert_eq!(b.gateway, gw);
        prop_assert_eq!(b.readings, rs);
    }

    #[test]
    fn json_alerts_and_aggregates_round_trip(gw in name::<MAX_GATEWAY_LEN>(), a in alert(), g in aggregate()) {
        let mut out = Vec::new();
        json::encode_alert(&gw, &a, &mut out).unwrap();
        prop_assert_eq!(json::decode_alert(&out).unwrap(), (gw.clone(), a));
        json::encode_aggregate(&gw, &g, &mut out).unwrap();
        prop_assert_eq!(json::decode_aggregate(&out).unwrap(), (gw, g));
    }

    #[test]
    fn json_bundle_statuses_round_trip(st in bundle_status()) {
        let mut out = Vec::new();
        json::encode_bundle_status(&st, &mut out).unwrap();
        prop_assert_eq!(json::decode_bundle_status(&out).unwrap(), st);
    }

    #[test]
    fn json_bundles_round_trip(version in 1u64.., rules in "[ -~\n]{1,200}", rollback in any::<bool>()) {
        prop_assume!(!rules.trim().is_empty());
        let mut meta = serde_json::Map::new();
        meta.insert("author".into(), "ops".into());
        let b = json::RuleBundle { version, rules, rollback, meta };
        let mut out = Vec::new();
        json::encode_bundle(&b, &mut out).unwrap();
        prop_assert_eq!(json::decode_bundle(&out).unwrap(), b);
    }

    #[test]
    fn local_readings_round_trip(
        value in finite(),
        ts in any::<Option<u64>>(),
        seq in any::<Option<u32>>(),
        quality in any::<Option<u8>>(),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("value".into(), value.into());
        if let Some(v) = ts { obj.insert("ts".into(), v.into()); }
        if let Some(v) = seq { obj.insert("seq".into(), v.into()); }
        if let Some(v) = quality { obj.insert("quality".into(), v.into()); }
        obj.insert("unit".into(), "C".into());
        let payload = serde_json::Value::Object(obj).to_string();
        let r = json::decode_local_reading(payload.as_bytes()).unwrap();
        prop_assert_eq!(r, json::LocalReading { value, ts, seq, quality });
        let bare = json::decode_local_reading(serde_json::to_string(&value).unwrap().as_bytes()).unwrap();
        prop_assert_eq!(bare.value, value);
    }

    #[test]
    fn text_lines_round_trip_in_any_chunking(
        recs in vec(text_record(), 1..10),
        chunks in vec(1usize..300, 1..8),
        crlf in any::<bool>(),
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let mut wire = String::new();
        for (i, r) in recs.iter().enumerate() {
            let line = match i % 3 {
                0 => render_kv(r, " "),
                1 => render_kv(r, ","),
                _ => render_json(r),
            };
            prop_assert!(line.len() <= MAX_LINE_LEN, "test line too long: {}", line);
            wire.push_str(&line);
            wire.push_str(end);
            wire.push_str("  \n"); // blank lines are skipped
        }
        let mut acc = LineAccumulator::<{ MAX_LINE_LEN + 1 }>::new();
        let lines = feed_lines(&mut acc, wire.as_bytes(), &chunks);
        prop_assert_eq!(lines.len(), recs.len());
        for (i, (line, rec)) in lines.into_iter().zip(&recs).enumerate() {
            let line = line.unwrap();
            let got = if i % 3 == 2 { parse_json_line(&line) } else { parse_kv_line(&line) };
            prop_assert_eq!(&got.unwrap(), rec);
        }
    }

    #[test]
    fn csv_lines_round_trip(rec in text_record(), delim in prop_oneof![Just(','), Just(';'), Just('\t'), Just('|')]) {
        // `_` names a skipped column in a CSV map, so it cannot be a metric there.
        prop_assume!(rec.values.iter().all(|(m, _)| m.as_str() != "_"));
        let mut names = vec!["_"];
        let mut cells = vec!["ignored".to_string()];
        if let Some(ts) = rec.ts { names.push("ts"); cells.push(ts.to_string()); }
        if let Some(d) = &rec.device { names.push("device"); cells.push(d.to_string()); }
        for (m, v) in &rec.values { names.push(m.as_str()); cells.push(format!("{v:?}")); }
        if let Some(q) = rec.seq { names.push("seq"); cells.push(q.to_string()); }
        if let Some(q) = rec.quality { names.push("quality"); cells.push(q.to_string()); }
        let map = CsvMap::new(names.iter().copied(), delim).unwrap();
        let line = cells.join(&delim.to_string());
        prop_assert_eq!(map.parse(&line).unwrap(), rec);
    }
}

#[test]
fn largest_messages_fit_their_limits() {
    let big = |c: char, n: usize| -> String { std::iter::repeat_n(c, n).collect() };
    let reading = Reading {
        device: s(&big('d', MAX_DEVICE_LEN)),
        metric: s(&big('m', MAX_METRIC_LEN)),
        value: f64::MAX,
        ts: Some(u64::MAX),
        seq: Some(u32::MAX),
        quality: Some(u8::MAX),
    };
    let mut args = CommandArgs::default();
    for i in 0..MAX_COMMAND_ARGS {
        let key = format!("{i}{}", big('k', MAX_ARG_KEY_LEN - 1));
        args.insert(&key, ArgValue::Str(s(&big('é', MAX_ARG_STR_LEN / 2))))
            .unwrap();
    }
    let command = Command {
        id: s(&big('i', MAX_COMMAND_ID_LEN)),
        device: s(&big('d', MAX_DEVICE_LEN)),
        name: s(&big('n', MAX_COMMAND_NAME_LEN)),
        args,
        issued_at: u64::MAX - 1,
        expires_at: u64::MAX,
    };
    let outcome = CommandOutcome {
        id: s(&big('i', MAX_COMMAND_ID_LEN)),
        device: s(&big('d', MAX_DEVICE_LEN)),
        state: OutcomeState::TimedOut,
        detail: s(&big('x', MAX_DETAIL_LEN)),
        ts: Some(u64::MAX),
    };
    let batch = ReadingBatch {
        readings: heapless::Vec::from_slice(&vec![reading.clone(); MAX_BATCH_READINGS]).unwrap(),
    };
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    for m in [
        DeviceMessage::Reading(reading),
        DeviceMessage::Batch(batch),
        DeviceMessage::Command(command.clone()),
        DeviceMessage::Outcome(outcome),
    ] {
        let frame = encode_frame(&m, &mut buf).expect("largest message must fit a frame");
        let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
        assert!(matches!(acc.feed(frame), FeedResult::Frame { message, .. } if message == m));
    }
    let mut out = Vec::new();
    json::encode_command(&command, &mut out).unwrap();
    assert!(
        out.len() <= MAX_COMMAND_JSON_LEN,
        "command JSON {} bytes",
        out.len()
    );
}

proptest! {
    /// Lines of any length, some over the limit, in any chunking: each short
    /// line comes out as it went in, each long one is one `TooLong` with its
    /// exact discarded length, and nothing else is produced.
    #[test]
    fn over_long_lines_never_disturb_their_neighbours(
        lines in vec("[a-z0-9=. ]{0,40}", 1..40),
        chunks in vec(1usize..100, 1..8),
    ) {
        use edgestream_protocol::text::LineError;
        const N: usize = 16;
        let mut wire = String::new();
        let mut want = Vec::new();
        for l in &lines {
            wire.push_str(l);
            wire.push('\n');
            if l.len() > N {
                want.push(Err(LineError::TooLong { len: l.len() + 1 }));
            } else if !l.trim().is_empty() {
                want.push(Ok(l.clone()));
            }
        }
        let mut acc = LineAccumulator::<N>::new();
        prop_assert_eq!(feed_lines(&mut acc, wire.as_bytes(), &chunks), want);
    }
}
