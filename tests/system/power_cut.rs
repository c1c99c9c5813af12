//! Power cuts: the real agent under steady load, its `data_dir` on LazyFS (tests/lazyfs), cut
//! again and again. A cut is a SIGKILL of the agent followed by LazyFS's `clear-cache`, which
//! drops every write the agent did not fsync, as losing power would; then the agent is
//! started again and must come up on its own.
//!
//! Each reading identifies itself: device `pc-<d>`, value = its sequence number on that device.
//! The local broker keeps, for the agent's persistent session, every reading the agent did not
//! acknowledge, so a reading published (and acknowledged by the local broker to the publisher)
//! that never reaches the cloud was acknowledged by the agent and then lost.
//!
//! - `"batch"` durability: 0 lost.
//! - `"interval"` durability: at most `flush_interval_ms` worth of acknowledged readings per cut,
//!   plus one group commit (see [`interval_bound`]).
//! - Harder cases, in `"batch"`: a second cut during start-up recovery; cuts during a cloud
//!   outage with a growing backlog; torn writes (LazyFS's `torn-op` and `torn-seq` faults on the
//!   store's files); cuts while the byte cap drops the oldest telemetry (the newest survive,
//!   with no hole); cuts while a rule bundle is applied (the agent starts on the old or the new
//!   one, and on the new one if the cloud was told it was applied); cuts while a command is
//!   accepted (it reaches the device once and ends, never forgotten).
//!
//! Knobs (environment): `POWER_CUT_CUTS` (cuts per test, default 20; the outage, byte-cap and
//! torn-write tests do half as many), `POWER_CUT_RATE` (readings per second over all devices,
//! default 1000), `POWER_CUT_TORN_MATCH` (the torn-write faults go on the files under the outbox
//! directory whose path contains this; default: every file), `LAZYFS_BIN`, `LAZYFS_CACHE_SIZE`
//! (default 512mb). The tests run one at a time. A long run by hand:
//!
//! ```text
//! POWER_CUT_CUTS=200 cargo test -p edgestream-agent --test power_cut -- --nocapture
//! ```

#[path = "common/mod.rs"]
mod common;
#[path = "lazyfs_mount.rs"]
mod lazyfs;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::{CloudCollector, Mosquitto};
use lazyfs::{files_under, LazyFs};
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Devices publishing; the rate is shared between them.
const DEVICES: usize = 10;
/// The agent's commit linger (`outbox.commit_linger_ms`, its default).
const LINGER_MS: u64 = 16;
/// `outbox.flush_interval_ms` in the `"interval"` test.
const FLUSH_INTERVAL_MS: u64 = 500;
/// How long the agent runs under load between two cuts.
const LIFE_MS: Range<u64> = 500..2000;
/// Longest a restart may take to be subscribed again.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The log line that says the agent is subscribed on the local broker (ready for readings).
const READY_LINE: &str = "subscribed to local topics";

/// One test at a time: each mounts its own LazyFS and runs two brokers and the agent, and the
/// interval bound is computed from wall-clock rates.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn cuts() -> usize {
    env_or("POWER_CUT_CUTS", 20)
}

fn rate() -> f64 {
    env_or("POWER_CUT_RATE", 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Load: readings whose value is their sequence number per device, QoS 1, at a steady rate.

struct Load {
    client: AsyncClient,
    stop: Arc<AtomicBool>,
    sent: Arc<Vec<AtomicU64>>,
    acked: Arc<AtomicU64>,
    link_errors: Arc<AtomicU64>,
    publisher: tokio::task::JoinHandle<()>,
    events: tokio::task::JoinHandle<()>,
    started: Instant,
}

/// What the load published; every reading was acknowledged by the local broker.
struct Published {
    per_device: Vec<u64>,
    total: u64,
    /// Readings per second, measured.
    rate: f64,
}

impl Load {
    fn start(port: u16, devices: usize, rate: f64) -> Load {
        let mut opts =
            MqttOptions::new(format!("pc-load-{}", std::process::id()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Vec<AtomicU64>> = Arc::new((0..devices).map(|_| AtomicU64::new(0)).collect());
        let acked = Arc::new(AtomicU64::new(0));
        let link_errors = Arc::new(AtomicU64::new(0));
        let events = {
            let acked = acked.clone();
            let link_errors = link_errors.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            link_errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let publisher = {
            let client = client.clone();
            let stop = stop.clone();
            let sent = sent.clone();
            let ts0 = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            // One reading per device per round.
            let round = Duration::from_secs_f64(devices as f64 / rate);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(round);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for (d, n) in sent.iter().enumerate() {
                        let seq = n.load(Ordering::Relaxed);
                        let payload = format!(r#"{{"value":{seq},"ts":{}}}"#, ts0 + seq);
                        client
                            .publish(
                                format!("sensors/pc-{d}/level"),
                                QoS::AtLeastOnce,
                                false,
                                payload,
                            )
                            .await
                            .expect("queue a reading");
                        n.store(seq + 1, Ordering::Relaxed);
                    }
                }
            })
        };
        Load {
            client,
            stop,
            sent,
            acked,
            link_errors,
            publisher,
            events,
            started: Instant::now(),
        }
    }

    /// Stops publishing and waits until the local broker acknowledged every reading.
    async fn stop(self) -> Published {
        self.stop.store(true, Ordering::Relaxed);
        self.publisher.await.expect("publisher task");
        let elapsed = self.started.elapsed();
        let per_device: Vec<u64> = self
            .sent
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let total: u64 = per_device.iter().sum();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked.load(Ordering::Relaxed) < total {
            assert!(
                Instant::now() < deadline,
                "the local broker acknowledged {} of {total} readings",
                self.acked.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            self.link_errors.load(Ordering::Relaxed),
            0,
            "the load's link to the local broker broke: resent readings would blur the count"
        );
        let _ = self.client.disconnect().await;
        self.events.abort();
        Published {
            per_device,
            total,
            rate: total as f64 / elapsed.as_secs_f64(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What reached the cloud.

struct Received {
    /// Distinct readings: (device index, value).
    unique: HashSet<(usize, u64)>,
    arrivals: usize,
    /// Outbox sequence numbers that reached the cloud carrying two different readings: the
    /// store handed out a number again after a cut, and a consumer that drops duplicates by
    /// sequence number would drop a real reading.
    seq_reused: usize,
}

fn received(collector: &CloudCollector) -> Received {
    let mut unique = HashSet::new();
    let mut by_seq: HashMap<u64, (usize, u64)> = HashMap::new();
    let mut arrivals = 0;
    let mut seq_reused = 0;
    for r in collector.telemetry_readings() {
        let Some(d) = r["device"]
            .as_str()
            .and_then(|s| s.strip_prefix("pc-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(v) = r["value"].as_f64() else {
            continue;
        };
        arrivals += 1;
        let id = (d, v as u64);
        unique.insert(id);
        if let Some(seq) = r["seq"].as_u64() {
            if let Some(prev) = by_seq.insert(seq, id) {
                if prev != id {
                    seq_reused += 1;
                }
            }
        }
    }
    Received {
        unique,
        arrivals,
        seq_reused,
    }
}

/// Waits until `want` distinct readings reached the cloud, or nothing new arrived for `quiet`.
async fn settle(collector: &CloudCollector, want: usize, quiet: Duration) -> Received {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = 0;
    let mut since = Instant::now();
    loop {
        let r = received(collector);
        if r.unique.len() >= want || since.elapsed() > quiet || Instant::now() > deadline {
            return r;
        }
        if r.unique.len() != last {
            last = r.unique.len();
            since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The cut loop.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Durability {
    Batch,
    Interval,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CutKind {
    /// SIGKILL, then `clear-cache`.
    Plain,
    /// Also a second cut shortly after the restart, while it may still be recovering.
    DuringStartup,
    /// A torn write: LazyFS persists part of one write (`torn-op`) or the second of two
    /// writes without the first (`torn-seq`) on a file of the store, then kills itself.
    Torn,
}

struct Plan {
    gateway: &'static str,
    durability: Durability,
    cuts: usize,
    kind: CutKind,
    /// The cloud broker is down during the whole cut loop, so the backlog only grows.
    outage: bool,
    /// `outbox.max_bytes`, when the test needs the byte cap to drop the oldest telemetry.
    max_bytes: Option<u64>,
    /// Readings per second over all devices.
    rate: f64,
    /// How long the load runs before the first cut.
    fill: Duration,
}

impl Plan {
    fn new(gateway: &'static str, durability: Durability, cuts: usize, kind: CutKind) -> Plan {
        Plan {
            gateway,
            durability,
            cuts,
            kind,
            outage: false,
            max_bytes: None,
            rate: rate(),
            fill: Duration::ZERO,
        }
    }
}

#[derive(Debug, Default)]
struct Figures {
    published: u64,
    /// Readings published per device (values `0..n`).
    per_device: Vec<u64>,
    rate: f64,
    received: usize,
    arrivals: usize,
    lost: Vec<(usize, u64)>,
    seq_reused: usize,
    cuts: usize,
    /// Cuts that landed before the restarted agent was ready (`DuringStartup`).
    startup_cuts: usize,
    /// Torn-write faults that fired (LazyFS killed itself on a store write).
    torn_fired: usize,
    torn_injected: usize,
    restarts: usize,
    restarts_ready: usize,
    /// Per life, the downtime (kill to ready) of the restart that started it, in ms.
    downtimes_ms: Vec<u64>,
    /// Per restart, the backlog the agent reported on opening the store (`agent built`).
    recovered: Vec<u64>,
    /// Restarts whose log mentions a store moved aside or corrupt data.
    store_complaints: usize,
    /// What those complaints said (one line of each kind).
    complaint_kinds: Vec<String>,
    /// LazyFS's cache in use at the end, percent.
    cache_usage: f64,
    elapsed: Duration,
}

/// The value of `field=` in the last line of `logs` containing `needle`.
fn log_field(logs: &str, needle: &str, field: &str) -> Option<u64> {
    let line = logs.lines().rev().find(|l| l.contains(needle))?;
    let line: String = strip_ansi(line);
    let at = line.find(&format!("{field}="))? + field.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
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

/// Waits until the agent logged [`READY_LINE`]; the reason when it did not.
async fn wait_ready(agent: &mut AgentProcess) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if agent.logs().contains(READY_LINE) {
            return Ok(());
        }
        if !agent.is_running() {
            return Err(format!(
                "the agent exited before it was ready\n{}",
                agent.logs()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the agent was not ready within {READY_TIMEOUT:?}\n{}",
                agent.logs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The files the torn-write faults go on: every file under the outbox directory whose path
/// contains `POWER_CUT_TORN_MATCH` (all of them by default), as LazyFS names them.
fn torn_targets(fs: &LazyFs, outbox: &Path) -> Vec<PathBuf> {
    let pattern = std::env::var("POWER_CUT_TORN_MATCH").unwrap_or_default();
    files_under(outbox)
        .into_iter()
        .filter(|p| {
            p.strip_prefix(outbox)
                .is_ok_and(|rel| rel.to_string_lossy().contains(&pattern))
        })
        .map(|p| fs.fault_path(&p))
        .collect()
}

/// Field order is drop order: the agent goes before the mount it has files open on.
struct Harness {
    agent: AgentProcess,
    fs: LazyFs,
    agent_dir: PathBuf,
    data_dir: PathBuf,
    config: String,
    figures: Figures,
}

impl Harness {
    /// The agent was killed: the power cut, then a restart on the same data directory.
    async fn cut_and_restart(&mut self, kind: CutKind) {
        // The local broker queues for the agent from its kill, just before this.
        let down_since = Instant::now();
        match kind {
            CutKind::Torn => {
                // LazyFS has killed itself (a torn fault fired) or still runs; either way,
                // unmounting drops its cache: the cut.
                self.fs.remount();
            }
            _ => self.fs.power_cut(),
        }
        self.figures.cuts += 1;
        self.start_agent();
        if kind == CutKind::DuringStartup {
            // Cut again while it opens the store and recovers, before it is ready: at a random
            // point of the time the last restart took to be ready.
            let last = self
                .figures
                .downtimes_ms
                .last()
                .copied()
                .unwrap_or(0)
                .max(5);
            let wait = rand::rng().random_range(0..last);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if !self.agent.logs().contains(READY_LINE) {
                self.agent.kill();
                self.fs.power_cut();
                self.figures.cuts += 1;
                self.figures.startup_cuts += 1;
                self.start_agent();
            }
        }
        // A restart cut before it was ready does not count: this one is given the time.
        self.figures.restarts += 1;
        match wait_ready(&mut self.agent).await {
            Ok(()) => self.figures.restarts_ready += 1,
            Err(why) => panic!(
                "restart {} after a power cut failed ({} of {} came up before): {why}",
                self.figures.restarts,
                self.figures.restarts_ready,
                self.figures.restarts - 1
            ),
        }
        self.figures
            .downtimes_ms
            .push(down_since.elapsed().as_millis() as u64);
        let logs = self.agent.logs();
        if let Some(n) = log_field(&logs, "agent built", "backlog") {
            self.figures.recovered.push(n);
        }
        let complaints: Vec<&str> = logs
            .lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("moved aside") || l.contains("corrupt")
            })
            .collect();
        if !complaints.is_empty() {
            self.figures.store_complaints += 1;
            // The first complaint of each kind, for the report.
            for c in complaints {
                let c = strip_ansi(c);
                let what = c
                    .split_once(": ")
                    .map_or(c.as_str(), |(_, m)| m)
                    .to_string();
                if !self.figures.complaint_kinds.contains(&what) {
                    self.figures.complaint_kinds.push(what);
                }
            }
        }
    }

    fn start_agent(&mut self) {
        self.agent = AgentProcess::start(&self.agent_dir, &self.config);
    }
}

async fn run(plan: Plan) -> Figures {
    let _one_at_a_time = SERIAL.lock().await;
    let started = Instant::now();
    // A short base path: LazyFS's fault commands name files by path, in at most 99 bytes.
    let base = tempfile::Builder::new()
        .prefix("pc")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let cache = std::env::var("LAZYFS_CACHE_SIZE").unwrap_or_else(|_| "512mb".into());
    let fs = LazyFs::mount(base.path(), &cache);
    let local = Mosquitto::start().await.expect("local broker");
    let mut cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", plan.gateway)
        .await
        .expect("collector");
    let data_dir = fs.mnt.join("d");
    let mut outbox = match plan.durability {
        Durability::Batch => "[outbox]\ndurability = \"batch\"\n".to_string(),
        Durability::Interval => format!(
            "[outbox]\ndurability = \"interval\"\nflush_interval_ms = {FLUSH_INTERVAL_MS}\n"
        ),
    };
    if let Some(cap) = plan.max_bytes {
        outbox.push_str(&format!("max_bytes = {cap}\n"));
    }
    let config = config_toml(
        plan.gateway,
        &data_dir,
        local.port(),
        cloud.port(),
        "",
        &outbox,
    );
    let agent_dir = base.path().join("agent");
    let agent = AgentProcess::start(&agent_dir, &config);
    let mut h = Harness {
        fs,
        agent_dir,
        data_dir,
        config,
        agent,
        figures: Figures::default(),
    };
    h.figures.restarts = 1;
    // The first start creates the agent's persistent session on the local broker; from then on
    // the broker keeps for it whatever it did not acknowledge.
    wait_ready(&mut h.agent).await.expect("first start");
    h.figures.restarts_ready = 1;
    h.figures.downtimes_ms.push(0);
    if plan.outage {
        cloud.stop().await.expect("stop the cloud broker");
    }
    let load = Load::start(local.port(), DEVICES, plan.rate);
    tokio::time::sleep(plan.fill).await;
    let mut rng = rand::rng();
    while h.figures.cuts < plan.cuts {
        let life = rng.random_range(LIFE_MS);
        if plan.kind == CutKind::Torn {
            // Arm the faults part-way into the life, so that the store has files to tear.
            tokio::time::sleep(Duration::from_millis(life / 2)).await;
            let targets = torn_targets(&h.fs, &h.data_dir.join("outbox"));
            for (i, t) in targets.iter().enumerate() {
                let cmd = if (h.figures.cuts + i) % 2 == 0 {
                    format!("lazyfs::torn-op::file={}::parts=2::persist=1", t.display())
                } else {
                    format!(
                        "lazyfs::torn-seq::op=write::file={}::persist=2",
                        t.display()
                    )
                };
                if !h.fs.send(&cmd) {
                    break; // an earlier fault already fired
                }
                // One command per read of LazyFS's FIFO.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            h.figures.torn_injected += 1;
            let deadline = Instant::now() + Duration::from_millis(life / 2);
            while h.fs.is_alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !h.fs.is_alive() {
                h.figures.torn_fired += 1;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(life)).await;
            assert!(
                h.agent.is_running(),
                "the agent died on its own\n{}",
                h.agent.logs()
            );
        }
        h.agent.kill();
        h.cut_and_restart(plan.kind).await;
    }
    // Keep the load on a little after the last restart, then stop it: every reading published
    // is then acknowledged by the local broker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = load.stop().await;
    if plan.outage {
        cloud.restart().await.expect("restart the cloud broker");
    }
    let got = settle(&collector, published.total as usize, Duration::from_secs(8)).await;
    let mut lost = Vec::new();
    for (d, &n) in published.per_device.iter().enumerate() {
        for v in 0..n {
            if !got.unique.contains(&(d, v)) {
                lost.push((d, v));
            }
        }
    }
    assert_eq!(
        collector.overflowed(),
        0,
        "the collector overflowed: the count is incomplete"
    );
    h.agent.terminate(Duration::from_secs(15));
    let cache_usage = h.fs.cache_usage();
    assert!(
        cache_usage < 80.0,
        "LazyFS's cache is {cache_usage}% full: past full, writes go straight to disk and \
         survive a cut, so the count under-reports loss; raise LAZYFS_CACHE_SIZE"
    );
    let mut f = std::mem::take(&mut h.figures);
    f.cache_usage = cache_usage;
    h.fs.unmount();
    f.published = published.total;
    f.per_device = published.per_device.clone();
    f.rate = published.rate;
    f.received = got.unique.len();
    f.arrivals = got.arrivals;
    f.seq_reused = got.seq_reused;
    f.lost = lost;
    f.elapsed = started.elapsed();
    eprintln!(
        "power cut [{} {:?} {:?}{}]: {} cuts ({} during start-up, {} torn of {} armed), \
         {}/{} restarts ready (downtime {}..{} ms), published {} at {:.0}/s, cloud got {} \
         distinct ({} arrivals), lost {}, outbox seq reused {}, backlog recovered per restart \
         {}, restarts with store complaints {} {:?}, LazyFS cache {:.1}% used, took {:?}",
        plan.gateway,
        plan.durability,
        plan.kind,
        if plan.outage { " outage" } else { "" },
        f.cuts,
        f.startup_cuts,
        f.torn_fired,
        f.torn_injected,
        f.restarts_ready,
        f.restarts,
        f.downtimes_ms.iter().skip(1).min().unwrap_or(&0),
        f.downtimes_ms.iter().max().unwrap_or(&0),
        f.published,
        f.rate,
        f.received,
        f.arrivals,
        f.lost.len(),
        f.seq_reused,
        summary(&f.recovered),
        f.store_complaints,
        f.complaint_kinds,
        f.cache_usage,
        f.elapsed,
    );
    f
}

/// `min..max (0 on n of m)` of the backlogs recovered at each restart.
fn summary(recovered: &[u64]) -> String {
    let zero = recovered.iter().filter(|&&n| n == 0).count();
    format!(
        "{}..{} (0 on {zero} of {})",
        recovered.iter().min().unwrap_or(&0),
        recovered.iter().max().unwrap_or(&0),
        recovered.len()
    )
}

fn assert_nothing_lost(f: &Figures) {
    assert_eq!(
        f.restarts_ready, f.restarts,
        "not every restart came up on its own"
    );
    assert!(
        f.published > 1000,
        "too little load to prove anything: {} readings",
        f.published
    );
    let mut by_device: HashMap<usize, Vec<u64>> = HashMap::new();
    for &(d, v) in &f.lost {
        by_device.entry(d).or_default().push(v);
    }
    let mut sample: Vec<_> = by_device.into_iter().collect();
    sample.sort();
    let sample: Vec<String> = sample
        .iter()
        .map(|(d, vs)| {
            format!(
                "pc-{d}: {} lost, first {:?}",
                vs.len(),
                &vs[..vs.len().min(5)]
            )
        })
        .collect();
    assert!(
        f.lost.is_empty(),
        "{} of {} acknowledged readings never reached the cloud after {} power cuts \
         (backlog the agent recovered per restart: {})\n{}",
        f.lost.len(),
        f.published,
        f.cuts,
        summary(&f.recovered),
        sample.join("\n")
    );
    assert_eq!(
        f.seq_reused, 0,
        "outbox sequence numbers were handed out again after a cut"
    );
}

/// What `"interval"` may lose: for each cut, the readings the agent may have acknowledged in
/// the last `flush_interval_ms` before it (plus the commit linger, during which a group is
/// gathered before its acknowledgement), plus one group; and, when the cut came soon after a
/// restart, the backlog the local broker kept during the downtime before it, which the agent
/// takes in a burst on restart. Readings per second are the measured publish rate.
fn interval_bound(f: &Figures) -> u64 {
    let per_ms = f.rate / 1000.0;
    let group = (per_ms * LINGER_MS as f64).ceil() as u64;
    f.downtimes_ms
        .iter()
        .take(f.cuts)
        .map(|&down| (per_ms * (FLUSH_INTERVAL_MS + LINGER_MS + down) as f64).ceil() as u64 + group)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_durability_loses_nothing_acknowledged_across_power_cuts() {
    let f = run(Plan::new(
        "gw-pc-batch",
        Durability::Batch,
        cuts(),
        CutKind::Plain,
    ))
    .await;
    assert_nothing_lost(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_loses_at_most_its_window_per_power_cut() {
    let f = run(Plan::new(
        "gw-pc-interval",
        Durability::Interval,
        cuts(),
        CutKind::Plain,
    ))
    .await;
    assert_eq!(
        f.restarts_ready, f.restarts,
        "not every restart came up on its own"
    );
    assert!(f.published > 1000, "too little load: {}", f.published);
    let bound = interval_bound(&f);
    eprintln!(
        "interval: lost {} of {} over {} cuts; bound {} ({} ms window + {} ms linger per cut \
         at {:.0}/s, plus one group and each restart's backlog)",
        f.lost.len(),
        f.published,
        f.cuts,
        bound,
        FLUSH_INTERVAL_MS,
        LINGER_MS,
        f.rate
    );
    assert!(
        f.lost.len() as u64 <= bound,
        "\"interval\" lost {} acknowledged readings over {} cuts, more than its window allows \
         ({bound})",
        f.lost.len(),
        f.cuts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_during_start_up_recovery_loses_nothing_acknowledged() {
    let f = run(Plan::new(
        "gw-pc-startup",
        Durability::Batch,
        cuts(),
        CutKind::DuringStartup,
    ))
    .await;
    assert!(
        f.startup_cuts > 0,
        "no cut landed before the agent was ready: the case was not exercised"
    );
    assert_nothing_lost(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_during_a_cloud_outage_lose_nothing_from_the_backlog() {
    let f = run(Plan {
        outage: true,
        ..Plan::new(
            "gw-pc-outage",
            Durability::Batch,
            (cuts() / 2).max(1),
            CutKind::Plain,
        )
    })
    .await;
    assert_nothing_lost(&f);
    assert!(
        f.recovered.iter().any(|&n| n >= 1000),
        "the agent never reported a backlog of thousands of readings on restart: {:?}",
        f.recovered
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_writes_on_the_store_lose_nothing_acknowledged() {
    // Half the cuts: each one remounts LazyFS (about 2 s).
    let f = run(Plan::new(
        "gw-pc-torn",
        Durability::Batch,
        (cuts() / 2).max(1),
        CutKind::Torn,
    ))
    .await;
    assert!(
        f.torn_fired > 0,
        "no torn-write fault fired on the store's files ({} armed)",
        f.torn_injected
    );
    assert_nothing_lost(&f);
}

/// A rule bundle alerting on `pc-*` devices, at version `version`.
fn bundle(version: u64) -> serde_json::Value {
    serde_json::json!({
        "v": 1,
        "version": version,
        "rules": format!(
            "rule high_{version}\n  on device \"pc-*\"\n  when level > {}\n  alert warning \"high\"\n",
            1_000_000 + version
        ),
        "rollback": false,
    })
}

/// Whether the cloud got a `rules/status` saying `version` was applied.
fn reported_applied(collector: &CloudCollector, version: u64) -> bool {
    collector
        .payloads_on("rules/status")
        .iter()
        .any(|p| p["version"] == version && p["state"] == "applied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_while_a_rule_bundle_is_applied_leaves_the_old_or_the_new_one() {
    let _one_at_a_time = SERIAL.lock().await;
    let base = tempfile::Builder::new()
        .prefix("pc")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let mut fs = LazyFs::mount(base.path(), "256mb");
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-pc-rules")
        .await
        .expect("collector");
    let config = config_toml(
        "gw-pc-rules",
        &fs.mnt.join("d"),
        local.port(),
        cloud.port(),
        "",
        "",
    );
    let agent_dir = base.path().join("agent");
    let mut agent = AgentProcess::start(&agent_dir, &config);
    wait_ready(&mut agent).await.expect("first start");
    assert!(wait_online(&collector).await, "{}", agent.logs());
    let load = Load::start(local.port(), DEVICES, rate() / 4.0);
    let mut rng = rand::rng();
    let mut running = 0;
    let (mut old_after_cut, mut new_after_cut, mut redelivered) = (0, 0, 0);
    let rounds = cuts().max(1);
    for version in 1..=rounds as u64 {
        collector
            .publish("rules/set", &bundle(version), false)
            .await
            .expect("publish a bundle");
        // Around the time the agent takes to check, persist and swap a bundle.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        let applied_before_cut = reported_applied(&collector, version);
        agent.kill();
        fs.power_cut();
        agent = AgentProcess::start(&agent_dir, &config);
        if let Err(why) = wait_ready(&mut agent).await {
            panic!("restart after cut {version} failed: {why}");
        }
        let logs = agent.logs();
        assert!(
            !logs.contains("persisted rule bundle unreadable")
                && !logs.contains("persisted rule bundle no longer compiles"),
            "cut {version}: the persisted bundle was broken\n{logs}"
        );
        let after = log_field(&logs, "agent built", "rules_version")
            .unwrap_or_else(|| panic!("no rules_version in the start-up log\n{logs}"));
        assert!(
            after == running || after == version,
            "cut {version}: the agent started on bundle {after}, neither the old ({running}) \
             nor the new ({version})"
        );
        if applied_before_cut {
            assert_eq!(
                after, version,
                "cut {version}: the cloud was told the bundle was applied, and the agent \
                 started on {after} after the cut"
            );
        }
        if after == version {
            new_after_cut += 1;
        } else {
            old_after_cut += 1;
            // The cloud broker redelivers the bundle the agent had not acknowledged; one that
            // was acknowledged and not kept would never be applied.
            assert!(
                collector
                    .wait_for(
                        |m| m.iter().any(|m| m.topic.ends_with("/rules/status")
                            && m.payload["version"] == version
                            && m.payload["state"] == "applied"),
                        Duration::from_secs(20),
                    )
                    .await,
                "cut {version}: the bundle was neither kept nor applied after the restart \
                 (acknowledged to the cloud broker, then lost)\n{}",
                agent.logs()
            );
            redelivered += 1;
        }
        running = version;
    }
    let published = load.stop().await;
    agent.terminate(Duration::from_secs(15));
    drop(agent);
    fs.unmount();
    eprintln!(
        "rule bundles: {rounds} cuts while applying; started on the new bundle {new_after_cut} \
         times, on the old one {old_after_cut} (then applied on redelivery {redelivered}); \
         {} readings published meanwhile",
        published.total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_while_the_byte_cap_drops_the_oldest_keep_the_newest_without_a_hole() {
    // The smallest cap the agent accepts, filled during a cloud outage; the cuts come while
    // every new group makes room by dropping the oldest telemetry.
    let f = run(Plan {
        outage: true,
        max_bytes: Some(1 << 20),
        rate: rate() * 2.0,
        fill: Duration::from_secs(10),
        ..Plan::new("gw-pc-cap", Durability::Batch, cuts() / 2, CutKind::Plain)
    })
    .await;
    assert_eq!(
        f.restarts_ready, f.restarts,
        "not every restart came up on its own"
    );
    assert!(
        !f.lost.is_empty(),
        "the cap dropped nothing ({} readings published): the case was not exercised",
        f.published
    );
    // A store that loses what it held at each cut also leaves only a newest run; what tells
    // them apart is how much was kept: a reading here counts well under 100 bytes, so a full
    // 1 MiB cap holds more than 10,000 of them.
    assert!(
        f.received >= 10_000,
        "only {} readings reached the cloud after the outage, far less than the 1 MiB cap \
         holds: the cuts lost what the cap had kept",
        f.received
    );
    // What the cap drops is the oldest: per device, the readings that never reached the cloud
    // are exactly its first ones, and everything after them arrived.
    let mut lost: Vec<Vec<u64>> = vec![Vec::new(); f.per_device.len()];
    for &(d, v) in &f.lost {
        lost[d].push(v);
    }
    for (d, vs) in lost.iter_mut().enumerate() {
        vs.sort_unstable();
        let hole = vs.iter().enumerate().find(|&(i, &v)| v != i as u64);
        assert!(
            hole.is_none(),
            "pc-{d}: reading {} lost while older ones arrived: a cut lost acknowledged \
             readings the cap had kept ({} of {} lost on this device)",
            hole.map_or(0, |h| *h.1),
            vs.len(),
            f.per_device[d]
        );
    }
    eprintln!(
        "byte cap: {} of {} readings dropped as the oldest, newest {} kept across {} cuts",
        f.lost.len(),
        f.published,
        f.received,
        f.cuts
    );
}

const COMMANDS: &str = r#"
[commands]
reply_timeout_ms = 30000

[[commands.allow]]
name = "set_position"
devices = ["valve-*"]
args.percent = { type = "number", min = 0, max = 100, required = true }
"#;

/// Outcome states the cloud got for command `id`, in arrival order.
fn outcome_states(collector: &CloudCollector, id: &str) -> Vec<String> {
    collector
        .outcomes()
        .iter()
        .filter(|o| o["id"] == id)
        .map(|o| o["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_while_a_command_is_accepted_neither_forgets_nor_repeats_it() {
    use edgestream_sim::{
        CommandBehavior, MetricSpec, MqttDevice, MqttDeviceConfig, Profile, Signal,
    };

    let _one_at_a_time = SERIAL.lock().await;
    let base = tempfile::Builder::new()
        .prefix("pc")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let mut fs = LazyFs::mount(base.path(), "256mb");
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-pc-cmd")
        .await
        .expect("collector");
    // A slow actuator: it answers 300 ms after a command, so cuts land before, between and
    // after the acceptance and the reply.
    let mut valve = MqttDeviceConfig::new(
        "valve-1",
        vec![MetricSpec::new(
            "position",
            Signal::new(Profile::Constant(10.0), 0.0, 3),
        )],
        2.0,
    );
    valve.commands = CommandBehavior::SucceedAfter(Duration::from_millis(300));
    let mut valve = MqttDevice::spawn("127.0.0.1", local.port(), valve);
    let config = config_toml(
        "gw-pc-cmd",
        &fs.mnt.join("d"),
        local.port(),
        cloud.port(),
        "",
        COMMANDS,
    );
    let agent_dir = base.path().join("agent");
    let mut agent = AgentProcess::start(&agent_dir, &config);
    wait_ready(&mut agent).await.expect("first start");
    assert!(wait_online(&collector).await, "{}", agent.logs());
    assert!(valve.wait_connected(Duration::from_secs(10)).await);
    let mut rng = rand::rng();
    let rounds = cuts().max(1);
    let (mut accepted_before_cut, mut succeeded_before_cut) = (0, 0);
    for i in 0..rounds {
        let id = format!("c-{i}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let cmd = serde_json::json!({"v": 1, "id": id, "device": "valve-1",
            "name": "set_position", "args": {"percent": i % 100},
            "issued_at": now, "expires_at": now + 300_000});
        collector
            .publish("commands", &cmd, false)
            .await
            .expect("publish a command");
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        let before = outcome_states(&collector, &id);
        if before.iter().any(|s| s == "accepted") {
            accepted_before_cut += 1;
        }
        if before.iter().any(|s| s == "succeeded") {
            succeeded_before_cut += 1;
        }
        agent.kill();
        fs.power_cut();
        agent = AgentProcess::start(&agent_dir, &config);
        if let Err(why) = wait_ready(&mut agent).await {
            panic!("restart after cut {i} failed: {why}");
        }
        // Accepted before the cut or not yet received (the cloud broker redelivers what the
        // agent did not acknowledge): either way it must end, once.
        let ended = collector
            .wait_for(
                |m| {
                    m.iter().any(|m| {
                        m.topic.ends_with("/commands/outcomes")
                            && m.payload["id"] == id.as_str()
                            && m.payload["state"] != "accepted"
                    })
                },
                // Longer than `reply_timeout_ms`: a command whose reply was lost ends in a timeout.
                Duration::from_secs(40),
            )
            .await;
        assert!(
            ended,
            "command {id} (outcomes before the cut: {before:?}) never ended after the cut: \
             forgotten\n{}",
            agent.logs()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received: HashMap<String, usize> = HashMap::new();
    for c in valve.commands() {
        *received
            .entry(c["id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for i in 0..rounds {
        let id = format!("c-{i}");
        let states = outcome_states(&collector, &id);
        assert_eq!(
            received.get(&id).copied().unwrap_or(0),
            1,
            "command {id} reached the device {} times (outcomes {states:?})",
            received.get(&id).copied().unwrap_or(0)
        );
        assert!(
            states.iter().any(|s| s == "succeeded")
                && !states.iter().any(|s| s != "accepted" && s != "succeeded"),
            "command {id}: outcomes {states:?}"
        );
    }
    agent.terminate(Duration::from_secs(15));
    drop(agent);
    valve.stop().await;
    fs.unmount();
    eprintln!(
        "commands: {rounds} cuts; accepted before the cut {accepted_before_cut}, succeeded \
         before the cut {succeeded_before_cut}; every command reached the device once and \
         succeeded"
    );
}
