//! Outbox figures: durable records/s with group commit, drain rate, bytes on disk per payload
//! byte, bytes written per group commit, and RSS with a backlog, after reopening it, and the
//! directory's size after the drain.
//!
//! `cargo bench -p edgestream-agent --bench outbox` (a plain harness: one pass, figures
//! printed; the targets are in ARCHITECTURE.md). `OUTBOX_BENCH_RECORDS` sets the backlog
//! (100,000 by default; the bounded-memory figure in ARCHITECTURE.md uses 2,000,000). In-process, no broker: the drain figure is
//! what the outbox can give the uplink (read a batch of 50, remove it as a PUBACK would), not
//! what a network does. Run it on an idle machine: the figures are wall-clock.

use std::sync::Arc;
use std::time::Instant;

use edgestream_agent::outbox::config::{Durability, FullPolicy};
use edgestream_agent::outbox::record::{Priority, ReadingRecord, Record};
use edgestream_agent::outbox::store::{Outbox, OutboxSettings};
use edgestream_agent::Metrics;

const RECORDS: usize = 100_000;
/// Records per append (group commit); `OUTBOX_BENCH_BATCH` overrides it (the agent's real
/// groups are often 10-30 readings, and segments are only as big as a group).
const BATCH: usize = 512;
const DRAIN_BATCH: usize = 50;

fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with(field))?.to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

fn written_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    let l = s.lines().find(|l| l.starts_with("write_bytes:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
            Ok(m) => n += m.len(),
            Err(_) => {}
        }
    }
    n
}

fn reading(i: usize) -> Record {
    Record::Reading(ReadingRecord {
        device: format!("boiler-{}", i % 16).as_str().try_into().unwrap(),
        metric: "temperature".try_into().unwrap(),
        value: 20.0 + (i % 1000) as f64 / 10.0,
        ts_ms: 1_700_000_000_000 + i as u64 * 100,
        tags: vec![("site".into(), "plant-3".into())],
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list here
    }
    let batch = std::env::var("OUTBOX_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(BATCH);
    let records = std::env::var("OUTBOX_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(RECORDS);
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = OutboxSettings {
        max_bytes: 256 << 20,
        cache_bytes: 4 << 20,
        durability: Durability::Batch,
        flush_interval_ms: 500,
        full_policy: FullPolicy::DropOldestTelemetry,
        max_age_secs: None,
    };
    let metrics = Arc::new(Metrics::default());
    let path = dir.path().join("outbox");
    let (outbox, _) = Outbox::open(&path, settings.clone(), metrics.clone()).expect("open");
    let rss_before = proc_status("VmRSS:");
    // Records are made per batch, as the rules stage does, so the bench holds no backlog of
    // its own in memory and the peak RSS is the outbox's.
    // "Payload" is a record's single-value encoding (postcard body + 5-byte version/CRC
    // header), as since the first figures; `body` leaves the header out, the stricter measure.
    let mut payload = 0u64;
    let mut body = 0u64;
    let mut chunk = Vec::with_capacity(batch);
    let mut encode_secs = 0.0;
    let written0 = written_bytes();
    let t = Instant::now();
    let mut commits = 0u64;
    for start in (0..records).step_by(batch) {
        let e = Instant::now();
        chunk.clear();
        chunk.extend((start..(start + batch).min(records)).map(reading));
        payload += chunk
            .iter()
            .map(|r| r.encode().expect("encode").len() as u64)
            .sum::<u64>();
        body += chunk
            .iter()
            .map(|r| {
                let mut b = Vec::new();
                r.encode_body_into(&mut b).expect("encode");
                b.len() as u64
            })
            .sum::<u64>();
        encode_secs += e.elapsed().as_secs_f64();
        outbox.append(&chunk).expect("append");
        outbox.flush_blocking().expect("flush");
        commits += 1;
    }
    drop(chunk);
    let write_secs = t.elapsed().as_secs_f64() - encode_secs;
    let written = written_bytes()
        .zip(written0)
        .map(|(a, b)| a.saturating_sub(b));
    let on_disk = dir_bytes(dir.path());
    let rss_backlog = proc_status("VmHWM:");
    let rss_stored = proc_status("VmRSS:");
    // A restart with the backlog: what opening it costs in memory.
    drop(outbox);
    // Resets VmHWM, so that the peak printed for the reopened store is its own.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    let (outbox, report) = Outbox::open(&path, settings, metrics).expect("reopen");
    let reopen_secs = t.elapsed().as_secs_f64();
    assert_eq!(report.records, records as u64);
    let rss_reopened = proc_status("VmRSS:");

    let t = Instant::now();
    let mut buf = Vec::with_capacity(DRAIN_BATCH);
    let mut drained = 0;
    loop {
        buf.clear();
        outbox
            .read_after(Priority::Low, None, DRAIN_BATCH, &mut buf)
            .expect("read");
        if buf.is_empty() {
            break;
        }
        let keys: Vec<_> = buf.iter().map(|s| s.key).collect();
        drained += outbox.remove(&keys).expect("remove");
    }
    outbox.flush_blocking().expect("flush");
    let drain_secs = t.elapsed().as_secs_f64();
    assert_eq!(drained, records);
    let rss_drained = proc_status("VmRSS:");
    let peak_reopened = proc_status("VmHWM:");
    let after_drain = dir_bytes(dir.path());
    // Space a store returns only in the background shows up a little later.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after_drain_later = dir_bytes(dir.path());

    println!("outbox bench: {records} readings, batches of {batch}, flush per batch (durability = \"batch\")");
    println!(
        "  durable writes : {:>10.0} records/s ({:.2} s)",
        records as f64 / write_secs,
        write_secs
    );
    println!(
        "  drain          : {:>10.0} records/s (read {DRAIN_BATCH}, remove; {:.2} s)",
        records as f64 / drain_secs,
        drain_secs
    );
    println!(
        "  payload        : {:>10} bytes ({:.1} per record, encoded)",
        payload,
        payload as f64 / records as f64
    );
    println!(
        "  body           : {:>10} bytes ({:.1} per record, postcard without the 5-byte header)",
        body,
        body as f64 / records as f64
    );
    println!(
        "  on disk        : {:>10} bytes = {:.2} per payload byte, {:.2} per body byte, {:.0} per record (directory size with the backlog)",
        on_disk,
        on_disk as f64 / payload as f64,
        on_disk as f64 / body as f64,
        on_disk as f64 / records as f64
    );
    match written {
        Some(w) if w > 0 => println!(
            "  written        : {:>10} bytes = {:.2} per payload byte, {:.0} per record (/proc/self/io)",
            w,
            w as f64 / payload as f64,
            w as f64 / records as f64
        ),
        _ => println!("  written        : not available (/proc/self/io write_bytes)"),
    }
    if let Some(w) = written.filter(|w| *w > 0) {
        println!(
            "  per commit     : {:>10} bytes written per group commit ({commits} commits)",
            w / commits.max(1)
        );
    }
    println!(
        "  RSS            : {:>10} KiB before, {} KiB with the backlog stored (peak {} KiB, VmHWM of the whole bench process)",
        rss_before / 1024,
        rss_stored / 1024,
        rss_backlog / 1024,
    );
    println!(
        "  reopened       : {:>10} KiB RSS after opening the backlog ({reopen_secs:.2} s), {} KiB after draining it, peak {} KiB from the reopen on",
        rss_reopened / 1024,
        rss_drained / 1024,
        peak_reopened / 1024,
    );
    println!(
        "  after drain    : {:>10} bytes on disk ({:.1} % of the backlog's), {} bytes 2 s later",
        after_drain,
        after_drain as f64 * 100.0 / on_disk.max(1) as f64,
        after_drain_later,
    );
}
