//! Outages (issue 5): the cloud broker unreachable for longer than the linger while devices
//! keep publishing; and a long outage against a small byte cap.

#[path = "common/mod.rs"]
mod common;
#[path = "outbox_support.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::{CloudCollector, FaultProxy, Mosquitto};
use support::*;

const T0: u64 = 1_700_000_000_000;
const BATCH: usize = 50; // config_toml's cloud.batch_size

/// The value of `field=` in the last log line containing `needle`.
fn log_field(logs: &str, needle: &str, field: &str) -> Option<f64> {
    let line = logs.lines().rev().find(|l| l.contains(needle))?;
    let line = strip_ansi(line);
    let at = line.find(&format!("{field}="))? + field.len() + 1;
    line[at..]
        .split(|c: char| c.is_whitespace())
        .next()?
        .parse()
        .ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_from_an_outage_is_delivered_in_order_while_new_data_keeps_flowing() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-out")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        "gw-out",
        &dir.path().join("data"),
        local.port(),
        proxy.port(),
        "",
        "",
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    let mut devices = fleet(local.port(), "out", 4, 100.0);
    assert!(devices.wait_connected(Duration::from_secs(10)).await);
    assert!(
        collector
            .wait_for_readings(4 * BATCH, Duration::from_secs(20))
            .await,
        "nothing delivered before the outage\n{}",
        agent.logs()
    );

    proxy.cut();
    let cut_at = Instant::now();
    let before = collector.telemetry_readings().len();
    // The outage itself: 3 s at 400 readings/s is ~24 batches, 60 lingers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        collector.telemetry_readings().len() <= before + 10 * BATCH,
        "readings kept arriving through a cut link"
    );
    proxy.restore();
    agent
        .wait_log("backlog drained", Duration::from_secs(30))
        .await;
    let logs = agent.logs();
    let backlog = log_field(&logs, "connected to cloud broker", "backlog").unwrap_or(0.0);
    let drained = log_field(&logs, "backlog drained", "records").unwrap_or(0.0);
    let per_sec = log_field(&logs, "backlog drained", "per_sec").unwrap_or(0.0);
    assert!(
        backlog >= (3 * BATCH) as f64,
        "backlog at reconnect was only {backlog} records ({drained} drained)\n{logs}"
    );
    // New data kept flowing through the drain and after it.
    let after_drain = collector.telemetry_readings().len();
    assert!(
        collector
            .wait_for_readings(after_drain + 2 * BATCH, Duration::from_secs(10))
            .await
    );
    devices.stop().await;
    assert!(
        wait_all_acked_delivered(&collector, &devices, Duration::from_secs(30)).await,
        "acknowledged readings missing after the outage\n{}",
        agent.logs()
    );
    let d = delivery(&collector);
    assert_acked_delivered_in_order(&devices, &d);
    // Peak resident memory of the agent process over its whole life, from the kernel.
    let rss = edgestream_sim::procstat::ProcessStats::read(agent.pid()).peak_rss_bytes;
    eprintln!(
        "outage: {:?} cut, backlog {backlog} records at reconnect, drained {drained} in \
         {:?} s at {per_sec} records/s, {} acked readings delivered, agent peak RSS {} KiB",
        cut_at.elapsed(),
        log_field(&logs, "backlog drained", "secs"),
        devices.stats().acked,
        rss / 1024
    );
    assert!(rss > 0 && rss < 64 << 20, "agent RSS {rss} bytes");
    agent.terminate(Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_oldest_telemetry_keeps_alerts_stays_near_its_cap_and_counts_drops() {
    const CAP: u64 = 1 << 20;
    /// Records take less on disk than the cap counts; the files hold besides them at most the
    /// acknowledged part of one segment per priority (64 KiB each at this cap) and the 8 KiB
    /// acknowledgement file: the documented margin, two segments, with room to spare.
    const DISK_MARGIN: u64 = 256 << 10;
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    proxy.cut();
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-full")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = config_toml(
        "gw-full",
        &data,
        local.port(),
        proxy.port(),
        OVERHEAT_RULES,
        &format!("[outbox]\nmax_bytes = {CAP}\n"),
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;

    // The oldest records: 5 raise/clear cycles of the overheat alert (10 alerts).
    let mut alerts_in = Vec::new();
    for c in 0..5u64 {
        let t = T0 + c * 100_000;
        alerts_in.push(sample("boiler-1", "temperature", 85.0, t));
        alerts_in.push(sample("boiler-1", "temperature", 85.0, t + 31_000));
        alerts_in.push(sample("boiler-1", "temperature", 70.0, t + 32_000));
    }
    publish_samples(local.port(), &alerts_in).await;
    // Then telemetry worth about twice the cap.
    let telemetry: Vec<Sample> = (0..44_000u64)
        .map(|i| sample(&format!("fill-{}", i % 4), "temperature", i as f64, T0 + i))
        .collect();
    let disk_max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (disk_max, path) = (disk_max.clone(), data.join("outbox"));
        tokio::spawn(async move {
            loop {
                disk_max.fetch_max(dir_bytes(&path), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for chunk in telemetry.chunks(4000) {
        publish_samples(local.port(), chunk).await;
    }
    // Let the agent take in what the local broker still holds for it. While full, every
    // group it stores logs "outbox full" (the directory size says nothing: it stays near the
    // cap while records come and go), so ingestion is over once that count stops growing for
    // a second. Restoring earlier would let drops hit records already in flight, which are
    // then both delivered and counted as dropped.
    agent.wait_log("outbox full", Duration::from_secs(30)).await;
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = agent.logs().matches("outbox full").count();
        if n == last {
            break;
        }
        last = n;
    }
    proxy.restore();

    let all: Vec<Sample> = alerts_in.iter().chain(telemetry.iter()).cloned().collect();
    // Every alert survives the drops.
    assert!(
        collector
            .wait_for(
                |m| m.iter().filter(|m| m.topic.ends_with("/alerts")).count() >= 10,
                Duration::from_secs(30)
            )
            .await,
        "alerts lost: {:?}\n{}",
        collector.alerts(),
        agent.logs()
    );
    // The delivered count plus the reported drops account for every reading.
    let ok = collector
        .wait_for(
            |m| {
                let dropped = m
                    .iter()
                    .rev()
                    .find(|m| m.topic.ends_with("/health"))
                    .and_then(|h| h.payload["counters"]["outbox_dropped_full"].as_u64())
                    .unwrap_or(0);
                let mut seqs = std::collections::HashSet::new();
                for m in m.iter().filter(|m| m.topic.ends_with("/telemetry")) {
                    for r in m.payload["readings"].as_array().into_iter().flatten() {
                        seqs.insert((r["device"].as_str().map(str::to_string), r["ts"].as_u64()));
                    }
                }
                dropped > 0 && seqs.len() as u64 + dropped == all.len() as u64
            },
            Duration::from_secs(60),
        )
        .await;
    sampler.abort();
    let health = collector.payloads_on("health");
    let dropped = health
        .last()
        .and_then(|h| h["counters"]["outbox_dropped_full"].as_u64())
        .unwrap_or(0);
    let cloud = cloud_readings(&collector.telemetry_readings());
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<_> = cloud
        .iter()
        .filter(|r| seen.insert((r.0.clone(), r.3)))
        .collect();
    assert!(
        ok,
        "{} delivered + {dropped} dropped != {} published\n{}",
        unique.len(),
        all.len(),
        agent.logs()
    );
    // What was dropped is the oldest telemetry: per device, the delivered readings are the
    // newest ones, in order.
    let mut published: HashMap<&str, Vec<(f64, u64)>> = HashMap::new();
    for s in &all {
        published
            .entry(&s.device)
            .or_default()
            .push((s.value, s.ts));
    }
    let mut got: HashMap<&str, Vec<(f64, u64)>> = HashMap::new();
    for r in &unique {
        got.entry(r.0.as_str()).or_default().push((r.2, r.3));
    }
    for (device, p) in &published {
        let g = got.get(device).cloned().unwrap_or_default();
        assert!(
            p.ends_with(&g),
            "device {device}: delivered readings are not the newest {} of {}",
            g.len(),
            p.len()
        );
    }
    // The summary reports the drops by reason, matching the counter.
    let last = health.last().cloned().unwrap_or_default();
    assert_eq!(
        last["summary"]["dropped"]["outbox_full"].as_u64(),
        Some(dropped)
    );
    assert_eq!(last["summary"]["dropped"]["outbox_age"].as_u64(), Some(0));
    let disk = disk_max.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "full: cap {CAP} B, {} published, {dropped} dropped (outbox_dropped_full), {} delivered, \
         peak outbox dir {disk} B ({:.1}x cap)",
        all.len(),
        unique.len(),
        disk as f64 / CAP as f64
    );
    assert!(
        disk <= CAP + DISK_MARGIN,
        "outbox directory reached {disk} bytes with a cap of {CAP}"
    );
    agent.terminate(Duration::from_secs(15));
}

/// `outbox.max_age_secs`: telemetry that waited out an outage longer than the limit is dropped
/// (oldest first) instead of sent, counted by reason in the health message, and what is fresh
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_older_than_the_age_limit_is_dropped_and_reported_by_reason() {
    const MAX_AGE: u64 = 5;
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    proxy.cut();
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-age")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        "gw-age",
        &dir.path().join("data"),
        local.port(),
        proxy.port(),
        "",
        &format!("[outbox]\nmax_age_secs = {MAX_AGE}\n"),
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    let stale: Vec<Sample> = (0..100u64)
        .map(|i| sample("old-1", "temperature", i as f64, T0 + i))
        .collect();
    publish_samples(local.port(), &stale).await;
    // Stored within a second; then let it grow older than the limit while the cloud is away.
    tokio::time::sleep(Duration::from_secs(MAX_AGE + 2)).await;
    proxy.restore();
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/health")),
                Duration::from_secs(20)
            )
            .await,
        "never online: {}",
        agent.logs()
    );
    let fresh: Vec<Sample> = (0..100u64)
        .map(|i| sample("new-1", "temperature", i as f64, T0 + 1_000 + i))
        .collect();
    publish_samples(local.port(), &fresh).await;
    assert!(
        wait_unique_readings(&collector, fresh.len(), Duration::from_secs(20)).await,
        "{}",
        agent.logs()
    );
    let reported = |h: &serde_json::Value| {
        (
            h["counters"]["outbox_dropped_age"].as_u64(),
            h["summary"]["dropped"]["outbox_age"].as_u64(),
            h["summary"]["dropped"]["outbox_full"].as_u64(),
        )
    };
    let n = stale.len() as u64;
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/health")
                    && reported(&m.payload) == (Some(n), Some(n), Some(0))),
                Duration::from_secs(10)
            )
            .await,
        "health never reported {n} dropped for age: {:?}",
        collector.payloads_on("health").last().map(reported)
    );
    let cloud = cloud_readings(&collector.telemetry_readings());
    assert!(
        cloud.iter().all(|r| r.0 == "new-1"),
        "stale telemetry was delivered"
    );
    assert_all_delivered_in_order(&fresh, &cloud);
    assert!(agent
        .logs()
        .contains("telemetry older than the outbox age limit dropped"));
    agent.terminate(Duration::from_secs(15));
}

/// A field of `/proc/{pid}/status` in bytes (`VmHWM`: peak resident memory; `RssAnon`:
/// resident heap and stacks, without the binary's own pages).
fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with(field))?.to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

/// Records the outbox in `data` holds, by `edgestream outbox verify` (the agent stopped).
fn stored_records(bin: &str, data: &std::path::Path) -> u64 {
    let out = std::process::Command::new(bin)
        .args(["outbox", "verify", "--data-dir"])
        .arg(data)
        .output()
        .expect("run outbox verify");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("total: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The agent binary `bin` running on `dir/edgestream.toml`, with its peak memory sampled.
struct Sampled {
    child: std::process::Child,
    log: std::path::PathBuf,
    anon_max: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sampled {
    fn start(bin: &str, dir: &std::path::Path, config: &str) -> Sampled {
        let path = dir.join("edgestream.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("agent-{}.log", now_nanos()));
        let child = std::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn edgestream");
        let anon_max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (pid, max) = (child.id(), anon_max.clone());
        std::thread::spawn(move || loop {
            let v = proc_status(pid, "RssAnon:");
            if v == 0 {
                return;
            }
            max.fetch_max(v, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        });
        Sampled {
            child,
            log,
            anon_max,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "agent exited\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (peak RSS, peak anonymous RSS) over the process's life, then a graceful stop.
    fn stop(mut self) -> (u64, u64) {
        let peak = proc_status(self.child.id(), "VmHWM:");
        let anon = self
            .anon_max
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(proc_status(self.child.id(), "RssAnon:"));
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "no graceful stop\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (peak, anon)
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Bounded memory with a large backlog: 2,000,000 readings (`OUTBOX_BACKLOG_READINGS`
/// overrides it) stored while the cloud is down, the agent restarted with that backlog, the
/// backlog drained. Peak RSS stays under 16 MiB in every phase, and the data directory is back
/// under 10 % of its peak within a minute of the drain ending. Takes a few minutes:
///
/// `cargo build --release -p edgestream-agent --bin edgestream`, then
/// `OUTBOX_BACKLOG_AGENT=$CARGO_TARGET_DIR/release/edgestream cargo test -p edgestream-agent
/// --test outbox_outage -- --ignored --nocapture a_large_backlog`.
///
/// Without `OUTBOX_BACKLOG_AGENT` the test build's binary runs; its unoptimised code alone
/// takes about 19 MiB resident, so only its anonymous memory (heap and stacks, what a backlog
/// could grow) is held to the limit then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a few minutes; run by name"]
async fn a_large_backlog_is_stored_reopened_and_drained_in_bounded_memory_and_disk() {
    const RSS_MAX: u64 = 16 << 20;
    let n: u64 = std::env::var("OUTBOX_BACKLOG_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let release = std::env::var("OUTBOX_BACKLOG_AGENT").ok();
    let bin = release
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_edgestream").to_string());
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = config_toml("gw-big", &data, local.port(), proxy.port(), "", "");
    let mut agent = Sampled::start(&bin, dir.path(), &cfg);
    agent
        .wait_log("subscribed to local topics", Duration::from_secs(20))
        .await;
    let t = Instant::now();
    let chunk = 20_000u64;
    for start in (0..n).step_by(chunk as usize) {
        let samples: Vec<Sample> = (start..(start + chunk).min(n))
            .map(|i| sample(&format!("dev-{}", i % 16), "temperature", i as f64, T0 + i))
            .collect();
        publish_samples(local.port(), &samples).await;
    }
    // Stop gracefully (everything handed over is stored) until every reading is in.
    let (mut store_rss, mut store_anon) = (0, 0);
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (peak, anon) = agent.stop();
        store_rss = store_rss.max(peak);
        store_anon = store_anon.max(anon);
        let stored = stored_records(&bin, &data);
        if stored >= n {
            break;
        }
        tries += 1;
        assert!(tries < 20, "only {stored} of {n} readings stored");
        agent = Sampled::start(&bin, dir.path(), &cfg);
        agent
            .wait_log("subscribed to local topics", Duration::from_secs(20))
            .await;
    }
    let store_secs = t.elapsed().as_secs_f64();
    let peak_disk = dir_bytes(&data.join("outbox"));
    // Restart with the backlog, the cloud back: it drains.
    proxy.restore();
    let t = Instant::now();
    let mut agent = Sampled::start(&bin, dir.path(), &cfg);
    agent
        .wait_log("backlog drained", Duration::from_secs(1800))
        .await;
    let drain_secs = t.elapsed().as_secs_f64();
    let drained_at = Instant::now();
    let mut disk = dir_bytes(&data.join("outbox"));
    while disk * 10 >= peak_disk && drained_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        disk = dir_bytes(&data.join("outbox"));
    }
    let disk_after = drained_at.elapsed();
    let (drain_rss, drain_anon) = agent.stop();
    eprintln!(
        "large backlog ({}): {n} readings stored in {store_secs:.0} s, peak RSS {} KiB \
         (anonymous {} KiB); directory {peak_disk} bytes; restart + drain {drain_secs:.0} s, \
         peak RSS {} KiB (anonymous {} KiB); directory {disk} bytes ({:.1} % of its peak) \
         {:.1} s after the drain",
        if release.is_some() {
            bin.as_str()
        } else {
            "test build"
        },
        store_rss / 1024,
        store_anon / 1024,
        drain_rss / 1024,
        drain_anon / 1024,
        disk as f64 * 100.0 / peak_disk as f64,
        disk_after.as_secs_f64()
    );
    assert!(
        store_anon < RSS_MAX && drain_anon < RSS_MAX,
        "anonymous memory over the limit"
    );
    if release.is_some() {
        assert!(
            store_rss < RSS_MAX,
            "peak RSS {store_rss} storing the backlog"
        );
        assert!(
            drain_rss < RSS_MAX,
            "peak RSS {drain_rss} reopening and draining it"
        );
    }
    assert!(
        disk * 10 < peak_disk,
        "directory {disk} bytes after the drain, peak {peak_disk}"
    );
}
