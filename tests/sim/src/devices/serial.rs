//! Simulated serial sensors on real pseudo-terminals.
//!
//! A [`SerialDevice`] owns the master side of a pty pair and gives the agent
//! a stable path to open: a symlink in a temporary `by-id/` directory that
//! points at the pty's slave (`/dev/pts/N`), the way udev's
//! `/dev/serial/by-id/usb-...` links point at `/dev/ttyUSBn`. The agent opens
//! that path exactly as it would open real hardware.
//!
//! The device runs on its own thread (serial I/O is blocking) and, on a
//! schedule, writes one text line per sample in the configured
//! [`LineFormat`]. It injects the faults real serial links have: garbage
//! bytes (line noise at plug-in), over-long lines, sensor dropouts (from the
//! [`Signal`](crate::signal::Signal)), and unplugging: [`SerialDevice::unplug`]
//! closes the master so the agent's reads fail; [`SerialDevice::replug`]
//! creates a new pty (a new `/dev/pts/N`) and re-points the symlink, so only an
//! agent that reopens by path recovers, as with real USB adapters.
//!
//! In the text formats, JSON command lines written by the agent
//! (`{"id":..,"name":..,...}`) are answered with one JSON outcome line
//! (`{"v":1,"id":..,"device":..,"state":"succeeded","detail":..,"ts":..}`),
//! or not at all, per [`CommandBehavior`]. In [`LineFormat::Binary`] the
//! device speaks edgestream-protocol frames both ways (`Command` in,
//! `Outcome` out), encoded and decoded by that crate, so it is byte for byte
//! what firmware built on it sends. Binary "garbage" is random bytes closed by
//! a `0x00` delimiter, an "over-long line" is an over-long frame, and
//! [`SerialDevice::inject_corrupt_frame`] sends a frame with a bad CRC.
//!
//! Guarantees: every line is written whole or counted in
//! `SerialStats::lines_dropped` (the pty buffer was full because nobody read
//! it); [`SerialDevice::written`] holds exactly the readings of lines that
//! were written whole, in order.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use serialport::{SerialPort, TTYPort};

use edgestream_protocol::frame::{encode_frame, DefaultFrameAccumulator, FeedResult};
use edgestream_protocol::limits::{MAX_BATCH_READINGS, MAX_ENCODED_FRAME_LEN};
use edgestream_protocol::types as proto;

use crate::devices::mqtt::{reply_for, CommandBehavior, MetricSpec, Reading, MAX_DELAYED_REPLIES};

/// Longest command line the device accepts from the agent; longer input is
/// discarded up to its newline.
pub const MAX_COMMAND_LINE: usize = 4096;
/// Readings kept for [`SerialDevice::written`]; past it only counters grow.
pub const MAX_RECORDED_LINES: usize = 1_000_000;
/// Control requests queued for the device thread. Full-policy: block the
/// caller (a test) until the thread catches up; it polls every few ms.
const CONTROL_CAPACITY: usize = 16;
/// How long a write to the pty may wait for buffer space before the line is
/// counted as dropped.
const WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// Idle wait of the device thread between polls (bounds command latency).
const POLL: Duration = Duration::from_millis(5);

/// How sample lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `{"temperature":21.5,"humidity":40.2,"ts":1700000000123,"seq":3}`
    Json,
    /// `temperature=21.5 humidity=40.2 ts=1700000000123 seq=3`
    KeyValue,
    /// `1700000000123,21.5,40.2`: columns are `ts` then the metrics in order
    /// (see [`SerialDevice::csv_columns`]); a sample with a dropout is not
    /// written.
    Csv,
    /// edgestream-protocol binary frames (postcard in CRC-32 COBS frames,
    /// `0x00`-delimited): one `Reading`, or a `Batch` when the sample has
    /// several metrics. Commands arrive as `Command` frames and are answered
    /// with `Outcome` frames.
    Binary,
}

/// Configuration of a serial device.
#[derive(Debug, Clone)]
pub struct SerialDeviceConfig {
    /// Device id (used in the by-id link name and in replies).
    pub name: String,
    /// Metrics and their signals.
    pub metrics: Vec<MetricSpec>,
    /// Lines per second of wall time.
    pub rate_hz: f64,
    /// Signal time per sample (defaults to one wall period).
    pub ts_step: Duration,
    /// Signal time of sample 0 (ms since epoch); `None` = now.
    pub start_ts_ms: Option<i64>,
    /// Whether lines carry `ts` (many microcontrollers have no clock).
    pub with_ts: bool,
    /// Whether JSON and key=value lines carry `seq`.
    pub with_seq: bool,
    /// Line format.
    pub format: LineFormat,
    /// Stop after this many samples.
    pub max_samples: Option<u64>,
    /// Write garbage bytes (and a newline) after every n-th line.
    pub garbage_every: Option<u64>,
    /// Write an over-long line of this many bytes after every n-th line:
    /// `(n, len)`.
    pub overlong_every: Option<(u64, usize)>,
    /// How commands are answered.
    pub commands: CommandBehavior,
    /// Seed for garbage bytes.
    pub seed: u64,
}

impl SerialDeviceConfig {
    /// A device writing key=value lines with `ts` and `seq` at `rate_hz`.
    pub fn new(name: impl Into<String>, metrics: Vec<MetricSpec>, rate_hz: f64) -> Self {
        SerialDeviceConfig {
            name: name.into(),
            metrics,
            rate_hz,
            ts_step: Duration::from_secs_f64(1.0 / rate_hz.max(0.001)),
            start_ts_ms: None,
            with_ts: true,
            with_seq: true,
            format: LineFormat::KeyValue,
            max_samples: None,
            garbage_every: None,
            overlong_every: None,
            commands: CommandBehavior::Succeed,
            seed: 0,
        }
    }
}

/// Why a serial device could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum SerialSimError {
    /// Opening a pty pair failed (no /dev/ptmx in this container?).
    #[error("could not open a pseudo-terminal: {0}")]
    Pty(#[from] serialport::Error),
    /// Creating the directory or symlink failed.
    #[error("serial device I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The device thread is gone.
    #[error("serial device thread has stopped")]
    Stopped,
}

/// Counters of a serial device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Samples taken.
    pub sampled: u64,
    /// Sample lines written whole.
    pub lines_written: u64,
    /// Sample lines not written: the pty buffer stayed full.
    pub lines_dropped: u64,
    /// Samples taken while unplugged.
    pub skipped_unplugged: u64,
    /// Metric values suppressed by a dropout fault.
    pub dropouts: u64,
    /// Garbage injections written.
    pub garbage_injected: u64,
    /// Over-long lines written.
    pub overlong_injected: u64,
    /// Command lines received.
    pub commands: u64,
    /// Reply lines written.
    pub replies: u64,
    /// Times unplugged.
    pub unplugs: u64,
    /// Binary frames from the agent that the device refused.
    pub bad_frames: u64,
    /// Replies dropped: [`MAX_DELAYED_REPLIES`] were already waiting.
    pub replies_dropped: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stats: SerialStats,
    written: Vec<Reading>,
    commands: Vec<Value>,
    pty_path: PathBuf,
    plugged: bool,
    behavior: Option<CommandBehavior>,
    finished: bool,
}

enum Control {
    Unplug,
    Replug(SyncSender<Result<PathBuf, SerialSimError>>),
    Garbage(Vec<u8>),
    Raw(Vec<u8>),
    Stop,
}

/// A running serial device. See the module docs. Dropping it stops the
/// thread and removes the link.
#[derive(Debug)]
pub struct SerialDevice {
    name: String,
    _dir: tempfile::TempDir,
    link: PathBuf,
    csv_columns: Vec<String>,
    format: LineFormat,
    shared: Arc<Mutex<Shared>>,
    control: SyncSender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Unplug => "Unplug",
            Control::Replug(_) => "Replug",
            Control::Garbage(_) => "Garbage",
            Control::Raw(_) => "Raw",
            Control::Stop => "Stop",
        })
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a pty pair and returns the master and the slave's path. The slave
/// fd is closed at once: the agent opens the slave by path, and a slave fd
/// held here would keep the agent's exclusive lock (TIOCEXCL) alive after
/// it closed the port.
///
/// The master is made close-on-exec: `TTYPort::pair` does not, and an agent
/// started as a child process after this would inherit it and keep the pty
/// alive through an unplug, so writes to an "unplugged" device would succeed.
pub(crate) fn open_pty() -> Result<(TTYPort, PathBuf), SerialSimError> {
    let (mut master, slave) = TTYPort::pair()?;
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&master),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| SerialSimError::Io(std::io::Error::from(e)))?;
    let path = slave
        .name()
        .map(PathBuf::from)
        .ok_or_else(|| SerialSimError::Io(std::io::Error::other("pty slave has no name")))?;
    drop(slave);
    master.set_timeout(POLL)?;
    Ok((master, path))
}

pub(crate) fn point_link(link: &Path, target: &Path) -> std::io::Result<()> {
    // Create beside it and rename over it, so the link never disappears: an
    // agent polling the path sees either the old or the new pty.
    let tmp = link.with_extension("new");
    if tmp.symlink_metadata().is_ok() {
        std::fs::remove_file(&tmp)?;
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

impl SerialDevice {
    /// Creates the pty and the link and starts writing.
    pub fn spawn(config: SerialDeviceConfig) -> Result<Self, SerialSimError> {
        let dir = tempfile::Builder::new()
            .prefix("edgestream-serial-")
            .tempdir()?;
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id)?;
        let link = by_id.join(format!("usb-edgestream_sim_{}-if00-port0", config.name));
        let (master, pty_path) = open_pty()?;
        point_link(&link, &pty_path)?;
        let shared = Arc::new(Mutex::new(Shared {
            pty_path,
            plugged: true,
            behavior: Some(config.commands.clone()),
            ..Default::default()
        }));
        let (control, control_rx) = mpsc::sync_channel(CONTROL_CAPACITY);
        let csv_columns = std::iter::once("ts".to_string())
            .chain(config.metrics.iter().map(|m| m.metric.clone()))
            .collect();
        let name = config.name.clone();
        let format = config.format;
        let thread = {
            let shared = Arc::clone(&shared);
            let link = link.clone();
            std::thread::Builder::new()
                .name(format!("serial-{name}"))
                .spawn(move || run(config, master, link, shared, control_rx))?
        };
        Ok(SerialDevice {
            name,
            _dir: dir,
            link,
            csv_columns,
            format,
            shared,
            control,
            thread: Some(thread),
        })
    }

    /// The device id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stable path for the agent (a symlink to the current pty).
    pub fn path(&self) -> &Path {
        &self.link
    }

    /// The pty the link points at now (changes on `replug`).
    pub fn pty_path(&self) -> PathBuf {
        lock(&self.shared).pty_path.clone()
    }

    /// CSV column names for [`LineFormat::Csv`]: `ts`, then the metrics.
    pub fn csv_columns(&self) -> &[String] {
        &self.csv_columns
    }

    /// Readings of the sample lines written whole, in order.
    pub fn written(&self) -> Vec<Reading> {
        lock(&self.shared).written.clone()
    }

    /// Commands received.
    pub fn commands(&self) -> Vec<Value> {
        lock(&self.shared).commands.clone()
    }

    /// Counters.
    pub fn stats(&self) -> SerialStats {
        lock(&self.shared).stats
    }

    /// Whether `max_samples` lines were taken.
    pub fn is_finished(&self) -> bool {
        lock(&self.shared).finished
    }

    /// Whether the device is plugged in.
    pub fn is_plugged(&self) -> bool {
        lock(&self.shared).plugged
    }

    /// Changes how later commands are answered.
    pub fn set_command_behavior(&self, behavior: CommandBehavior) {
        lock(&self.shared).behavior = Some(behavior);
    }

    fn send(&self, c: Control) -> Result<(), SerialSimError> {
        match self.control.try_send(c) {
            Ok(()) => Ok(()),
            // Full-policy: block (see CONTROL_CAPACITY).
            Err(TrySendError::Full(c)) => self.control.send(c).map_err(|_| SerialSimError::Stopped),
            Err(TrySendError::Disconnected(_)) => Err(SerialSimError::Stopped),
        }
    }

    /// Closes the master side: the agent's reads fail (EIO) from now on.
    /// Sampling continues, counted as `skipped_unplugged`.
    pub fn unplug(&self) -> Result<(), SerialSimError> {
        self.send(Control::Unplug)?;
        self.wait_state(|s| !s.plugged, Duration::from_secs(5))
    }

    /// Opens a new pty and re-points the link at it; returns the new pty
    /// path.
    pub fn replug(&self) -> Result<PathBuf, SerialSimError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Control::Replug(tx))?;
        rx.recv().map_err(|_| SerialSimError::Stopped)?
    }

    /// Writes `len` bytes of garbage and a terminator (newline, or `0x00` in
    /// binary mode; never inside the garbage) now.
    pub fn inject_garbage(&self, len: usize) -> Result<(), SerialSimError> {
        let mut rng = StdRng::seed_from_u64(len as u64);
        let mut bytes = garbage(&mut rng, len, terminator(self.format));
        bytes.push(terminator(self.format));
        self.send(Control::Garbage(bytes))
    }

    /// Binary mode: writes one reading frame whose CRC is wrong (one body
    /// byte flipped after encoding), which a receiver must refuse and count.
    pub fn inject_corrupt_frame(&self) -> Result<(), SerialSimError> {
        let msg = proto::DeviceMessage::Reading(proto::Reading {
            device: heapless::String::try_from("corrupt").unwrap_or_default(),
            metric: heapless::String::try_from("temperature").unwrap_or_default(),
            value: 1.0,
            ts: None,
            seq: None,
            quality: None,
        });
        let mut frame = encode_message(&msg).ok_or(SerialSimError::Stopped)?;
        // Flip a bit in the middle, keeping the byte non-zero so COBS
        // framing stays intact and only the CRC check can catch it.
        let mid = frame.len() / 2;
        frame[mid] ^= 0x01;
        if frame[mid] == 0 {
            frame[mid] = 0x02;
        }
        self.send(Control::Raw(frame))
    }

    /// Writes raw bytes as they are (for hand-made faults).
    pub fn write_raw(&self, bytes: &[u8]) -> Result<(), SerialSimError> {
        self.send(Control::Raw(bytes.to_vec()))
    }

    fn wait_state(
        &self,
        pred: impl Fn(&Shared) -> bool,
        timeout: Duration,
    ) -> Result<(), SerialSimError> {
        let deadline = Instant::now() + timeout;
        while !pred(&lock(&self.shared)) {
            if Instant::now() >= deadline || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(SerialSimError::Stopped);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Stops the device thread (the master closes, as on `unplug`).
    pub fn stop(&mut self) {
        if let Err(e) = self.send(Control::Stop) {
            tracing::debug!(device = %self.name, error = %e, "serial device already stopped");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!(device = %self.name, "serial device thread panicked");
            }
        }
    }
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn fmt_value(v: f64) -> String {
    // Shortest text that round-trips, same as serde_json writes.
    let v = (v * 1000.0).round() / 1000.0;
    serde_json::Number::from_f64(v).map_or_else(|| "0".into(), |n| n.to_string())
}

/// Formats one sample; `None` if nothing is to be written.
fn format_line(
    cfg: &SerialDeviceConfig,
    values: &[(String, Option<f64>)],
    ts: i64,
    seq: u32,
) -> Option<String> {
    let present: Vec<(&String, f64)> = values
        .iter()
        .filter_map(|(m, v)| v.map(|v| (m, v)))
        .collect();
    if present.is_empty() {
        return None;
    }
    Some(match cfg.format {
        LineFormat::Json => {
            let mut parts: Vec<String> = present
                .iter()
                .map(|(m, v)| format!("{}:{}", Value::from(m.as_str()), fmt_value(*v)))
                .collect();
            if cfg.with_ts {
                parts.push(format!("\"ts\":{ts}"));
            }
            if cfg.with_seq {
                parts.push(format!("\"seq\":{seq}"));
            }
            format!("{{{}}}", parts.join(","))
        }
        LineFormat::KeyValue => {
            let mut parts: Vec<String> = present
                .iter()
                .map(|(m, v)| format!("{m}={}", fmt_value(*v)))
                .collect();
            if cfg.with_ts {
                parts.push(format!("ts={ts}"));
            }
            if cfg.with_seq {
                parts.push(format!("seq={seq}"));
            }
            parts.join(" ")
        }
        LineFormat::Binary => return None,
        LineFormat::Csv => {
            if present.len() != values.len() {
                return None;
            }
            std::iter::once(ts.to_string())
                .chain(present.iter().map(|(_, v)| fmt_value(*v)))
                .collect::<Vec<_>>()
                .join(",")
        }
    })
}

/// The bytes of one sample, terminator included; `None` if nothing is to be
/// written.
fn encode_sample(
    cfg: &SerialDeviceConfig,
    values: &[(String, Option<f64>)],
    ts: i64,
    seq: u32,
) -> Option<Vec<u8>> {
    if cfg.format != LineFormat::Binary {
        let mut bytes = format_line(cfg, values, ts, seq)?.into_bytes();
        bytes.push(b'\n');
        return Some(bytes);
    }
    let readings: Vec<proto::Reading> = values
        .iter()
        .filter_map(|(metric, v)| {
            let v = (*v)?;
            Some(proto::Reading {
                device: heapless::String::try_from(cfg.name.as_str()).ok()?,
                metric: heapless::String::try_from(metric.as_str()).ok()?,
                value: v,
                ts: if cfg.with_ts {
                    u64::try_from(ts).ok()
                } else {
                    None
                },
                seq: cfg.with_seq.then_some(seq),
                quality: None,
            })
        })
        .collect();
    let mut out = Vec::new();
    // One Reading per frame if alone, else batches of at most
    // MAX_BATCH_READINGS, as firmware with a fixed batch buffer would send.
    let messages: Vec<proto::DeviceMessage> = if readings.len() == 1 {
        readings
            .into_iter()
            .map(proto::DeviceMessage::Reading)
            .collect()
    } else {
        readings
            .chunks(MAX_BATCH_READINGS)
            .map(|chunk| {
                let mut batch = proto::ReadingBatch::default();
                for r in chunk {
                    // Cannot fail: chunks are at most the batch capacity.
                    if batch.readings.push(r.clone()).is_err() {
                        tracing::error!("batch overflow despite chunking");
                    }
                }
                proto::DeviceMessage::Batch(batch)
            })
            .collect()
    };
    for m in &messages {
        out.extend_from_slice(&encode_message(m)?);
    }
    (!out.is_empty()).then_some(out)
}

/// One complete frame (delimiter included), or `None` if the message is
/// invalid for the protocol (e.g. a name too long), logged.
fn encode_message(msg: &proto::DeviceMessage) -> Option<Vec<u8>> {
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    match encode_frame(msg, &mut buf) {
        Ok(frame) => Some(frame.to_vec()),
        Err(e) => {
            tracing::warn!(error = ?e, "cannot encode a frame");
            None
        }
    }
}

/// Writes all of `bytes` or reports why not. A timeout means the pty buffer
/// is full (nobody reads the slave).
fn write_all(master: &mut TTYPort, bytes: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut off = 0;
    while off < bytes.len() {
        match master.write(&bytes[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if off < bytes.len() && Instant::now() >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
    }
    Ok(())
}

fn run(
    mut cfg: SerialDeviceConfig,
    master: TTYPort,
    link: PathBuf,
    shared: Arc<Mutex<Shared>>,
    control: Receiver<Control>,
) {
    let mut master = Some(master);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let start_ts = cfg.start_ts_ms.unwrap_or_else(now_ms);
    let step_ms = cfg.ts_step.as_secs_f64() * 1000.0;
    let period = Duration::from_secs_f64(1.0 / cfg.rate_hz.max(0.001));
    let mut next_tick = Instant::now();
    let mut index: u64 = 0;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut discarding = false;
    let mut frames = Box::new(DefaultFrameAccumulator::new());
    // Replies waiting for their time (immediate ones are due at once).
    let mut replies: Vec<(Instant, Value)> = Vec::new();
    loop {
        // Control requests first: a test's unplug must take effect before
        // the next line.
        while let Ok(c) = control.try_recv() {
            match c {
                Control::Stop => return,
                Control::Unplug => {
                    master = None;
                    let mut s = lock(&shared);
                    s.plugged = false;
                    s.stats.unplugs += 1;
                }
                Control::Replug(reply) => {
                    // A new port: no partial line or frame carries over.
                    inbuf.clear();
                    discarding = false;
                    frames.reset();
                    let result = open_pty().and_then(|(m, path)| {
                        point_link(&link, &path)?;
                        master = Some(m);
                        let mut s = lock(&shared);
                        s.plugged = true;
                        s.pty_path = path.clone();
                        Ok(path)
                    });
                    if reply.send(result).is_err() {
                        tracing::debug!("replug requester went away");
                    }
                }
                Control::Garbage(bytes) => {
                    if let Some(m) = master.as_mut() {
                        if write_all(m, &bytes).is_ok() {
                            lock(&shared).stats.garbage_injected += 1;
                        }
                    }
                }
                Control::Raw(bytes) => {
                    if let Some(m) = master.as_mut() {
                        if let Err(e) = write_all(m, &bytes) {
                            tracing::debug!(error = %e, "raw serial write failed");
                        }
                    }
                }
            }
        }

        let done = cfg.max_samples.is_some_and(|m| index >= m);
        if done {
            lock(&shared).finished = true;
        }
        if !done && Instant::now() >= next_tick {
            next_tick += period;
            sample(
                &mut cfg,
                &mut master,
                &shared,
                &mut rng,
                index,
                start_ts,
                step_ms,
            );
            index += 1;
        }

        if let Some(m) = master.as_mut() {
            if !replies.is_empty() {
                send_due_replies(&cfg.name, cfg.format, &mut replies, m, &shared);
            }
        }

        // Read commands; the read's timeout is also this loop's sleep.
        match master.as_mut() {
            Some(m) => {
                let mut buf = [0u8; 512];
                match m.read(&mut buf) {
                    Ok(n) if n > 0 && cfg.format == LineFormat::Binary => {
                        let mut input = &buf[..n];
                        loop {
                            match frames.feed(input) {
                                FeedResult::Consumed => break,
                                FeedResult::Frame { message, remaining } => {
                                    if let Some(c) = command_from_frame(&cfg.name, message) {
                                        queue_reply(&cfg.name, c, &mut replies, &shared);
                                    }
                                    input = remaining;
                                }
                                FeedResult::Error { error, remaining } => {
                                    tracing::debug!(?error, "device refused a frame");
                                    lock(&shared).stats.bad_frames += 1;
                                    input = remaining;
                                }
                            }
                        }
                    }
                    Ok(n) if n > 0 => {
                        for &b in &buf[..n] {
                            if b == b'\n' {
                                if !discarding {
                                    let line = std::mem::take(&mut inbuf);
                                    if let Some(c) = command_from_line(&line) {
                                        queue_reply(&cfg.name, c, &mut replies, &shared);
                                    }
                                }
                                inbuf.clear();
                                discarding = false;
                            } else if inbuf.len() >= MAX_COMMAND_LINE {
                                discarding = true;
                                inbuf.clear();
                            } else if !discarding {
                                inbuf.push(b);
                            }
                        }
                    }
                    // EIO: no process has the slave open yet. Not an error
                    // for a device; wait for one.
                    Ok(_) | Err(_) => std::thread::sleep(POLL),
                }
            }
            None => std::thread::sleep(POLL),
        }
    }
}

fn sample(
    cfg: &mut SerialDeviceConfig,
    master: &mut Option<TTYPort>,
    shared: &Mutex<Shared>,
    rng: &mut StdRng,
    index: u64,
    start_ts: i64,
    step_ms: f64,
) {
    let t_s = index as f64 * step_ms / 1000.0;
    let ts = start_ts + (index as f64 * step_ms).round() as i64;
    let seq = u32::try_from(index).unwrap_or(u32::MAX);
    let values: Vec<(String, Option<f64>)> = cfg
        .metrics
        .iter_mut()
        .map(|m| {
            let v = m.signal.sample(t_s).map(|v| (v * 1000.0).round() / 1000.0);
            (m.metric.clone(), v)
        })
        .collect();
    let dropouts = values.iter().filter(|(_, v)| v.is_none()).count() as u64;
    {
        let mut s = lock(shared);
        s.stats.sampled += 1;
        s.stats.dropouts += dropouts;
    }
    let Some(m) = master.as_mut() else {
        lock(shared).stats.skipped_unplugged += 1;
        return;
    };
    let Some(bytes) = encode_sample(cfg, &values, ts, seq) else {
        return;
    };
    match write_all(m, &bytes) {
        Ok(()) => {
            let mut s = lock(shared);
            s.stats.lines_written += 1;
            if s.written.len() + values.len() <= MAX_RECORDED_LINES {
                for (metric, v) in &values {
                    if let Some(v) = v {
                        s.written.push(Reading {
                            device: cfg.name.clone(),
                            metric: metric.clone(),
                            value: *v,
                            ts,
                            seq,
                        });
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(device = %cfg.name, error = %e, "serial line dropped");
            lock(shared).stats.lines_dropped += 1;
            return;
        }
    }
    let n = index + 1;
    if cfg.garbage_every.is_some_and(|g| g > 0 && n % g == 0) {
        let mut line = garbage(rng, 16, terminator(cfg.format));
        line.push(terminator(cfg.format));
        if write_all(m, &line).is_ok() {
            lock(shared).stats.garbage_injected += 1;
        }
    }
    if let Some((every, len)) = cfg.overlong_every {
        if every > 0 && n % every == 0 {
            let mut line = b"overlong=".to_vec();
            line.resize(len.max(10), b'9');
            line.push(terminator(cfg.format));
            if write_all(m, &line).is_ok() {
                lock(shared).stats.overlong_injected += 1;
            }
        }
    }
}

/// What ends a line or frame in `format`.
fn terminator(format: LineFormat) -> u8 {
    match format {
        LineFormat::Binary => 0,
        _ => b'\n',
    }
}

/// `len` random bytes none of which is `terminator`.
fn garbage(rng: &mut StdRng, len: usize, terminator: u8) -> Vec<u8> {
    (0..len)
        .map(|_| loop {
            let b: u8 = rng.random();
            if b != terminator {
                break b;
            }
        })
        .collect()
}

/// Records a command and decides the reply: `(delay, reply JSON)`, or `None`
/// to stay silent.
fn take_command(device: &str, command: Value, shared: &Mutex<Shared>) -> Option<(Duration, Value)> {
    let behavior = {
        let mut s = lock(shared);
        s.stats.commands += 1;
        if s.commands.len() < MAX_RECORDED_LINES {
            s.commands.push(command.clone());
        }
        s.behavior.clone().unwrap_or(CommandBehavior::Succeed)
    };
    reply_for(device, &command, &behavior).map(|r| (behavior.delay(), r))
}

/// The command in a frame from the agent, as JSON; `None` for frames that
/// are not commands (a device ignores those).
fn command_from_frame(device: &str, message: proto::DeviceMessage) -> Option<Value> {
    let proto::DeviceMessage::Command(cmd) = message else {
        tracing::debug!(%device, "device ignores a non-command frame");
        return None;
    };
    Some(serde_json::to_value(&cmd).unwrap_or(Value::Null))
}

/// The command on a text line, as JSON (a line that is not JSON is recorded
/// as a string and gets no reply: it has no id).
fn command_from_line(line: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())))
}

/// Encodes a reply, stamped now, as a JSON line or an `Outcome` frame.
fn encode_reply(device: &str, mut reply: Value, format: LineFormat) -> Option<Vec<u8>> {
    reply["ts"] = Value::from(now_ms());
    if format != LineFormat::Binary {
        let mut bytes = reply.to_string().into_bytes();
        bytes.push(b'\n');
        return Some(bytes);
    }
    let state = match reply["state"].as_str() {
        Some("succeeded") => proto::OutcomeState::Succeeded,
        _ => proto::OutcomeState::Failed,
    };
    let mut detail = heapless::String::new();
    for ch in reply["detail"].as_str().unwrap_or_default().chars() {
        // Truncate to the protocol's limit rather than fail the reply.
        if detail.push(ch).is_err() {
            break;
        }
    }
    let outcome = proto::DeviceMessage::Outcome(proto::CommandOutcome {
        id: heapless::String::try_from(reply["id"].as_str().unwrap_or_default()).ok()?,
        device: heapless::String::try_from(device).ok()?,
        state,
        detail,
        ts: u64::try_from(now_ms()).ok(),
    });
    encode_message(&outcome)
}

fn queue_reply(
    device: &str,
    command: Value,
    replies: &mut Vec<(Instant, Value)>,
    shared: &Mutex<Shared>,
) {
    let Some((delay, reply)) = take_command(device, command, shared) else {
        return;
    };
    if replies.len() < MAX_DELAYED_REPLIES {
        replies.push((Instant::now() + delay, reply));
    } else {
        lock(shared).stats.replies_dropped += 1;
    }
}

/// Writes the replies whose time has come.
fn send_due_replies(
    device: &str,
    format: LineFormat,
    pending: &mut Vec<(Instant, Value)>,
    master: &mut TTYPort,
    shared: &Mutex<Shared>,
) {
    let now = Instant::now();
    let (due, waiting): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(t, _)| *t <= now);
    *pending = waiting;
    for (_, reply) in due {
        let Some(bytes) = encode_reply(device, reply, format) else {
            continue;
        };
        match write_all(master, &bytes) {
            Ok(()) => lock(shared).stats.replies += 1,
            Err(e) => tracing::debug!(%device, error = %e, "reply dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{Profile, Signal};

    fn cfg(format: LineFormat) -> SerialDeviceConfig {
        let mut c = SerialDeviceConfig::new(
            "s1",
            vec![
                MetricSpec::new("temperature", Signal::new(Profile::Constant(21.5), 0.0, 1)),
                MetricSpec::new("humidity", Signal::new(Profile::Constant(40.0), 0.0, 2)),
            ],
            10.0,
        );
        c.format = format;
        c
    }

    #[test]
    fn line_formats() {
        let v = vec![
            ("temperature".to_string(), Some(21.5)),
            ("humidity".to_string(), Some(40.0)),
        ];
        assert_eq!(
            format_line(&cfg(LineFormat::Json), &v, 5, 3).unwrap(),
            r#"{"temperature":21.5,"humidity":40.0,"ts":5,"seq":3}"#
        );
        assert_eq!(
            format_line(&cfg(LineFormat::KeyValue), &v, 5, 3).unwrap(),
            "temperature=21.5 humidity=40.0 ts=5 seq=3"
        );
        assert_eq!(
            format_line(&cfg(LineFormat::Csv), &v, 5, 3).unwrap(),
            "5,21.5,40.0"
        );
        let dropped = vec![
            ("temperature".to_string(), None),
            ("humidity".to_string(), Some(40.0)),
        ];
        assert_eq!(format_line(&cfg(LineFormat::Csv), &dropped, 5, 3), None);
        assert_eq!(
            format_line(&cfg(LineFormat::KeyValue), &dropped, 5, 3).unwrap(),
            "humidity=40.0 ts=5 seq=3"
        );
    }
}
