//! Simulated MQTT sensors and actuators.
//!
//! An [`MqttDevice`] is one task that behaves like a small networked sensor:
//! it samples each of its metrics on a schedule (or as fast as the broker
//! acknowledges, [`Rate::FlatOut`]), publishes each reading with QoS 1 to
//! `sensors/{device}/{metric}`, and answers commands on
//! `devices/{device}/commands` on `devices/{device}/replies`.
//!
//! Guarantees a test can rely on:
//! * [`MqttDevice::acked`] holds exactly the readings whose PUBACK arrived
//!   from the broker, in PUBACK order. A reading in flight when the
//!   connection dropped is counted in `unacked_lost` and never retried
//!   (the device has a clean session and no buffer, like most sensors).
//! * Sampling follows the schedule whether or not the device is connected:
//!   samples taken while offline (or while the in-flight window is full in
//!   [`Rate::PerSecond`] mode) are counted, never silently lost. The
//!   schedule starts at the first successful connection.
//! * Reading `ts` is signal time: `start_ts_ms + index * ts_step`, so a
//!   demo can run its sensors' clocks faster than wall time. `seq` counts
//!   samples per metric from 0 (a dropout skips a number, like a sensor whose
//!   reading never left it).
//! * The device reconnects with a short backoff after any connection error,
//!   and treats a broker silent for 1.5x the keep-alive as a dead link (it
//!   pings every half keep-alive), as real MQTT clients do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::signal::Signal;
use crate::wire::{self, Incoming, PacketReader, WireError};

/// Default unacknowledged QoS 1 publishes per device.
pub const DEFAULT_MAX_INFLIGHT: u16 = 100;
/// Acknowledged readings kept per device for [`MqttDevice::acked`]; past it
/// only the counter grows (`DeviceStats::acked_not_recorded`), so a long
/// flat-out benchmark cannot exhaust memory.
pub const MAX_RECORDED_READINGS: usize = 1_000_000;
/// Commands kept per device for [`MqttDevice::commands`].
pub const MAX_RECORDED_COMMANDS: usize = 10_000;
/// Time for TCP connect + CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a clean stop waits for the acknowledgements of readings in
/// flight before it disconnects anyway.
const STOP_DRAIN: Duration = Duration::from_secs(2);
/// Delay between reconnection attempts; short because tests measure
/// recovery time, and the broker is local.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// How often a device samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Samples per second of wall time, per metric.
    PerSecond(f64),
    /// As fast as the in-flight window allows (benchmarks).
    FlatOut,
}

/// How reading payloads are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"value":23.5,"ts":1700000000123,"seq":17}`; `seq` omitted if false.
    Json {
        /// Whether to include `seq`.
        with_seq: bool,
    },
    /// A bare number, e.g. `23.5` (the agent stamps the time).
    BareNumber,
}

/// How a device answers commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandBehavior {
    /// Reply `succeeded`.
    Succeed,
    /// Reply `failed` with this detail.
    Fail(String),
    /// Never reply (the agent's timeout path).
    Ignore,
    /// Reply `succeeded`, but only after this long (a slow actuator; with a
    /// delay past the command's expiry, the late-reply path). A reply still
    /// pending when the connection drops is lost.
    SucceedAfter(Duration),
}

impl CommandBehavior {
    /// How long the device waits before replying.
    pub fn delay(&self) -> Duration {
        match self {
            CommandBehavior::SucceedAfter(d) => *d,
            _ => Duration::ZERO,
        }
    }
}

/// Replies a device holds back for [`CommandBehavior::SucceedAfter`]; past
/// this, further delayed replies are dropped and counted
/// (`DeviceStats::replies_dropped`).
pub const MAX_DELAYED_REPLIES: usize = 1000;

/// One metric of a device and its signal.
#[derive(Debug, Clone)]
pub struct MetricSpec {
    /// Metric name, the last topic level.
    pub metric: String,
    /// Its signal.
    pub signal: Signal,
}

impl MetricSpec {
    /// Shorthand constructor.
    pub fn new(metric: impl Into<String>, signal: Signal) -> Self {
        MetricSpec {
            metric: metric.into(),
            signal,
        }
    }
}

/// Configuration of one simulated MQTT device.
#[derive(Debug, Clone)]
pub struct MqttDeviceConfig {
    /// Device id: topic level and MQTT client id suffix.
    pub name: String,
    /// Its metrics.
    pub metrics: Vec<MetricSpec>,
    /// Sampling rate.
    pub rate: Rate,
    /// Signal time that passes per sample. Defaults to one wall period; a
    /// larger value makes the device's clock run faster than wall time.
    pub ts_step: Duration,
    /// Signal time of sample 0 (ms since epoch); `None` = now.
    pub start_ts_ms: Option<i64>,
    /// Stop sampling after this many samples per metric.
    pub max_samples: Option<u64>,
    /// Payload encoding.
    pub format: PayloadFormat,
    /// How commands are answered.
    pub commands: CommandBehavior,
    /// In-flight window for QoS 1 publishes. Checked once per sample: all
    /// metrics of a sample are sent together, so the window can be exceeded
    /// by up to `metrics.len() - 1`.
    pub max_inflight: u16,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
}

impl MqttDeviceConfig {
    /// A device sampling `metrics` at `rate_hz` with JSON payloads and
    /// `seq`, clocks at wall speed, answering commands with success.
    pub fn new(name: impl Into<String>, metrics: Vec<MetricSpec>, rate_hz: f64) -> Self {
        MqttDeviceConfig {
            name: name.into(),
            metrics,
            rate: Rate::PerSecond(rate_hz),
            ts_step: Duration::from_secs_f64(1.0 / rate_hz.max(0.001)),
            start_ts_ms: None,
            max_samples: None,
            format: PayloadFormat::Json { with_seq: true },
            commands: CommandBehavior::Succeed,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            keep_alive: Duration::from_secs(30),
        }
    }
}

/// A reading as the device published it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Value (rounded to 3 decimals before publishing, so it round-trips
    /// through JSON exactly).
    pub value: f64,
    /// Signal time, ms since epoch.
    pub ts: i64,
    /// Per-device, per-metric sample counter.
    pub seq: u32,
}

/// Counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Samples taken (all metrics), including dropouts and skipped ones.
    pub sampled: u64,
    /// Readings written to the socket.
    pub published: u64,
    /// Readings whose PUBACK arrived.
    pub acked: u64,
    /// Acknowledged readings beyond [`MAX_RECORDED_READINGS`], counted only.
    pub acked_not_recorded: u64,
    /// Readings in flight when a connection dropped (not acknowledged).
    pub unacked_lost: u64,
    /// Samples taken while disconnected.
    pub skipped_offline: u64,
    /// Samples taken while the in-flight window was full.
    pub skipped_backpressure: u64,
    /// Samples a dropout fault suppressed.
    pub dropouts: u64,
    /// Successful connections (1 + reconnections).
    pub connects: u64,
    /// Commands received.
    pub commands: u64,
    /// Replies acknowledged by the broker.
    pub replies_acked: u64,
    /// Delayed replies dropped: [`MAX_DELAYED_REPLIES`] were already waiting.
    pub replies_dropped: u64,
}

impl std::ops::AddAssign for DeviceStats {
    fn add_assign(&mut self, s: DeviceStats) {
        self.sampled += s.sampled;
        self.published += s.published;
        self.acked += s.acked;
        self.acked_not_recorded += s.acked_not_recorded;
        self.unacked_lost += s.unacked_lost;
        self.skipped_offline += s.skipped_offline;
        self.skipped_backpressure += s.skipped_backpressure;
        self.dropouts += s.dropouts;
        self.connects += s.connects;
        self.commands += s.commands;
        self.replies_acked += s.replies_acked;
        self.replies_dropped += s.replies_dropped;
    }
}

#[derive(Debug, Default)]
struct Shared {
    stats: DeviceStats,
    acked: Vec<Reading>,
    commands: Vec<Value>,
    connected: bool,
    finished: bool,
    behavior: Option<CommandBehavior>,
}

/// A running simulated device. Dropping it aborts its task without a
/// DISCONNECT (like pulling power); [`MqttDevice::stop`] stops sampling,
/// waits (up to 2 s) for the PUBACKs of readings in flight, then disconnects
/// cleanly; readings still unacknowledged then count as `unacked_lost`.
#[derive(Debug)]
pub struct MqttDevice {
    name: String,
    shared: Arc<Mutex<Shared>>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the counters
    // inconsistent in a way that matters to a test; keep going.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl MqttDevice {
    /// Starts the device against the broker at `host:port`.
    pub fn spawn(host: impl Into<String>, port: u16, config: MqttDeviceConfig) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            behavior: Some(config.commands.clone()),
            ..Default::default()
        }));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let name = config.name.clone();
        let task = tokio::spawn(run(
            host.into(),
            port,
            config,
            Arc::clone(&shared),
            shutdown_rx,
        ));
        MqttDevice {
            name,
            shared,
            shutdown,
            task: Some(task),
        }
    }

    /// The device id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Readings acknowledged by the broker, in PUBACK order.
    pub fn acked(&self) -> Vec<Reading> {
        lock(&self.shared).acked.clone()
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        lock(&self.shared).stats
    }

    /// Commands received, as parsed JSON (a payload that is not JSON is
    /// recorded as a JSON string).
    pub fn commands(&self) -> Vec<Value> {
        lock(&self.shared).commands.clone()
    }

    /// Whether the device is connected right now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared).connected
    }

    /// Whether `max_samples` were taken and nothing is left in flight.
    pub fn is_finished(&self) -> bool {
        lock(&self.shared).finished
    }

    /// Changes how later commands are answered.
    pub fn set_command_behavior(&self, behavior: CommandBehavior) {
        lock(&self.shared).behavior = Some(behavior);
    }

    /// Waits until at least `n` readings were acknowledged.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.stats.acked >= n).await
    }

    /// Waits until at least `n` commands were received.
    pub async fn wait_commands(&self, n: u64, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.stats.commands >= n).await
    }

    /// Waits until the device is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.connected).await
    }

    /// Waits until [`MqttDevice::is_finished`].
    pub async fn wait_finished(&self, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.finished).await
    }

    async fn wait(&self, timeout: Duration, pred: impl Fn(&Shared) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.shared)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops sampling, waits up to 2 s for PUBACKs of readings in flight,
    /// sends DISCONNECT and ends the task.
    pub async fn stop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(device = %self.name, error = %e, "device task failed");
            }
        }
    }
}

impl Drop for MqttDevice {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A set of devices started together.
#[derive(Debug)]
pub struct MqttFleet {
    devices: Vec<MqttDevice>,
}

impl MqttFleet {
    /// Starts every device against `host:port`.
    pub fn spawn(host: &str, port: u16, configs: Vec<MqttDeviceConfig>) -> Self {
        MqttFleet {
            devices: configs
                .into_iter()
                .map(|c| MqttDevice::spawn(host, port, c))
                .collect(),
        }
    }

    /// The devices.
    pub fn devices(&self) -> &[MqttDevice] {
        &self.devices
    }

    /// The device named `name`.
    pub fn device(&self, name: &str) -> Option<&MqttDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// All acknowledged readings, device by device.
    pub fn acked(&self) -> Vec<Reading> {
        self.devices.iter().flat_map(|d| d.acked()).collect()
    }

    /// Counters summed over the fleet.
    pub fn stats(&self) -> DeviceStats {
        let mut t = DeviceStats::default();
        for d in &self.devices {
            t += d.stats();
        }
        t
    }

    /// Waits until every device is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for d in &self.devices {
            if !d
                .wait_connected(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                return false;
            }
        }
        true
    }

    /// Waits until every device is finished (see `max_samples`).
    pub async fn wait_finished(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for d in &self.devices {
            if !d
                .wait_finished(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                return false;
            }
        }
        true
    }

    /// Stops every device cleanly.
    pub async fn stop(&mut self) {
        for d in &mut self.devices {
            d.stop().await;
        }
    }
}

/// What a packet id in flight stands for.
#[derive(Debug)]
enum InFlight {
    Reading(Reading),
    Reply,
}

struct Conn {
    reader: PacketReader,
    writer: OwnedWriteHalf,
    inflight: HashMap<u16, InFlight>,
    next_pkid: u16,
    /// Replies waiting for their time (`SucceedAfter`); each is sent when
    /// due, whatever order they were queued in.
    delayed: Vec<(Instant, Value)>,
    /// When the broker last sent anything; a silent broker past 1.5x the
    /// keep-alive is a dead link (what a blackholed network looks like).
    last_rx: Instant,
}

impl Conn {
    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The device task: one loop owning the connection, the schedule and the
/// signals, so packet ids, readings and acks never race.
async fn run(
    host: String,
    port: u16,
    mut config: MqttDeviceConfig,
    shared: Arc<Mutex<Shared>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let device = config.name.clone();
    let client_id = format!("sim-{device}");
    let command_topic = format!("devices/{device}/commands");
    let reply_topic = format!("devices/{device}/replies");
    let topics: Vec<String> = config
        .metrics
        .iter()
        .map(|m| format!("sensors/{device}/{}", m.metric))
        .collect();
    let start_ts = config.start_ts_ms.unwrap_or_else(now_ms);
    let step_ms = config.ts_step.as_secs_f64() * 1000.0;
    let mut index: u64 = 0;
    let mut conn: Option<Conn> = None;
    let mut reconnect_at = Instant::now();
    let period = match config.rate {
        Rate::PerSecond(hz) => Duration::from_secs_f64(1.0 / hz.max(0.001)),
        // Unused in flat-out mode; any period will do.
        Rate::FlatOut => Duration::from_secs(3600),
    };
    let mut ticker = tokio::time::interval(period);
    // Burst: a late tick still produces its samples, so signal time stays in
    // step with the schedule.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let flat_out = config.rate == Rate::FlatOut;
    // The schedule starts at the first connection, like a sensor that boots
    // and joins the network before it measures; later outages do not pause it.
    let mut started = false;
    let mut ping = tokio::time::interval(config.keep_alive.max(Duration::from_secs(1)) / 2);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        let sampling_done = config.max_samples.is_some_and(|m| index >= m);
        if sampling_done {
            let idle = conn.as_ref().is_none_or(|c| {
                !c.inflight
                    .values()
                    .any(|f| matches!(f, InFlight::Reading(_)))
            });
            let mut s = lock(&shared);
            if idle || conn.is_none() {
                s.finished = true;
            }
        }
        let window_open = conn
            .as_ref()
            .is_some_and(|c| c.inflight.len() < usize::from(config.max_inflight));
        let (reply_due, replies_waiting) = (next_due(&conn), has_delayed(&conn));
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    if let Some(mut c) = conn.take() {
                        drain_acks(&mut c, &device, (&command_topic, &reply_topic), &shared).await;
                        if let Err(e) = c.writer.write_all(&wire::disconnect()).await {
                            tracing::debug!(%device, error = %e, "disconnect failed");
                        }
                        let mut c = Some(c);
                        let e = WireError::Timeout("PUBACKs before stopping");
                        drop_conn(&mut c, &shared, &device, &e, &mut reconnect_at);
                    }
                    lock(&shared).connected = false;
                    return;
                }
            }
            _ = ticker.tick(), if started && !flat_out && !sampling_done => {
                let connected = conn.is_some();
                let result = sample_and_send(&mut config, &topics, index, start_ts, step_ms,
                    conn.as_mut().filter(|_| window_open), connected, &shared).await;
                index += 1;
                if let Err(e) = result {
                    drop_conn(&mut conn, &shared, &device, &e, &mut reconnect_at);
                }
            }
            _ = std::future::ready(()), if flat_out && !sampling_done && window_open => {
                let result = sample_and_send(&mut config, &topics, index, start_ts, step_ms,
                    conn.as_mut(), true, &shared).await;
                index += 1;
                if let Err(e) = result {
                    drop_conn(&mut conn, &shared, &device, &e, &mut reconnect_at);
                }
            }
            packet = next_packet(&mut conn) => {
                if let Some(c) = conn.as_mut() {
                    c.last_rx = Instant::now();
                }
                let result = match packet {
                    Ok(p) => handle_packet(p, conn.as_mut(), &device, &command_topic,
                        &reply_topic, &shared).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    drop_conn(&mut conn, &shared, &device, &e, &mut reconnect_at);
                }
            }
            _ = tokio::time::sleep_until(reply_due), if replies_waiting => {
                if let Some(c) = conn.as_mut() {
                    if let Err(e) = send_due_replies(c, &reply_topic).await {
                        drop_conn(&mut conn, &shared, &device, &e, &mut reconnect_at);
                    }
                }
            }
            _ = ping.tick(), if conn.is_some() => {
                if let Some(c) = conn.as_mut() {
                    let silent = c.last_rx.elapsed();
                    if silent > config.keep_alive * 3 / 2 {
                        let e = WireError::Timeout("any packet within 1.5x keep-alive");
                        drop_conn(&mut conn, &shared, &device, &e, &mut reconnect_at);
                    } else if let Err(e) = c.writer.write_all(&wire::pingreq()).await {
                        drop_conn(&mut conn, &shared, &device, &e.into(), &mut reconnect_at);
                    }
                }
            }
            _ = tokio::time::sleep_until(reconnect_at), if conn.is_none() => {
                match connect(&host, port, &client_id, &command_topic, config.keep_alive).await {
                    Ok(c) => {
                        tracing::debug!(%device, port, "device connected");
                        conn = Some(c);
                        if !started {
                            started = true;
                            ticker.reset_immediately();
                        }
                        let mut s = lock(&shared);
                        s.connected = true;
                        s.stats.connects += 1;
                    }
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "device connect failed");
                        reconnect_at = Instant::now() + RECONNECT_BACKOFF;
                    }
                }
            }
        }
    }
}

/// On a clean stop, waits up to [`STOP_DRAIN`] for the PUBACKs of readings
/// in flight, so `acked()` is not missing readings the broker did take.
async fn drain_acks(c: &mut Conn, device: &str, topics: (&str, &str), shared: &Mutex<Shared>) {
    let deadline = Instant::now() + STOP_DRAIN;
    while !c.inflight.is_empty() {
        match tokio::time::timeout_at(deadline, c.reader.next()).await {
            Ok(Ok(p)) => {
                if let Err(e) =
                    handle_packet(p, Some(&mut *c), device, topics.0, topics.1, shared).await
                {
                    tracing::debug!(%device, error = %e, "connection lost while stopping");
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(%device, error = %e, "connection lost while stopping");
                return;
            }
            Err(_) => return,
        }
    }
}

fn has_delayed(conn: &Option<Conn>) -> bool {
    conn.as_ref().is_some_and(|c| !c.delayed.is_empty())
}

fn next_due(conn: &Option<Conn>) -> Instant {
    conn.as_ref()
        .and_then(|c| c.delayed.iter().map(|(due, _)| *due).min())
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
}

/// Publishes every delayed reply whose time has come, stamped now.
async fn send_due_replies(c: &mut Conn, reply_topic: &str) -> Result<(), WireError> {
    let now = Instant::now();
    let (due, waiting): (Vec<_>, Vec<_>) = c.delayed.drain(..).partition(|(t, _)| *t <= now);
    c.delayed = waiting;
    for (_, mut reply) in due {
        reply["ts"] = Value::from(now_ms());
        let pkid = c.alloc_pkid();
        c.inflight.insert(pkid, InFlight::Reply);
        c.writer
            .write_all(&wire::publish(
                reply_topic,
                reply.to_string().as_bytes(),
                1,
                pkid,
                false,
            ))
            .await?;
    }
    Ok(())
}

async fn next_packet(conn: &mut Option<Conn>) -> Result<Incoming, WireError> {
    match conn {
        Some(c) => c.reader.next().await,
        None => std::future::pending().await,
    }
}

fn drop_conn(
    conn: &mut Option<Conn>,
    shared: &Mutex<Shared>,
    device: &str,
    error: &WireError,
    reconnect_at: &mut Instant,
) {
    if let Some(c) = conn.take() {
        let lost = c
            .inflight
            .values()
            .filter(|f| matches!(f, InFlight::Reading(_)))
            .count() as u64;
        tracing::debug!(%device, %error, lost, "device connection lost");
        let mut s = lock(shared);
        s.stats.unacked_lost += lost;
        s.connected = false;
    }
    *reconnect_at = Instant::now() + RECONNECT_BACKOFF;
}

async fn connect(
    host: &str,
    port: u16,
    client_id: &str,
    command_topic: &str,
    keep_alive: Duration,
) -> Result<Conn, WireError> {
    let (reader, mut writer, _session) =
        wire::open((host, port), client_id, true, keep_alive, CONNECT_TIMEOUT).await?;
    // The SUBACK is handled in the main loop like any packet; commands sent
    // before it arrives are not expected on a fresh session anyway.
    writer
        .write_all(&wire::subscribe(1, command_topic, 1))
        .await?;
    Ok(Conn {
        reader,
        writer,
        inflight: HashMap::new(),
        // pkid 1 is the SUBSCRIBE; publishes start after it.
        next_pkid: 1,
        last_rx: Instant::now(),
        delayed: Vec::new(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn sample_and_send(
    config: &mut MqttDeviceConfig,
    topics: &[String],
    index: u64,
    start_ts: i64,
    step_ms: f64,
    mut conn: Option<&mut Conn>,
    connected: bool,
    shared: &Mutex<Shared>,
) -> Result<(), WireError> {
    let t_s = index as f64 * step_ms / 1000.0;
    let ts = start_ts + (index as f64 * step_ms).round() as i64;
    let seq = u32::try_from(index).unwrap_or(u32::MAX);
    for (m, topic) in config.metrics.iter_mut().zip(topics) {
        let sample = m.signal.sample(t_s);
        // Decide under the lock, but never hold it across an await.
        let ready = {
            let mut s = lock(shared);
            s.stats.sampled += 1;
            match (sample, conn.is_some()) {
                (None, _) => {
                    s.stats.dropouts += 1;
                    None
                }
                (Some(_), false) => {
                    if connected {
                        s.stats.skipped_backpressure += 1;
                    } else {
                        s.stats.skipped_offline += 1;
                    }
                    None
                }
                (Some(v), true) => Some(v),
            }
        };
        let (Some(v), Some(c)) = (ready, conn.as_deref_mut()) else {
            continue;
        };
        let value = (v * 1000.0).round() / 1000.0;
        let payload = match config.format {
            PayloadFormat::Json { with_seq: true } => {
                json!({"value": value, "ts": ts, "seq": seq}).to_string()
            }
            PayloadFormat::Json { with_seq: false } => {
                json!({"value": value, "ts": ts}).to_string()
            }
            PayloadFormat::BareNumber => value.to_string(),
        };
        let pkid = c.alloc_pkid();
        c.inflight.insert(
            pkid,
            InFlight::Reading(Reading {
                device: config.name.clone(),
                metric: m.metric.clone(),
                value,
                ts,
                seq,
            }),
        );
        c.writer
            .write_all(&wire::publish(topic, payload.as_bytes(), 1, pkid, false))
            .await?;
        lock(shared).stats.published += 1;
    }
    Ok(())
}

async fn handle_packet(
    packet: Incoming,
    conn: Option<&mut Conn>,
    device: &str,
    command_topic: &str,
    reply_topic: &str,
    shared: &Mutex<Shared>,
) -> Result<(), WireError> {
    let Some(c) = conn else {
        return Ok(());
    };
    match packet {
        Incoming::PubAck(pkid) => match c.inflight.remove(&pkid) {
            Some(InFlight::Reading(r)) => {
                let mut s = lock(shared);
                s.stats.acked += 1;
                if s.acked.len() < MAX_RECORDED_READINGS {
                    s.acked.push(r);
                } else {
                    s.stats.acked_not_recorded += 1;
                }
            }
            Some(InFlight::Reply) => lock(shared).stats.replies_acked += 1,
            None => tracing::debug!(%device, pkid, "PUBACK for an unknown packet id"),
        },
        Incoming::Publish {
            topic,
            payload,
            qos,
            pkid,
            ..
        } => {
            if qos > 0 {
                c.writer.write_all(&wire::puback(pkid)).await?;
            }
            if topic != command_topic {
                return Ok(());
            }
            let command: Value = serde_json::from_slice(&payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into()));
            let behavior = {
                let mut s = lock(shared);
                s.stats.commands += 1;
                if s.commands.len() < MAX_RECORDED_COMMANDS {
                    s.commands.push(command.clone());
                }
                s.behavior.clone().unwrap_or(CommandBehavior::Succeed)
            };
            let delay = behavior.delay();
            if let (Some(reply), false) = (reply_for(device, &command, &behavior), delay.is_zero())
            {
                if c.delayed.len() < MAX_DELAYED_REPLIES {
                    c.delayed.push((Instant::now() + delay, reply));
                } else {
                    lock(shared).stats.replies_dropped += 1;
                }
            } else if let Some(reply) = reply_for(device, &command, &behavior) {
                let pkid = c.alloc_pkid();
                c.inflight.insert(pkid, InFlight::Reply);
                c.writer
                    .write_all(&wire::publish(
                        reply_topic,
                        reply.to_string().as_bytes(),
                        1,
                        pkid,
                        false,
                    ))
                    .await?;
            }
        }
        Incoming::SubAck(_, codes) => {
            if codes.contains(&0x80) {
                return Err(WireError::Protocol("command subscription refused".into()));
            }
        }
        Incoming::ConnAck { .. } | Incoming::PingResp | Incoming::Other(_) => {}
    }
    Ok(())
}

/// The reply a device sends for `command`, or `None` to stay silent.
pub fn reply_for(device: &str, command: &Value, behavior: &CommandBehavior) -> Option<Value> {
    let id = command.get("id").and_then(Value::as_str)?;
    let (state, detail) = match behavior {
        CommandBehavior::Ignore => return None,
        CommandBehavior::Fail(detail) => ("failed", detail.clone()),
        CommandBehavior::Succeed | CommandBehavior::SucceedAfter(_) => {
            ("succeeded", success_detail(command))
        }
    };
    Some(json!({
        "v": 1,
        "id": id,
        "device": device,
        "state": state,
        "detail": detail,
        "ts": now_ms(),
    }))
}

fn success_detail(command: &Value) -> String {
    let name = command
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("command");
    let args = command.get("args");
    match (name, args.and_then(|a| a.get("percent"))) {
        ("set_position", Some(p)) => format!("position set to {p}"),
        _ => format!("{name} done"),
    }
}
