//! Decoding throughput per core: frames/s and MB/s for binary frames, text
//! lines and local JSON readings (the three decoders on the gateway's hot
//! path), plus the JSON telemetry encoder.
//!
//! Run: `cargo bench -p edgestream-protocol --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgestream_protocol::frame::{encode_frame, FeedResult, FrameAccumulator};
use edgestream_protocol::json;
use edgestream_protocol::limits::{MAX_ENCODED_FRAME_LEN, MAX_LINE_LEN};
use edgestream_protocol::text::{parse_kv_line, LineAccumulator, LineFeed};
use edgestream_protocol::types::{DeviceMessage, Reading, ReadingBatch, TelemetryReading};

const FRAMES: usize = 1000;

fn reading(i: usize) -> Reading {
    Reading {
        device: heapless::String::try_from("boiler-1").unwrap(),
        metric: heapless::String::try_from("temperature").unwrap(),
        value: 20.0 + (i % 100) as f64 / 10.0,
        ts: Some(1_700_000_000_000 + i as u64),
        seq: Some(i as u32),
        quality: Some(100),
    }
}

/// A stream of single-reading frames, and one of 8-reading batch frames.
fn frame_streams() -> (Vec<u8>, Vec<u8>) {
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    let mut single = Vec::new();
    let mut batched = Vec::new();
    for i in 0..FRAMES {
        single.extend_from_slice(
            encode_frame(&DeviceMessage::Reading(reading(i)), &mut buf).unwrap(),
        );
        let mut b = ReadingBatch::default();
        for j in 0..8 {
            b.readings.push(reading(i * 8 + j)).unwrap();
        }
        batched.extend_from_slice(encode_frame(&DeviceMessage::Batch(b), &mut buf).unwrap());
    }
    (single, batched)
}

/// Feeds `stream` in 64-byte chunks (a typical serial read) and counts frames.
fn decode_frames(stream: &[u8]) -> usize {
    let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
    let mut n = 0;
    for chunk in stream.chunks(64) {
        let mut input = chunk;
        loop {
            match acc.feed(input) {
                FeedResult::Consumed => break,
                FeedResult::Frame { message, remaining } => {
                    black_box(&message);
                    n += 1;
                    input = remaining;
                }
                FeedResult::Error { remaining, .. } => input = remaining,
            }
        }
    }
    n
}

fn decode_lines(stream: &[u8]) -> usize {
    let mut acc = LineAccumulator::<{ MAX_LINE_LEN + 1 }>::new();
    let mut n = 0;
    for chunk in stream.chunks(64) {
        let mut input = chunk;
        loop {
            match acc.feed(input) {
                LineFeed::Consumed => break,
                LineFeed::Line { line, remaining } => {
                    n += parse_kv_line(line).map(|r| r.values.len()).unwrap_or(0);
                    input = remaining;
                }
                LineFeed::Error { remaining, .. } => input = remaining,
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let (single, batched) = frame_streams();
    for (name, stream) in [("reading_frames", &single), ("batch8_frames", &batched)] {
        let mut g = c.benchmark_group(format!("decode/{name}"));
        g.throughput(Throughput::Elements(FRAMES as u64));
        g.bench_function("frames", |b| {
            b.iter(|| assert_eq!(decode_frames(black_box(stream)), FRAMES))
        });
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function("bytes", |b| {
            b.iter(|| assert_eq!(decode_frames(black_box(stream)), FRAMES))
        });
        g.finish();
    }

    let mut lines = String::new();
    for i in 0..FRAMES {
        lines.push_str(&format!(
            "temperature={} humidity=41.5 ts={}\r\n",
            20.0 + i as f64 / 10.0,
            1_700_000_000_000u64 + i as u64
        ));
    }
    let mut g = c.benchmark_group("decode/kv_lines");
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("lines", |b| {
        b.iter(|| assert_eq!(decode_lines(black_box(lines.as_bytes())), 2 * FRAMES))
    });
    g.throughput(Throughput::Bytes(lines.len() as u64));
    g.bench_function("bytes", |b| {
        b.iter(|| assert_eq!(decode_lines(black_box(lines.as_bytes())), 2 * FRAMES))
    });
    g.finish();

    let payload = br#"{"value": 23.5, "ts": 1700000000123, "seq": 42}"#;
    let mut g = c.benchmark_group("decode/local_json_reading");
    g.throughput(Throughput::Elements(1));
    g.bench_function("payloads", |b| {
        b.iter(|| json::decode_local_reading(black_box(payload)).unwrap())
    });
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("bytes", |b| {
        b.iter(|| json::decode_local_reading(black_box(payload)).unwrap())
    });
    g.finish();

    let readings: Vec<TelemetryReading> = (0..100)
        .map(|i| TelemetryReading {
            device: heapless::String::try_from("boiler-1").unwrap(),
            metric: heapless::String::try_from("temperature").unwrap(),
            value: 20.0 + i as f64 / 10.0,
            ts: 1_700_000_000_000 + i,
            seq: i,
            quality: None,
            tags: Default::default(),
        })
        .collect();
    let mut out = Vec::new();
    let mut g = c.benchmark_group("encode/telemetry_batch_100");
    g.throughput(Throughput::Elements(100));
    g.bench_function("readings", |b| {
        b.iter(|| json::encode_telemetry_batch("gw-1", black_box(&readings), &mut out).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
