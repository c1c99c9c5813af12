//! `edgestream bench`: an end-to-end load benchmark that needs nothing installed.
//!
//! ```text
//!  load generator --QoS 1--> local broker --> bare subscriber            (phase 1: the limit)
//!  load generator --QoS 1--> local mosquitto ==bridge==> cloud broker --> bare subscriber
//!                                             (mosquitto only: its bridge, fixed rate, flat out)
//!  load generator --QoS 1--> local broker --> agent --QoS 1--> cloud broker --> cloud counter
//!                                             (phases 2 and 3: fixed rate, then flat out)
//! ```
//!
//! The brokers (two in-process rumqttd, or two spawned mosquitto), the load generator and the
//! subscribers run in this process; the agent runs as a **child process** (the `edgestream`
//! binary's `run` command: the one that started the bench, or `--agent`), so that its CPU
//! time, resident memory and disk writes are read from its own `/proc/PID/{stat,status,io}`
//! and not mixed with the load it is measured under.
//!
//! - Phase 1 (**limit**): the load, flat out, straight to a bare subscriber on the local broker
//!   at the same QoS. That is what the broker and this machine can deliver to one consumer;
//!   the agent's throughput is read as a ratio to it.
//! - With `--broker mosquitto`, the **bridge** phases: the same load, at `--rate` and then flat
//!   out, forwarded by mosquitto's own bridge (`topic sensors/# out QOS`) from a second local
//!   mosquitto to the cloud broker. The agent's throughput is also read as a ratio to it, and
//!   its CPU per reading as a ratio to the bridging mosquitto's, phase for phase: at the same
//!   offered rate, and flat out.
//! - Phase 2 (**latency**): the agent at a fixed rate (`--rate`, default 10,000 readings/s).
//!   Latency is cloud arrival time minus the reading's `ts`, stamped by the load generator when
//!   it writes the reading (millisecond timestamps: figures may read up to 1 ms high).
//! - Phase 3 (**flat out**): the agent with the load as fast as the local broker takes it;
//!   sustained readings/s delivered to the cloud (first distinct arrival of each `seq`).
//!
//! - `--soak SECONDS` replaces the three phases with one long run at `--rate`, sampled every
//!   `--soak-every` seconds: readings/s, p99 latency, CPU, resident memory, outbox depth and
//!   the store's size on disk. A leak shows as a second half higher than the first.
//!
//! The first second of each phase is warm-up and not counted. Load devices publish QoS 1
//! readings `{"value":..,"ts":..}` on `sensors/dev-NNN/{temperature|vibration}`; the agent runs
//! [`BENCH_RULES`] (20 rules over every device), or the bundle `--rules FILE` gives (an empty
//! file for none), with the durable outbox (`durability = "batch"`: every group is flushed
//! before its PUBACKs; `--durability interval` flushes every second instead, to compare what
//! reaches the disk).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentChild;
use crate::procstat::{self, MachineTicks, ProcessStats};
use crate::wire::{self, Incoming};

/// Twenty rules over every bench device: thresholds with hysteresis, window aggregates and
/// anomaly detectors on both metrics. None drops or tags readings, so every reading is
/// delivered and the count at the cloud is the count sent.
pub const BENCH_RULES: &str = r#"
rule hot_1
  on device "dev-*"
  when temperature > 85 for 2s
  clear when temperature < 80
  alert warning "hot"
rule hot_2
  on device "dev-*"
  when temperature > 88
  alert critical "very hot"
rule hot_3
  on device "dev-0*"
  when temperature > 86 for 1s
  alert info "warm zone 0"
rule hot_4
  on device "dev-1*"
  when temperature > 87 for 500ms
  alert info "warm zone 1"
rule cold
  on device "dev-*"
  when temperature < 51
  clear when temperature > 55
  alert info "cold"
rule avg_high
  on device "dev-*"
  when avg(temperature, 64) > 90
  alert warning "average high"
rule avg_time
  on device "dev-*"
  when avg(temperature, 10s) > 95
  alert warning "average high over 10 s"
rule spread
  on device "dev-*"
  when max(temperature, 100) - min(temperature, 100) > 60
  alert warning "wide spread"
rule stddev_high
  on device "dev-*"
  when stddev(temperature, 100) > 30
  alert warning "unstable"
rule zscore_vib
  on device "dev-*"
  when zscore(vibration, 128) > 6
  alert warning "vibration z-score"
rule mad_vib
  on device "dev-*"
  when mad_outlier(vibration, 64, 6)
  alert warning "vibration spike"
rule ewma_dev_vib
  on device "dev-*"
  when ewma_dev(vibration, 0.1) > 5
  alert info "vibration drift"
rule p95_vib
  on device "dev-*"
  when percentile(vibration, 95, 256) > 100
  alert warning "vibration p95"
rule median_vib
  on device "dev-*"
  when median(vibration, 64) > 50
  alert warning "vibration median"
rule ewma_temp
  on device "dev-*"
  when ewma(temperature, 0.2) > 95
  alert warning "smoothed temperature high"
rule rate_temp
  on device "dev-*"
  when rate(temperature) > 100000
  alert warning "temperature jump"
rule vib_missing
  on device "dev-*"
  when missing(vibration, 30s)
  alert warning "vibration silent"
rule temp_flat
  on device "dev-*"
  when flatline(temperature, 1m)
  alert warning "temperature stuck"
rule combined
  on device "dev-*"
  when temperature > 85 and vibration > 20
  alert critical "hot and shaking"
rule count_flood
  on device "dev-*"
  when count(temperature, 10s) > 100000
  alert warning "flood"
"#;

const GATEWAY: &str = "bench-gw";
/// Warm-up at the start of each phase, not counted.
const WARMUP: Duration = Duration::from_secs(1);
/// Unacknowledged QoS 1 publishes per load connection.
const LOAD_WINDOW: usize = 200;
/// Flat out: readings written and not yet delivered, at most (see [`Load::start`]).
const MAX_IN_TRANSIT: u64 = 20_000;
/// Publishes written per socket write in flat-out mode.
const LOAD_BURST: usize = 64;
/// Longest wait for the agent to subscribe, and for a phase's backlog to drain.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Latency samples kept (one per reading in the latency phase, up to this).
const MAX_LATENCY_SAMPLES: usize = 2_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// Two rumqttd brokers inside this process (nothing installed).
    InProcess,
    /// Two mosquitto processes (`/usr/sbin/mosquitto` or `$MOSQUITTO_BIN`).
    Mosquitto,
}

/// The agent's `outbox.durability`: flush every group commit before its PUBACKs, or flush
/// every [`FLUSH_INTERVAL_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    Batch,
    Interval,
}

impl Durability {
    /// The value `outbox.durability` takes in the agent's config.
    fn as_str(self) -> &'static str {
        match self {
            Durability::Batch => "batch",
            Durability::Interval => "interval",
        }
    }
}

/// What to run; see `edgestream bench --help`. The agent settings left out (`None`) are
/// left out of its config too, so that the agent's own defaults apply.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BenchOptions {
    /// Seconds of the flat-out phase; the limit and latency phases take half as long each.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    #[arg(long, value_enum, default_value_t = BrokerKind::InProcess)]
    pub broker: BrokerKind,
    /// Simulated devices (each publishes `temperature` and `vibration` alternately).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Rule bundle for the agent (a rules file; an empty file runs it without rules).
    /// Default: the built-in 20 rules. The bench counts every reading at the cloud, so a
    /// bundle with `drop` or `forward ... every` rules is refused.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// TCP connections the devices share (the load generator's cost, not the agent's).
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Readings/s of the latency phase.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// QoS of the local subscriptions (agent and bare subscriber): 0 or 1.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// mosquitto only: `max_inflight_messages` of the local broker (0 = unlimited; Debian's
    /// default is 20).
    #[arg(long, default_value_t = 0)]
    pub local_max_inflight: u32,
    /// Agent `cloud.batch_size` (default: the agent's).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Agent `cloud.max_inflight` (default: the agent's).
    #[arg(long)]
    pub cloud_inflight: Option<u16>,
    /// Agent `outbox.durability` (`interval` flushes every 1,000 ms: what the README's disk
    /// figures at gateway rates compare).
    #[arg(long, value_enum, default_value_t = Durability::Batch)]
    pub durability: Durability,
    /// Agent `outbox.commit_linger_ms` (default: the agent's): how long a group commit may
    /// wait for more readings to share its flush. Longer writes less and costs less CPU at
    /// gateway rates, for that much more latency. The agent refuses a value out of its range.
    #[arg(long)]
    pub commit_linger_ms: Option<u64>,
    /// The `edgestream` binary to run as the agent; by default the one that runs the bench. A
    /// gateway runs a build without the `tools` feature (`scripts/cross-build`, the .deb),
    /// which has about 1 MiB less code resident than the binary `bench` itself lives in.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<std::path::PathBuf>,
    /// Soak instead of the three phases: the agent at `--rate` for this many seconds,
    /// sampled every `--soak-every` seconds (readings/s delivered, p99 latency, resident
    /// memory, outbox depth, the store's size on disk), to show what grows with time. The
    /// phase's p99 is then the highest of the samples'. 0: no soak.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub soak: u64,
    /// Seconds between soak samples.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub soak_every: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The agent's `outbox.flush_interval_ms` (used with `--durability interval`).
const FLUSH_INTERVAL_MS: u64 = 1000;

/// One sample of a soak (`--soak`): the interval since the sample before it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakSample {
    /// Seconds since the soak's load started (after the warm-up).
    pub at_s: f64,
    /// Readings/s delivered to the cloud over the interval.
    pub delivered_per_s: f64,
    /// p99 latency over the interval.
    pub latency_p99_ms: Option<f64>,
    /// Agent CPU microseconds per reading delivered over the interval.
    pub agent_cpu_us_per_reading: f64,
    /// Of which in the kernel ([`PhaseResult::agent_cpu_system_us_per_reading`]).
    pub agent_cpu_system_us_per_reading: f64,
    /// Agent resident memory at the sample.
    pub agent_rss_bytes: u64,
    /// Records in the outbox at the sample (`edgestream_outbox_records`).
    pub outbox_records: f64,
    /// The outbox store's size on disk at the sample (`edgestream_outbox_disk_bytes`).
    pub outbox_disk_bytes: f64,
    /// The hypervisor's steal over the interval, in cores ([`PhaseResult::machine_steal_cores`]):
    /// over a long soak it shows when the host was contended.
    pub machine_steal_cores: Option<f64>,
}

/// Figures of one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseResult {
    pub name: String,
    /// Readings/s the load generator had acknowledged by the local broker.
    pub offered_per_s: f64,
    /// Readings/s delivered to the bare subscriber or to the cloud.
    pub delivered_per_s: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    /// Agent CPU seconds per million delivered readings (= microseconds per reading).
    pub agent_cpu_us_per_reading: Option<f64>,
    /// The part of [`Self::agent_cpu_us_per_reading`] spent in the kernel (the process's
    /// `stime`): system calls, the network stack, waking other threads. On a virtual machine
    /// this is the part that grows most when the host is contended (each wake-up of an idle
    /// vCPU goes through the hypervisor); the part in user space moves less.
    pub agent_cpu_system_us_per_reading: Option<f64>,
    /// Agent CPU use over the phase, in cores.
    pub agent_cpu_cores: Option<f64>,
    /// Bytes the agent wrote to storage per delivered reading.
    pub agent_disk_bytes_per_reading: Option<f64>,
    /// Highest agent RSS sampled after warm-up.
    pub agent_peak_rss_bytes: Option<u64>,
    /// Highest agent RSS sampled in the phase's second half: its steady state, once the step
    /// in load at the phase's start (flat out begins with a burst of 20,000 readings in
    /// transit) has settled.
    pub agent_steady_rss_bytes: Option<u64>,
    /// The local broker's CPU seconds per million delivered readings, when it runs as a process
    /// of its own (mosquitto): what the broker spends on each reading it takes and delivers.
    pub local_broker_cpu_us_per_reading: Option<f64>,
    /// The local broker's CPU use over the phase, in cores (mosquitto only).
    pub local_broker_cpu_cores: Option<f64>,
    /// Cores busy on the whole machine over the phase (`/proc/stat`: everything but idle and
    /// I/O wait): brokers, load, subscribers and agent together. Well under the machine's
    /// cores means the phase was bound by something other than CPU (a window, a wait).
    pub machine_busy_cores: Option<f64>,
    /// Cores' worth of time the hypervisor gave to other guests while this machine's vCPUs
    /// had work (`/proc/stat`'s steal; counted in [`Self::machine_busy_cores`] too). On a
    /// shared host it tells a contended hour, in which every CPU figure of the run reads
    /// higher: other guests also take the caches and memory bandwidth. `None` where the
    /// kernel does not account steal (bare metal reads 0).
    pub machine_steal_cores: Option<f64>,
    /// [`Self::agent_cpu_us_per_reading`] split by the agent's threads, by name: the tokio
    /// runtime (`tokio-rt-worker`: sources, rules, uplink, sled inserts and reads), sled's
    /// own I/O pool (`sled-io`: log writes and flushes), `main`; `exited` is the rest of the
    /// process's time: threads that ended during the phase, give or take the process
    /// total's rounding to a tick (10 ms over the phase).
    pub agent_cpu_us_per_reading_by_thread: std::collections::BTreeMap<String, f64>,
}

/// The agent's CPU per reading against mosquitto's bridge's in the matching phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuAgainstBridge {
    /// `agent_us_per_reading / bridge_us_per_reading`: below 1, the agent spends less on a
    /// reading than mosquitto spends bridging it.
    pub ratio: f64,
    /// The agent's CPU microseconds per reading delivered.
    pub agent_us_per_reading: f64,
    /// The bridging mosquitto's CPU microseconds per reading delivered (the whole process:
    /// taking each reading from the devices and forwarding it).
    pub bridge_us_per_reading: f64,
}

impl CpuAgainstBridge {
    /// From the agent's phase and the bridge's; none unless both CPU figures were measured
    /// and the bridge's is above zero.
    fn new(agent: &PhaseResult, bridge: &PhaseResult) -> Option<CpuAgainstBridge> {
        let bridge_us = bridge
            .local_broker_cpu_us_per_reading
            .filter(|us| *us > 0.0)?;
        let agent_us = agent.agent_cpu_us_per_reading?;
        Some(CpuAgainstBridge {
            ratio: agent_us / bridge_us,
            agent_us_per_reading: agent_us,
            bridge_us_per_reading: bridge_us,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub cores: usize,
    pub rules: usize,
    pub phases: Vec<PhaseResult>,
    /// Agent flat-out throughput over the bare subscriber's.
    pub agent_to_limit_ratio: f64,
    /// Agent flat-out throughput over mosquitto's bridge's (`--broker mosquitto` only).
    pub agent_to_bridge_ratio: Option<f64>,
    /// Agent CPU per reading against the bridging mosquitto's, both at `--rate`
    /// (`--broker mosquitto` only): the figure CPU is judged by.
    pub agent_to_bridge_cpu_at_rate: Option<CpuAgainstBridge>,
    /// The same flat out, where each delivers at its own rate (`--broker mosquitto` only).
    pub agent_to_bridge_cpu_flat_out: Option<CpuAgainstBridge>,
    /// `VmHWM` of the agent over the whole run.
    pub agent_vm_hwm_bytes: u64,
    pub agent_rss_at_end_bytes: u64,
    /// `/proc/loadavg` (1 min) at the start and the end: anything else running on the machine
    /// takes its cores from the brokers, the load and the agent.
    pub load_average: [f64; 2],
    /// From the agent's own Prometheus endpoint at the end: readings per outbox flush (group
    /// commit size; 0 without flushes, as with `--durability interval`), readings
    /// per cloud publish, and cloud payload bytes per reading.
    pub agent_readings_per_flush: f64,
    /// The agent's outbox flushes over the whole run (`edgestream_outbox_flushes_total`).
    pub agent_outbox_flushes: f64,
    pub agent_readings_per_publish: f64,
    pub agent_uplink_bytes_per_reading: f64,
    /// The agent's counters at the end (Prometheus names), to see where a stall sits.
    pub agent_counters: std::collections::BTreeMap<String, f64>,
    /// The samples of a soak (`--soak`); empty otherwise.
    pub soak: Vec<SoakSample>,
}

fn load_average() -> f64 {
    procstat::load_average().unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch: the readings' `ts`, as a device stamps them.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch: when a subscriber received a reading.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A reading's latency in microseconds: received at `now_us`, stamped `ts_ms`.
fn latency_us(now_us: u64, ts_ms: u64) -> u32 {
    now_us.saturating_sub(ts_ms * 1000).min(u32::MAX as u64) as u32
}

/// Runs the bench with `agent_exe` as the agent (unless `--agent` names another) and prints
/// its report.
pub fn main(opts: BenchOptions, agent_exe: PathBuf) -> anyhow::Result<()> {
    // The brokers log every disconnect; the bench's output is its report.
    crate::init_logging("error,rumqttd=off");
    if opts.qos > 1 {
        anyhow::bail!("--qos must be 0 or 1");
    }
    if opts.devices == 0 || opts.connections == 0 || opts.connections > opts.devices {
        anyhow::bail!("need 1 <= --connections <= --devices");
    }
    if opts.soak > 0 && opts.soak_every == 0 {
        anyhow::bail!("--soak-every must be at least 1 second");
    }
    if let Some(agent) = opts.agent.as_ref().filter(|a| !a.is_file()) {
        anyhow::bail!("--agent {}: no such file", agent.display());
    }
    let mut bundle = Bundle::load(&opts)?;
    bundle.agent = opts.agent.clone().unwrap_or(agent_exe);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(run(opts.clone(), bundle))?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Holds whichever brokers were started; they stop when dropped (mosquitto) or with the
/// process (rumqttd).
enum Brokers {
    InProcess(crate::InProcessBroker, crate::InProcessBroker),
    Mosquitto(Box<(crate::Mosquitto, crate::Mosquitto)>),
}

impl Brokers {
    fn ports(&self) -> (u16, u16) {
        match self {
            Brokers::InProcess(l, c) => (l.port(), c.port()),
            Brokers::Mosquitto(b) => (b.0.port(), b.1.port()),
        }
    }

    /// The local broker's process, when it is one (mosquitto; rumqttd runs in this process).
    fn local_pid(&self) -> Option<u32> {
        match self {
            Brokers::InProcess(..) => None,
            Brokers::Mosquitto(b) => b.0.pid(),
        }
    }
}

/// mosquitto's own default, which Debian's packaged config keeps: the in-memory database is
/// saved every 30 minutes. The test harness saves it every second (its restart tests need
/// that), and mosquitto, single-threaded, stops serving while it writes and syncs the file:
/// with the agent's session queue in it, that put 250-450 ms stalls into the bench's latency.
const DEBIAN_AUTOSAVE: &str = "autosave_interval 1800";

/// The local mosquitto's settings beyond the test harness's defaults.
fn local_mosquitto_config(opts: &BenchOptions) -> Vec<String> {
    vec![
        format!("max_inflight_messages {}", opts.local_max_inflight),
        DEBIAN_AUTOSAVE.to_string(),
    ]
}

async fn start_brokers(opts: &BenchOptions) -> anyhow::Result<Brokers> {
    Ok(match opts.broker {
        BrokerKind::InProcess => Brokers::InProcess(
            crate::InProcessBroker::start().await?,
            crate::InProcessBroker::start().await?,
        ),
        BrokerKind::Mosquitto => {
            let local = crate::Mosquitto::start_with(crate::MosquittoOptions {
                tls: None,
                extra_config: local_mosquitto_config(opts),
            })
            .await?;
            let cloud = crate::Mosquitto::start_with(crate::MosquittoOptions {
                tls: None,
                extra_config: vec![DEBIAN_AUTOSAVE.to_string()],
            })
            .await?;
            Brokers::Mosquitto(Box::new((local, cloud)))
        }
    })
}

async fn run(opts: BenchOptions, bundle: Bundle) -> anyhow::Result<BenchReport> {
    let load_at_start = load_average();
    let brokers = start_brokers(&opts).await.context("starting brokers")?;
    let (local_port, cloud_port) = brokers.ports();
    if opts.soak > 0 {
        return soak(opts, &bundle, brokers, load_at_start).await;
    }
    let half = Duration::from_secs((opts.duration / 2).max(3));
    let full = Duration::from_secs(opts.duration.max(3));
    let mut phases = Vec::new();

    // Phase 1: the broker's own limit.
    let limit = PhaseResult {
        name: "broker limit (bare subscriber)".into(),
        ..bare_phase(
            &opts,
            local_port,
            local_port,
            half,
            None,
            brokers.local_pid(),
        )
        .await?
    };
    phases.push(limit.clone());

    // Phase 1b (mosquitto): the same load through mosquitto's own bridge, at the rate and flat
    // out, before the agent starts, so that nothing else runs beside it.
    let bridge = match &brokers {
        Brokers::Mosquitto(_) => {
            let b = bridge_phases(&opts, cloud_port, half)
                .await
                .context("measuring mosquitto's bridge")?;
            phases.extend([b.at_rate.clone(), b.flat_out.clone()]);
            Some(b)
        }
        Brokers::InProcess(..) => None,
    };

    let c = Cloud::start(&opts, &bundle, local_port, cloud_port).await?;
    let (agent, cloud) = (&c.agent, &c.cloud);

    // Phase 2: fixed rate, latency.
    let load = Load::start(&opts, local_port, Some(opts.rate), cloud).await?;
    cloud.record_latency(true);
    let lat = measure(
        half,
        &load,
        cloud,
        Some(agent),
        Some(cloud),
        brokers.local_pid(),
    )
    .await;
    cloud.record_latency(false);
    load.stop().await;
    cloud.wait_quiet(DRAIN_TIMEOUT).await;
    phases.push(PhaseResult {
        name: format!("agent at {} readings/s", opts.rate),
        ..lat.clone()
    });

    // Phase 3: flat out.
    let load = Load::start(&opts, local_port, None, cloud).await?;
    let flat = measure(full, &load, cloud, Some(agent), None, brokers.local_pid()).await;
    load.stop().await;
    phases.push(PhaseResult {
        name: "agent flat out".into(),
        ..flat.clone()
    });
    if flat.delivered_per_s < flat.offered_per_s / 100.0 {
        let logs = agent.logs();
        let tail: Vec<&str> = logs.lines().rev().take(20).collect();
        eprintln!("the agent stalled flat out; the end of its log:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    let ratio = flat.delivered_per_s / limit.delivered_per_s.max(1.0);
    let report = Report {
        phases,
        agent_to_limit_ratio: ratio,
        agent_to_bridge_ratio: bridge
            .as_ref()
            .map(|b| flat.delivered_per_s / b.flat_out.delivered_per_s.max(1.0)),
        agent_to_bridge_cpu_at_rate: bridge
            .as_ref()
            .and_then(|b| CpuAgainstBridge::new(&lat, &b.at_rate)),
        agent_to_bridge_cpu_flat_out: bridge
            .as_ref()
            .and_then(|b| CpuAgainstBridge::new(&flat, &b.flat_out)),
        soak: Vec::new(),
        load_at_start,
    };
    report.finish(opts, c, brokers).await
}

/// What a run measured, before the agent's own counters are read.
struct Report {
    phases: Vec<PhaseResult>,
    agent_to_limit_ratio: f64,
    agent_to_bridge_ratio: Option<f64>,
    agent_to_bridge_cpu_at_rate: Option<CpuAgainstBridge>,
    agent_to_bridge_cpu_flat_out: Option<CpuAgainstBridge>,
    soak: Vec<SoakSample>,
    load_at_start: f64,
}

impl Report {
    /// Reads the agent's end figures and counters, stops the agent, the cloud counter and the
    /// brokers, and puts the report together.
    async fn finish(
        self,
        opts: BenchOptions,
        cloud: Cloud,
        brokers: Brokers,
    ) -> anyhow::Result<BenchReport> {
        let Cloud {
            _dir,
            mut agent,
            cloud_stop,
            cloud_task,
            rules_in_bundle,
            ..
        } = cloud;
        let end = ProcessStats::read(agent.pid());
        let counters = match agent.metrics_port() {
            Some(port) => crate::prometheus::scrape_parsed(port).await?,
            None => Default::default(),
        };
        let c = |k: &str| counters.get(k).copied().unwrap_or(0.0);
        let evaluated = c("edgestream_rule_evaluations_total").max(1.0);
        let flushes = c("edgestream_outbox_flushes_total");
        agent.stop(Duration::from_secs(10));
        cloud_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), cloud_task).await;
        drop(brokers);
        Ok(BenchReport {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            rules: rules_in_bundle,
            options: opts,
            phases: self.phases,
            agent_to_limit_ratio: self.agent_to_limit_ratio,
            agent_to_bridge_ratio: self.agent_to_bridge_ratio,
            agent_to_bridge_cpu_at_rate: self.agent_to_bridge_cpu_at_rate,
            agent_to_bridge_cpu_flat_out: self.agent_to_bridge_cpu_flat_out,
            agent_vm_hwm_bytes: end.peak_rss_bytes,
            agent_rss_at_end_bytes: end.rss_bytes,
            load_average: [self.load_at_start, load_average()],
            agent_readings_per_flush: if flushes > 0.0 {
                evaluated / flushes
            } else {
                0.0
            },
            agent_outbox_flushes: flushes,
            agent_readings_per_publish: c("edgestream_uplink_records_sent_total")
                / c("edgestream_uplink_publishes_total").max(1.0),
            agent_uplink_bytes_per_reading: c("edgestream_uplink_bytes_sent_total") / evaluated,
            agent_counters: counters
                .iter()
                .filter(|(k, _)| k.starts_with("edgestream_"))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            soak: self.soak,
        })
    }
}

/// The agent (a child process) and the cloud counter it delivers to.
struct Cloud {
    /// The agent's config and data; removed when dropped.
    _dir: tempfile::TempDir,
    agent: AgentChild,
    cloud: Counter,
    cloud_stop: CancellationToken,
    cloud_task: tokio::task::JoinHandle<()>,
    /// Rules in the agent's bundle, for the report.
    rules_in_bundle: usize,
}

impl Cloud {
    async fn start(
        opts: &BenchOptions,
        bundle: &Bundle,
        local_port: u16,
        cloud_port: u16,
    ) -> anyhow::Result<Cloud> {
        let dir = tempfile::Builder::new()
            .prefix("edgestream-bench-")
            .tempdir()
            .context("temp dir")?;
        let config = write_agent_config(dir.path(), opts, &bundle.text, local_port, cloud_port)?;
        // `EDGESTREAM_BENCH_AGENT_WRAPPER="heaptrack -o /tmp/agent"` runs the agent under a
        // tool for diagnosis; its CPU and memory figures are then the tool's.
        let wrapper = std::env::var("EDGESTREAM_BENCH_AGENT_WRAPPER").ok();
        let mut agent = AgentChild::start(
            &bundle.agent,
            &config,
            &dir.path().join("agent.log"),
            wrapper.as_deref(),
        )?;
        let cloud = Counter::default();
        let cloud_stop = CancellationToken::new();
        let cloud_task = tokio::spawn(cloud_counter(cloud_port, cloud.clone(), cloud_stop.clone()));
        cloud.wait_ready().await?;
        agent.wait_ready(AGENT_READY_TIMEOUT).await?;
        Ok(Cloud {
            _dir: dir,
            agent,
            cloud,
            cloud_stop,
            cloud_task,
            rules_in_bundle: bundle.rules,
        })
    }
}

/// `--soak`: the agent at `--rate` for `--soak` seconds, sampled every `--soak-every`.
/// Latencies are taken per sample, so the bench's own memory stays flat however long it runs.
async fn soak(
    opts: BenchOptions,
    bundle: &Bundle,
    brokers: Brokers,
    load_at_start: f64,
) -> anyhow::Result<BenchReport> {
    let (local_port, cloud_port) = brokers.ports();
    let c = Cloud::start(&opts, bundle, local_port, cloud_port).await?;
    let (agent, cloud) = (&c.agent, &c.cloud);
    let pid = agent.pid();
    let metrics_port = agent
        .metrics_port()
        .context("the agent did not log its metrics endpoint")?;
    let load = Load::start(&opts, local_port, Some(opts.rate), cloud).await?;
    tokio::time::sleep(WARMUP).await;
    cloud.clear_latencies();
    cloud.record_latency(true);
    let t0 = Instant::now();
    let (o0, d0) = (load.acked(), cloud.count());
    let first = ProcessStats::read(pid);
    let m0 = MachineTicks::read();
    let mut prev = (0.0, d0, first);
    let mut prev_ticks = m0;
    let mut samples = Vec::new();
    let length = Duration::from_secs(opts.soak);
    let every = Duration::from_secs(opts.soak_every);
    while t0.elapsed() < length {
        tokio::time::sleep(every.min(length.saturating_sub(t0.elapsed()))).await;
        let at = t0.elapsed().as_secs_f64();
        let d = cloud.count();
        let stats = ProcessStats::read(pid);
        let mut lat = cloud.take_latencies();
        lat.sort_unstable();
        let counters = crate::prometheus::scrape_parsed(metrics_port).await?;
        let gauge = |k: &str| counters.get(k).copied().unwrap_or(0.0);
        let n = (d - prev.1) as f64;
        let ticks = MachineTicks::read();
        let (cpu_us, system_us) = cpu_us_per_reading(&prev.2, &stats, n);
        let sample = SoakSample {
            at_s: at,
            delivered_per_s: n / (at - prev.0).max(1e-3),
            latency_p99_ms: quantile_ms(&lat, 0.99),
            agent_cpu_us_per_reading: cpu_us,
            agent_cpu_system_us_per_reading: system_us,
            agent_rss_bytes: stats.rss_bytes,
            outbox_records: gauge("edgestream_outbox_records"),
            outbox_disk_bytes: gauge("edgestream_outbox_disk_bytes"),
            machine_steal_cores: MachineTicks::cores_between(prev_ticks, ticks, |t| t.steal),
        };
        if !opts.json {
            eprintln!("{}", soak_row(&sample));
        }
        samples.push(sample);
        prev = (at, d, stats);
        prev_ticks = ticks;
    }
    cloud.record_latency(false);
    let secs = t0.elapsed().as_secs_f64();
    let (o1, d1) = (load.acked(), cloud.count());
    load.stop().await;
    let end = ProcessStats::read(pid);
    let m1 = MachineTicks::read();
    let n = (d1 - d0) as f64;
    let (cpu_us, system_us) = cpu_us_per_reading(&first, &end, n);
    let phase = PhaseResult {
        name: format!("agent soak at {} readings/s", opts.rate),
        offered_per_s: (o1 - o0) as f64 / secs,
        delivered_per_s: n / secs,
        latency_p99_ms: samples
            .iter()
            .filter_map(|s| s.latency_p99_ms)
            .reduce(f64::max),
        agent_cpu_us_per_reading: Some(cpu_us),
        agent_cpu_system_us_per_reading: Some(system_us),
        agent_cpu_cores: Some((end.cpu_seconds - first.cpu_seconds) / secs),
        agent_disk_bytes_per_reading: Some(
            end.disk_write_bytes.saturating_sub(first.disk_write_bytes) as f64 / n.max(1.0),
        ),
        agent_peak_rss_bytes: samples.iter().map(|s| s.agent_rss_bytes).max(),
        agent_steady_rss_bytes: samples[samples.len() / 2..]
            .iter()
            .map(|s| s.agent_rss_bytes)
            .max(),
        machine_busy_cores: MachineTicks::cores_between(m0, m1, |t| t.busy),
        machine_steal_cores: MachineTicks::cores_between(m0, m1, |t| t.steal),
        ..PhaseResult::default()
    };
    let report = Report {
        phases: vec![phase],
        agent_to_limit_ratio: 0.0,
        agent_to_bridge_ratio: None,
        agent_to_bridge_cpu_at_rate: None,
        agent_to_bridge_cpu_flat_out: None,
        soak: samples,
        load_at_start,
    };
    report.finish(opts, c, brokers).await
}

const SOAK_HEADER: &str =
    "   at s  delivered/s  p99 ms  CPU us/rdg  kernel       RSS  outbox records  store on disk  steal";

fn soak_row(s: &SoakSample) -> String {
    format!(
        "{:>7.0} {:>12.0} {:>7} {:>11.2} {:>7.2} {:>5.1} MiB {:>15.0} {:>10.1} MiB {:>6}",
        s.at_s,
        s.delivered_per_s,
        opt(s.latency_p99_ms, 1),
        s.agent_cpu_us_per_reading,
        s.agent_cpu_system_us_per_reading,
        s.agent_rss_bytes as f64 / 1048576.0,
        s.outbox_records,
        s.outbox_disk_bytes / 1048576.0,
        opt(s.machine_steal_cores, 2),
    )
}

/// Runs a phase for `length` and measures it after the warm-up.
async fn measure(
    length: Duration,
    load: &Load,
    delivered: &Counter,
    agent: Option<&AgentChild>,
    latency: Option<&Counter>,
    local_broker: Option<u32>,
) -> PhaseResult {
    tokio::time::sleep(WARMUP).await;
    let t0 = Instant::now();
    let b0 = local_broker.map(procstat::cpu_seconds);
    let m0 = MachineTicks::read();
    let (o0, d0) = (load.acked(), delivered.count());
    let p0 = agent.map(|a| ProcessStats::read(a.pid()));
    let t0_threads = agent
        .map(|a| procstat::thread_cpu_by_name(a.pid()))
        .unwrap_or_default();
    if let Some(l) = latency {
        l.clear_latencies();
    }
    let (mut peak_rss, mut steady_rss) = (0, 0);
    let end = t0 + length.saturating_sub(WARMUP);
    let second_half = t0 + length.saturating_sub(WARMUP) / 2;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(a) = agent {
            let rss = ProcessStats::read(a.pid()).rss_bytes;
            peak_rss = peak_rss.max(rss);
            if Instant::now() >= second_half {
                steady_rss = steady_rss.max(rss);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let (o1, d1) = (load.acked(), delivered.count());
    let n = (d1 - d0) as f64;
    let m1 = MachineTicks::read();
    let mut r = PhaseResult {
        offered_per_s: (o1 - o0) as f64 / secs,
        delivered_per_s: n / secs,
        machine_busy_cores: MachineTicks::cores_between(m0, m1, |t| t.busy),
        machine_steal_cores: MachineTicks::cores_between(m0, m1, |t| t.steal),
        ..PhaseResult::default()
    };
    if let (Some(pid), Some(b0)) = (local_broker, b0) {
        let cpu = procstat::cpu_seconds(pid) - b0;
        r.local_broker_cpu_us_per_reading = Some(cpu * 1e6 / n.max(1.0));
        r.local_broker_cpu_cores = Some(cpu / secs);
    }
    if let (Some(a), Some(p0)) = (agent, p0) {
        let p1 = ProcessStats::read(a.pid());
        let cpu = p1.cpu_seconds - p0.cpu_seconds;
        let (cpu_us, system_us) = cpu_us_per_reading(&p0, &p1, n);
        r.agent_cpu_us_per_reading = Some(cpu_us);
        r.agent_cpu_system_us_per_reading = Some(system_us);
        r.agent_cpu_cores = Some(cpu / secs);
        r.agent_disk_bytes_per_reading =
            Some(p1.disk_write_bytes.saturating_sub(p0.disk_write_bytes) as f64 / n.max(1.0));
        r.agent_peak_rss_bytes = Some(peak_rss);
        r.agent_steady_rss_bytes = Some(steady_rss);
        let mut by_thread = std::collections::BTreeMap::new();
        let mut named = 0.0;
        for (name, t1) in procstat::thread_cpu_by_name(a.pid()) {
            let d = t1 - t0_threads.get(&name).copied().unwrap_or(0.0);
            named += d;
            by_thread.insert(name, d * 1e6 / n.max(1.0));
        }
        by_thread.insert("exited".into(), (cpu - named).max(0.0) * 1e6 / n.max(1.0));
        r.agent_cpu_us_per_reading_by_thread = by_thread;
    }
    if let Some(l) = latency {
        let mut v = l.take_latencies();
        v.sort_unstable();
        r.latency_p50_ms = quantile_ms(&v, 0.50);
        r.latency_p99_ms = quantile_ms(&v, 0.99);
        r.latency_max_ms = quantile_ms(&v, 1.0);
    }
    r
}

/// The agent's CPU time between two readings of its figures, in microseconds per reading of
/// the `n` delivered meanwhile: (all of it, the part in the kernel).
fn cpu_us_per_reading(p0: &ProcessStats, p1: &ProcessStats, n: f64) -> (f64, f64) {
    let per_reading = |seconds: f64| seconds * 1e6 / n.max(1.0);
    (
        per_reading(p1.cpu_seconds - p0.cpu_seconds),
        per_reading(p1.cpu_system_seconds - p0.cpu_system_seconds),
    )
}

/// Prints `label: phase figure; phase figure; ...` for the phases `figure` has a value for,
/// or nothing when it has none.
fn print_by_phase(
    phases: &[PhaseResult],
    label: &str,
    figure: impl Fn(&PhaseResult) -> Option<String>,
) {
    let parts: Vec<String> = phases
        .iter()
        .filter_map(|p| Some(format!("{} {}", p.name, figure(p)?)))
        .collect();
    if !parts.is_empty() {
        println!("  {label}: {}", parts.join("; "));
    }
}

/// Quantile `q` of latencies in microseconds, sorted ascending, in milliseconds (nearest
/// rank); none when there are no samples.
fn quantile_ms(sorted_us: &[u32], q: f64) -> Option<f64> {
    let last = sorted_us.len().checked_sub(1)?;
    Some(f64::from(sorted_us[(last as f64 * q).round() as usize]) / 1000.0)
}

/// Deliveries counted by a subscriber, and (cloud only) their latencies in microseconds.
#[derive(Debug, Clone, Default)]
struct Counter {
    inner: Arc<CounterInner>,
}

#[derive(Debug, Default)]
struct CounterInner {
    count: AtomicU64,
    ready: AtomicU64,
    last_change_ms: AtomicU64,
    recording: std::sync::atomic::AtomicBool,
    latencies_us: Mutex<Vec<u32>>,
}

impl Counter {
    fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
    fn add(&self, n: u64) {
        self.inner.count.fetch_add(n, Ordering::Relaxed);
        self.inner.last_change_ms.store(now_ms(), Ordering::Relaxed);
    }
    fn set_ready(&self) {
        self.inner.ready.store(1, Ordering::Relaxed);
    }
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.ready.load(Ordering::Relaxed) == 0 {
            if Instant::now() > deadline {
                anyhow::bail!("subscriber did not get its SUBACK within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
    /// Waits until nothing has arrived for a second (a phase's backlog drained).
    async fn wait_quiet(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last = self.inner.last_change_ms.load(Ordering::Relaxed);
            if now_ms().saturating_sub(last) > 1000 {
                return;
            }
        }
    }
    fn record_latency(&self, on: bool) {
        self.inner.recording.store(on, Ordering::Relaxed);
    }
    fn clear_latencies(&self) {
        self.latencies().clear();
    }
    /// Keeps one latency sample, up to [`MAX_LATENCY_SAMPLES`].
    fn push_latency(&self, us: u32) {
        let mut l = self.latencies();
        if l.len() < MAX_LATENCY_SAMPLES {
            l.push(us);
        }
    }
    fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies())
    }
    fn latencies(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // A poisoned lock only means a panicking writer; the samples are still usable.
        self.inner
            .latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

fn unique_client_id(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), now_ms() % 1_000_000)
}

/// Counts readings delivered by the local broker to a plain subscriber (automatic acks).
async fn bare_subscriber(port: u16, qos: u8, counter: Counter, stop: CancellationToken) {
    let mut o = MqttOptions::new(unique_client_id("bench-bare"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(o, 64);
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.try_subscribe("sensors/+/+", qos) {
                    tracing::error!(error = %e, "bare subscriber cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => counter.set_ready(),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if counter.inner.recording.load(Ordering::Relaxed) {
                    // The bridge's probe carries no `ts`; only readings are timed.
                    if let Ok(r) = serde_json::from_slice::<ReadingTs>(&p.payload) {
                        counter.push_latency(latency_us(now_us(), r.ts));
                    }
                }
                counter.add(1);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "bare subscriber lost its broker");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The bridge phases (`--broker mosquitto`): the load through mosquitto's own bridge instead of
/// the agent, at `--rate` and then flat out. A second local mosquitto, with the local broker's
/// settings, bridges `sensors/#` at the local QoS to the cloud broker, where a bare subscriber
/// counts what arrives (and, at the rate, its latency). That is what a gateway forwards with
/// no agent at all: no rules, and a queue kept in mosquitto's memory (saved every 30 minutes)
/// rather than flushed to disk before each acknowledgement. The phases' broker CPU is the
/// bridging mosquitto's: the bridge runs inside it, and it also takes the load from the
/// devices, which the agent's phases leave to the local broker.
async fn bridge_phases(
    opts: &BenchOptions,
    cloud_port: u16,
    length: Duration,
) -> anyhow::Result<BridgePhases> {
    let mut config = local_mosquitto_config(opts);
    config.extend([
        "connection bench-bridge".to_string(),
        format!("address 127.0.0.1:{cloud_port}"),
        format!("remote_clientid {}", unique_client_id("bench-bridge")),
        format!("topic sensors/# out {}", opts.qos),
    ]);
    let bridge = crate::Mosquitto::start_with(crate::MosquittoOptions {
        tls: None,
        extra_config: config,
    })
    .await?;
    let phase = |rate| bare_phase(opts, bridge.port(), cloud_port, length, rate, bridge.pid());
    let at_rate = phase(Some(opts.rate))
        .await
        .with_context(|| bridge.log_tail())?;
    let flat_out = phase(None).await.with_context(|| bridge.log_tail())?;
    Ok(BridgePhases {
        at_rate: PhaseResult {
            name: format!("mosquitto bridge at {} readings/s", opts.rate),
            ..at_rate
        },
        flat_out: PhaseResult {
            name: "mosquitto bridge flat out".into(),
            ..flat_out
        },
    })
}

/// The figures of mosquitto's bridge, to read the agent's against.
struct BridgePhases {
    at_rate: PhaseResult,
    flat_out: PhaseResult,
}

/// The load (at `rate` readings/s, or flat out) into the broker on `load_port`, counted by a
/// bare subscriber on the broker on `count_port` (the same one for the limit phase; the far
/// side of a bridge for the bridge phases, which must be seen carrying a probe before the load
/// starts). At a rate, the readings' latency is measured too.
async fn bare_phase(
    opts: &BenchOptions,
    load_port: u16,
    count_port: u16,
    length: Duration,
    rate: Option<u64>,
    broker_pid: Option<u32>,
) -> anyhow::Result<PhaseResult> {
    let counter = Counter::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(bare_subscriber(
        count_port,
        opts.qos,
        counter.clone(),
        stop.clone(),
    ));
    counter.wait_ready().await?;
    if load_port != count_port {
        wait_bridged(load_port, &counter).await?;
    }
    let load = Load::start(opts, load_port, rate, &counter).await?;
    let latency = rate.is_some().then_some(&counter);
    counter.record_latency(latency.is_some());
    let r = measure(length, &load, &counter, None, latency, broker_pid).await;
    counter.record_latency(false);
    load.stop().await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    Ok(r)
}

/// Publishes a probe reading to the bridging broker every 100 ms until `counter` (subscribed
/// on the far side) has seen one: the bridge is connected and subscribed.
async fn wait_bridged(port: u16, counter: &Counter) -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let o = MqttOptions::new(unique_client_id("bench-probe"), "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(o, 16);
    let deadline = Instant::now() + TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while counter.count() == 0 {
        if Instant::now() > deadline {
            anyhow::bail!(
                "mosquitto's bridge delivered nothing to the cloud broker within {TIMEOUT:?}"
            );
        }
        tokio::select! {
            _ = tick.tick() => {
                // A full request queue only means the broker is not taking them yet.
                let _ = client.try_publish("sensors/bench-probe/ready", QoS::AtLeastOnce, false, "0");
            }
            ev = events.poll() => if ev.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok(())
}

/// The part of a load reading the bare subscriber times.
#[derive(serde::Deserialize)]
struct ReadingTs {
    ts: u64,
}

#[derive(serde::Deserialize)]
struct TelemetryBatch {
    readings: Vec<TelemetryItem>,
}

#[derive(serde::Deserialize)]
struct TelemetryItem {
    ts: u64,
    seq: u64,
}

/// Counts distinct readings (by `seq`) the agent delivered to the cloud broker, as a cloud
/// consumer would (QoS 1), and their latency while recording.
async fn cloud_counter(port: u16, counter: Counter, stop: CancellationToken) {
    let mut o = MqttOptions::new(unique_client_id("bench-cloud"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut events) = AsyncClient::new(o, 64);
    let topic = format!("edgestream/{GATEWAY}/telemetry");
    let mut max_seq: Option<u64> = None;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "cloud counter cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => counter.set_ready(),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now_us = now_us();
                let Ok(batch) = serde_json::from_slice::<TelemetryBatch>(&p.payload) else {
                    tracing::error!("cloud counter: telemetry batch does not parse");
                    continue;
                };
                let recording = counter.inner.recording.load(Ordering::Relaxed);
                let mut new = 0;
                let mut lat = recording.then(|| counter.latencies());
                for r in &batch.readings {
                    if max_seq.is_some_and(|m| r.seq <= m) {
                        continue; // a resend after a reconnect
                    }
                    max_seq = Some(r.seq);
                    new += 1;
                    if let Some(l) = lat.as_mut() {
                        if l.len() < MAX_LATENCY_SAMPLES {
                            l.push(latency_us(now_us, r.ts));
                        }
                    }
                }
                drop(lat);
                counter.add(new);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "cloud counter lost its broker");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The load generator: `connections` plain MQTT 3.1.1 connections ([`wire`]: rumqttc's packet
/// encoder without its event loop, which would cost the bench process more CPU than the
/// brokers), each publishing QoS 1 readings for its share of the devices, with a window of
/// [`LOAD_WINDOW`] unacknowledged publishes.
///
/// Readings written by all connections, against those delivered.
#[derive(Clone)]
struct Credit {
    sent: Arc<AtomicU64>,
    delivered: Counter,
}

struct Load {
    stop: CancellationToken,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `rate`: total readings/s across all devices, or flat out.
    /// Flat out is a closed loop: at most [`MAX_IN_TRANSIT`] readings written and not yet
    /// counted by `delivered`, so that the load cannot bury the brokers in queues (and take
    /// the cores the consumer needs); that measures the sustained rate, not the burst.
    async fn start(
        opts: &BenchOptions,
        port: u16,
        rate: Option<u64>,
        delivered: &Counter,
    ) -> anyhow::Result<Load> {
        let stop = CancellationToken::new();
        let acked = Arc::new(AtomicU64::new(0));
        let credit = Credit {
            sent: Arc::new(AtomicU64::new(delivered.count())),
            delivered: delivered.clone(),
        };
        let mut tasks = Vec::new();
        for c in 0..opts.connections {
            let devices: Vec<String> = (0..opts.devices)
                .filter(|d| d % opts.connections == c)
                .map(|d| format!("dev-{d:03}"))
                .collect();
            let per_conn = rate.map(|r| r as f64 * devices.len() as f64 / opts.devices as f64);
            let client_id = format!("bench-load-{c}-{}", std::process::id());
            // Clean session, keep-alive 600 s (no phase is that long).
            let (reader, writer, _) = wire::open(
                ("127.0.0.1", port),
                &client_id,
                true,
                Duration::from_secs(600),
                Duration::from_secs(10),
            )
            .await
            .context("load generator cannot connect")?;
            tasks.push(tokio::spawn(load_connection(
                (reader, writer),
                client_id,
                devices,
                per_conn,
                acked.clone(),
                credit.clone(),
                stop.clone(),
            )));
        }
        Ok(Load { stop, acked, tasks })
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }
}

/// The agent's rule bundle: `--rules`, or [`BENCH_RULES`]. Read and checked once, before
/// anything starts.
struct Bundle {
    text: String,
    rules: usize,
    /// The `edgestream` binary to run as the agent.
    agent: PathBuf,
}

impl Bundle {
    /// Reads and checks the bundle: it must compile, and no rule may drop readings or replace
    /// them with aggregates (the bench counts every reading at the cloud, and its flat-out
    /// load waits for them).
    fn load(opts: &BenchOptions) -> anyhow::Result<Bundle> {
        let (text, origin) = match &opts.rules {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("--rules: cannot read {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (
                BENCH_RULES.to_string(),
                "the built-in bench rules".to_string(),
            ),
        };
        let plan = edgestream_rules::compile(&text)
            .map_err(|e| anyhow::anyhow!("--rules: {origin} does not compile:\n{e}"))?;
        let dropping: Vec<&str> = plan.dropping_rules().collect();
        anyhow::ensure!(
            dropping.is_empty(),
            "--rules: {origin}: rule(s) {} drop readings or forward aggregates instead; the \
             bench counts every reading at the cloud, so its bundle must forward them all",
            dropping.join(", ")
        );
        Ok(Bundle {
            rules: plan.rule_count(),
            text,
            agent: PathBuf::new(),
        })
    }
}

/// The `i`-th reading a load connection writes for its `devices` devices: (device index,
/// metric index: 0 temperature, 1 vibration, value). Temperature saw-tooths 50..90 over 40
/// samples per device (alerts raise and clear); vibration is low with a spike every 500
/// samples. The rules bench (`benches/rules_bundle.rs`) feeds each device these same values.
pub fn load_reading(i: usize, devices: usize) -> (usize, usize, f64) {
    let device = (i / 2) % devices;
    let metric = i % 2;
    let k = (i / 2 / devices) as u64;
    let value = if metric == 0 {
        50.0 + (k % 40) as f64
    } else if k % 500 == 499 {
        90.0
    } else {
        5.0 + (k % 7) as f64 * 0.5
    };
    (device, metric, value)
}

async fn load_connection(
    connection: (wire::PacketReader, tokio::net::tcp::OwnedWriteHalf),
    client_id: String,
    devices: Vec<String>,
    rate: Option<f64>,
    acked: Arc<AtomicU64>,
    credit: Credit,
    stop: CancellationToken,
) {
    let (mut rd, mut wr) = connection;
    tracing::debug!(client_id, "load connection up");
    let window = Arc::new(Semaphore::new(LOAD_WINDOW));
    let reader = {
        let window = window.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // Only PUBACKs and the odd PINGRESP come back.
            loop {
                let packet = tokio::select! {
                    _ = stop.cancelled() => break,
                    p = rd.next() => p,
                };
                match packet {
                    Ok(Incoming::PubAck(_)) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let topics: Vec<[String; 2]> = devices
        .iter()
        .map(|d| {
            [
                format!("sensors/{d}/temperature"),
                format!("sensors/{d}/vibration"),
            ]
        })
        .collect();
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut pkid: u16 = 0;
    let mut out = BytesMut::with_capacity(LOAD_BURST * 80);
    let mut payload = Vec::with_capacity(64);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.is_cancelled() {
        let due = match rate {
            Some(r) => {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                ((started.elapsed().as_secs_f64() * r) as u64).saturating_sub(sent)
            }
            None => {
                let in_transit = credit
                    .sent
                    .load(Ordering::Relaxed)
                    .saturating_sub(credit.delivered.count());
                if in_transit >= MAX_IN_TRANSIT {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
                    }
                }
                (MAX_IN_TRANSIT - in_transit).min(LOAD_BURST as u64)
            }
        };
        let mut n = 0;
        while (n as u64) < due && n < LOAD_WINDOW {
            let got = if n == 0 && rate.is_none() {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    p = window.acquire() => p.map(|p| p.forget()).is_ok(),
                }
            } else {
                window.try_acquire().map(|p| p.forget()).is_ok()
            };
            if !got {
                break;
            }
            let (device, metric, value) = load_reading(sent as usize, topics.len());
            payload.clear();
            let _ = write!(payload, r#"{{"value":{value},"ts":{}}}"#, now_ms());
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            wire::put_publish(&mut out, &topics[device][metric], &payload, 1, pkid, false);
            sent += 1;
            n += 1;
            credit.sent.fetch_add(1, Ordering::Relaxed);
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                tracing::error!("load generator lost the local broker");
                break;
            }
            out.clear();
        }
    }
    tracing::debug!(client_id, sent, "load connection done");
    let _ = wr.write_all(&wire::disconnect()).await;
    reader.abort();
}

/// Writes the agent's rule bundle and config into `dir` and returns the config's path. The
/// agent settings the options leave out are left out of the config: the agent's defaults.
fn write_agent_config(
    dir: &Path,
    opts: &BenchOptions,
    rules: &str,
    local_port: u16,
    cloud_port: u16,
) -> anyhow::Result<PathBuf> {
    let rules_path = dir.join("bench.rules");
    std::fs::write(&rules_path, rules).context("writing the rule bundle")?;
    let setting = |name: &str, value: Option<String>| {
        value.map(|v| format!("{name} = {v}\n")).unwrap_or_default()
    };
    let config = format!(
        r#"
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"

[local]
host = "127.0.0.1"
port = {local_port}
topics = ["sensors/+/+"]
qos = {qos}

[cloud]
host = "127.0.0.1"
port = {cloud_port}
tls = false
{batch}{inflight}
[outbox]
durability = "{durability}"
flush_interval_ms = {FLUSH_INTERVAL_MS}
{linger}
[rules]
file = "{rules_file}"

[health]
interval_secs = 5
{tail}"#,
        tail = crate::agent::CONFIG_TAIL,
        data = dir.join("data").display(),
        rules_file = rules_path.display(),
        qos = opts.qos,
        batch = setting("batch_size", opts.batch_size.map(|v| v.to_string())),
        inflight = setting("max_inflight", opts.cloud_inflight.map(|v| v.to_string())),
        durability = opts.durability.as_str(),
        linger = setting(
            "commit_linger_ms",
            opts.commit_linger_ms.map(|v| v.to_string())
        ),
    );
    let path = dir.join("edgestream.toml");
    std::fs::write(&path, config).context("writing the agent config")?;
    Ok(path)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(r: &BenchReport) {
    let o = &r.options;
    println!(
        "edgestream bench: {} devices on {} connections, {} rules, durable outbox ({}), local QoS {}, {} brokers{}, {} cores",
        o.devices,
        o.connections,
        r.rules,
        match o.commit_linger_ms {
            None => o.durability.as_str().to_string(),
            Some(ms) => format!("{}, commit linger {ms} ms", o.durability.as_str()),
        },
        o.qos,
        match o.broker {
            BrokerKind::InProcess => "in-process rumqttd",
            BrokerKind::Mosquitto => "mosquitto",
        },
        if o.broker == BrokerKind::Mosquitto {
            format!(" (local max_inflight_messages {})", o.local_max_inflight)
        } else {
            String::new()
        },
        r.cores,
    );
    if let Some(agent) = &o.agent {
        println!("agent: {}", agent.display());
    }
    if let Some(rules) = &o.rules {
        println!("rules: {}", rules.display());
    }
    // The agent's cloud settings, where the bench set them instead of its defaults.
    let cloud: Vec<String> = [
        o.batch_size.map(|n| format!("batch_size {n}")),
        o.cloud_inflight.map(|n| format!("max_inflight {n}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !cloud.is_empty() {
        println!("agent cloud: {}", cloud.join(", "));
    }
    println!();
    println!(
        "{:<36} {:>10} {:>11} {:>7} {:>7} {:>7} {:>10} {:>6} {:>9} {:>9} {:>10}",
        "phase",
        "offered/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU us/rdg",
        "cores",
        "disk B/rdg",
        "peak RSS",
        "steady RSS"
    );
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into())
    };
    for p in &r.phases {
        println!(
            "{:<36} {:>10.0} {:>11.0} {:>7} {:>7} {:>7} {:>10} {:>6} {:>9} {:>9} {:>10}",
            p.name,
            p.offered_per_s,
            p.delivered_per_s,
            opt(p.latency_p50_ms, 1),
            opt(p.latency_p99_ms, 1),
            opt(p.latency_max_ms, 1),
            opt(p.agent_cpu_us_per_reading, 2),
            opt(p.agent_cpu_cores, 2),
            opt(p.agent_disk_bytes_per_reading, 0),
            mib(p.agent_peak_rss_bytes),
            mib(p.agent_steady_rss_bytes),
        );
    }
    for p in r
        .phases
        .iter()
        .filter(|p| !p.agent_cpu_us_per_reading_by_thread.is_empty())
    {
        let split: Vec<String> = p
            .agent_cpu_us_per_reading_by_thread
            .iter()
            .map(|(name, us)| format!("{name} {us:.2}"))
            .collect();
        println!("  {}: CPU us/rdg by thread: {}", p.name, split.join(", "));
    }
    print_by_phase(
        &r.phases,
        "agent CPU us/rdg in the kernel (system time)",
        |p| Some(format!("{:.2}", p.agent_cpu_system_us_per_reading?)),
    );
    print_by_phase(&r.phases, "local broker CPU", |p| {
        let us = p.local_broker_cpu_us_per_reading?;
        let cores = p.local_broker_cpu_cores?;
        Some(format!("{us:.2} us/rdg ({cores:.2} cores)"))
    });
    let busy = format!("machine busy cores (of {}, all processes)", r.cores);
    print_by_phase(&r.phases, &busy, |p| {
        Some(format!("{:.2}", p.machine_busy_cores?))
    });
    print_by_phase(
        &r.phases,
        "of which taken by the hypervisor (steal, cores)",
        |p| Some(format!("{:.2}", p.machine_steal_cores?)),
    );
    println!();
    if r.soak.is_empty() {
        let bridge = r
            .agent_to_bridge_ratio
            .map(|b| format!("   agent flat out / mosquitto bridge: {:.0}%", b * 100.0))
            .unwrap_or_default();
        println!(
            "agent flat out / broker limit: {:.0}%{bridge}   agent VmHWM {:.1} MiB, RSS at end {:.1} MiB",
            r.agent_to_limit_ratio * 100.0,
            r.agent_vm_hwm_bytes as f64 / 1048576.0,
            r.agent_rss_at_end_bytes as f64 / 1048576.0
        );
        let against_bridge: Vec<String> = [
            (
                format!("at {} readings/s", o.rate),
                r.agent_to_bridge_cpu_at_rate,
            ),
            ("flat out".to_string(), r.agent_to_bridge_cpu_flat_out),
        ]
        .into_iter()
        .filter_map(|(phase, c)| {
            let c = c?;
            Some(format!(
                "{phase} {:.2} ({:.2} / {:.2} us)",
                c.ratio, c.agent_us_per_reading, c.bridge_us_per_reading
            ))
        })
        .collect();
        if !against_bridge.is_empty() {
            println!(
                "agent CPU per reading / mosquitto bridge's: {}",
                against_bridge.join("; ")
            );
        }
    } else {
        print_soak(r);
    }
    let flushes = match r.options.durability {
        Durability::Batch => format!(
            "{:.0} readings per outbox flush",
            r.agent_readings_per_flush
        ),
        Durability::Interval => format!("outbox flushed every {FLUSH_INTERVAL_MS} ms"),
    };
    println!(
        "agent: {flushes}, {:.0} per cloud publish, {:.0} cloud payload bytes per reading",
        r.agent_readings_per_publish, r.agent_uplink_bytes_per_reading
    );
    println!(
        "load average (1 min) at start {:.1}, at end {:.1}",
        r.load_average[0], r.load_average[1]
    );
    println!("CPU us/rdg = agent CPU seconds per million readings delivered; latency = cloud arrival - reading ts (ms timestamps, may read up to 1 ms high); peak RSS = highest sampled after the first second, steady RSS = highest in the phase's second half");
}

/// The soak's samples, and how the first half compares with the second: what a leak would
/// show as a second half higher than the first.
fn print_soak(r: &BenchReport) {
    println!("soak samples (every {} s):", r.options.soak_every);
    println!("{SOAK_HEADER}");
    for s in &r.soak {
        println!("{}", soak_row(s));
    }
    let mib = |b: f64| b / 1048576.0;
    let (first, second) = r.soak.split_at(r.soak.len() / 2);
    let highest =
        |v: &[SoakSample], f: &dyn Fn(&SoakSample) -> f64| v.iter().map(f).fold(0.0, f64::max);
    let rss = |s: &SoakSample| s.agent_rss_bytes as f64;
    let disk = |s: &SoakSample| s.outbox_disk_bytes;
    println!(
        "soak: highest RSS {:.1} MiB in the first half, {:.1} MiB in the second; store on disk {:.1} and {:.1} MiB; agent VmHWM {:.1} MiB",
        mib(highest(first, &rss)),
        mib(highest(second, &rss)),
        mib(highest(first, &disk)),
        mib(highest(second, &disk)),
        mib(r.agent_vm_hwm_bytes as f64),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_rules_are_twenty_and_compile() {
        match edgestream_rules::compile(super::BENCH_RULES) {
            Ok(plan) => assert_eq!(plan.rule_count(), 20),
            Err(e) => panic!("{e}"),
        }
    }
}
