//! The serial source: one per configured port (`[[serial]]`), turning the bytes a device
//! writes into [`Reading`]s, in the protocol crate's binary frames or text lines (JSON,
//! key=value, CSV with a column map; protocol/README.md sections 1 and 2).
//!
//! Guarantees and limits:
//! - **Own OS thread, bounded hand-off.** serialport I/O is blocking (and `read` can overrun
//!   its timeout with a misbehaving USB device), so each port is read on its own
//!   thread, which hands readings to the rules stage with `blocking_send` on the shared
//!   [`SourceMsg`] channel. Full-policy **block**: when the rules stage is behind, the thread
//!   stops reading, the kernel's tty buffer fills, and then the device's writes fail or stall.
//!   That is where data can be lost under sustained overload, not inside the agent.
//! - **No acknowledgement, so no redelivery.** A serial device cannot resend: readings carry no
//!   [`Ack`](super::Ack). What the thread read but the outbox has not yet stored (at most the
//!   channel's contents plus one read) is lost if the agent crashes or is killed. A graceful
//!   shutdown loses nothing that was read: the thread finishes the read in hand, stops reading
//!   on `stop_intake`, and the rules stage drains the channel. Only a partial line or frame
//!   (bytes without their terminator yet) is dropped.
//! - **Unplug and replug.** `read` returning 0 bytes or an error other than a timeout is a
//!   disconnect (on Linux an unplugged USB adapter reads `Ok(0)`; a closed pty gives EIO). The
//!   port is closed and reopened by its configured path (use `/dev/serial/by-id/...`) with
//!   jittered exponential backoff ([`Backoff`]); the thread sleeps between attempts, so an
//!   unplugged port costs no CPU. Each state change is logged once: "serial port open",
//!   "serial port lost", and the first failed open of an outage; retries log at debug.
//!   A partial line or frame does not carry over to the next connection.
//! - **Garbage never stops good frames.** Random bytes, over-long lines and frames, bad CRCs,
//!   unparsable lines each reject exactly one unit (the protocol accumulators resynchronise on
//!   the next terminator), are counted in `rejected_serial`, and are sampled upstream as dead
//!   letters by [`RejectSampler`] with the location `{path} line {n}` / `{path} frame {n}`
//!   (`n` counts the port's non-blank lines or non-empty frames since the agent started).
//!   The sample holds the rejected unit's bytes from the read that completed it.
//! - Memory is fixed per port: one read buffer ([`READ_CHUNK`]) and one line or frame
//!   accumulator (the protocol's `MAX_LINE_LEN` / `MAX_ENCODED_FRAME_LEN`).
//! - **Commands.** Between two reads (so at least every [`READ_TIMEOUT`]) the thread writes the
//!   commands the router handed it ([`PortLink`]): a `Command` frame on a binary port, a JSON
//!   line on a text port, and reports each write's result. Device replies (an `Outcome` frame,
//!   or a JSON line with `id` and `state`) go to the router; devices heard on the port are
//!   learned so that commands for them are routed here. While the port is closed the router
//!   hands it nothing, and commands caught in the hand-off are given back.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use edgestream_protocol::frame::{DefaultFrameAccumulator, FeedResult};
use edgestream_protocol::text::{
    parse_json_line, parse_kv_line, CsvMap, DefaultLineAccumulator, LineFeed, TextRecord,
};
use edgestream_protocol::types::{Command, CommandOutcome, DeviceId, DeviceMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::reading::{now_ms, Reading, SourceMsg};
use crate::backoff::Backoff;
use crate::commands::routes::DeviceEvent;
use crate::commands::routes::{PortLink, MAX_LEARNED_DEVICES};
use crate::deadletter::RejectSampler;
use crate::source::config::{SerialConfig, SerialFlowControl, SerialFraming, SerialParity};
use crate::telemetry::metrics::Metrics;

/// Bytes taken from the port per `read`.
pub const READ_CHUNK: usize = 1024;
/// Longest a `read` waits for data. Bounds how long the thread takes to notice `stop_intake`;
/// waking this often costs nothing measurable.
pub const READ_TIMEOUT: Duration = Duration::from_millis(250);
const SOURCE: &str = "serial";

/// Why a serial source cannot be built (the config's validation catches these first).
#[derive(Debug, thiserror::Error)]
pub enum SerialSourceError {
    /// The CSV column map or the configured device is refused; fix the `[[serial]]` entry.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The OS would not start the port's thread; the system is out of threads or memory.
    #[error("{path}: cannot start the reader thread: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a complete line becomes a record.
#[derive(Debug, Clone)]
enum LineParser {
    Json,
    KeyValue,
    // Boxed: a column map holds 16 metric names inline (about 1 KiB).
    Csv(Box<CsvMap>),
}

impl LineParser {
    fn parse(&self, line: &str) -> Result<TextRecord, edgestream_protocol::text::TextError> {
        match self {
            LineParser::Json => parse_json_line(line),
            LineParser::KeyValue => parse_kv_line(line),
            LineParser::Csv(map) => map.parse(line),
        }
    }
}

#[derive(Debug)]
enum Framing {
    // Boxed: the accumulators are fixed arrays of about 1 KiB and 257 bytes.
    Binary(Box<DefaultFrameAccumulator>),
    Text {
        lines: Box<DefaultLineAccumulator>,
        parser: LineParser,
        device: Option<DeviceId>,
    },
}

/// What one unit (line or frame) of input turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Reading(Reading),
    /// A device's reply to a command (an `Outcome` frame or a JSON reply line).
    Outcome(Box<CommandOutcome>),
    /// A refused unit: its number on this port, why, and its bytes from the current read.
    Rejected {
        unit: u64,
        reason: String,
        bytes: Vec<u8>,
    },
}

/// Turns a port's byte stream into [`Decoded`] units. No I/O: bytes in, values out.
#[derive(Debug)]
pub struct PortDecoder {
    framing: Framing,
    /// Units (non-blank lines or non-empty frames) seen so far.
    units: u64,
}

impl PortDecoder {
    pub fn new(config: &SerialConfig) -> Result<Self, String> {
        let parser = match config.framing {
            SerialFraming::Binary => {
                return Ok(Self {
                    framing: Framing::Binary(Box::default()),
                    units: 0,
                })
            }
            SerialFraming::Json => LineParser::Json,
            SerialFraming::KeyValue => LineParser::KeyValue,
            SerialFraming::Csv => LineParser::Csv(Box::new(config.csv_map()?)),
        };
        let device = match &config.device {
            Some(d) => Some(
                DeviceId::try_from(d.as_str()).map_err(|_| format!("device {d:?} is too long"))?,
            ),
            None => None,
        };
        Ok(Self {
            framing: Framing::Text {
                lines: Box::default(),
                parser,
                device,
            },
            units: 0,
        })
    }

    /// Forgets a partial line or frame (the port was reopened: its end will never come).
    pub fn reset(&mut self) {
        match &mut self.framing {
            Framing::Binary(acc) => acc.reset(),
            Framing::Text { lines, .. } => lines.reset(),
        }
    }

    /// Decodes `input`, appending one or more entries per complete unit to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Decoded>) {
        match &mut self.framing {
            Framing::Binary(acc) => loop {
                let before = input;
                match acc.feed(input) {
                    FeedResult::Consumed => break,
                    FeedResult::Frame { message, remaining } => {
                        self.units += 1;
                        input = remaining;
                        frame_readings(message, self.units, unit_bytes(before, remaining), out);
                    }
                    FeedResult::Error { error, remaining } => {
                        self.units += 1;
                        out.push(Decoded::Rejected {
                            unit: self.units,
                            reason: error.to_string(),
                            bytes: unit_bytes(before, remaining).to_vec(),
                        });
                        input = remaining;
                    }
                }
            },
            Framing::Text {
                lines,
                parser,
                device,
            } => loop {
                let before = input;
                match lines.feed(input) {
                    LineFeed::Consumed => break,
                    LineFeed::Line { line, remaining } => {
                        self.units += 1;
                        input = remaining;
                        let reply = looks_like_reply(line)
                            .then(|| edgestream_protocol::json::decode_outcome(line.as_bytes()));
                        match (reply, parser.parse(line)) {
                            (Some(Ok(outcome)), _) => out.push(Decoded::Outcome(Box::new(outcome))),
                            (_, Ok(rec)) => {
                                line_readings(&rec, device.as_ref(), self.units, line, out)
                            }
                            (Some(Err(e)), Err(_)) => out.push(Decoded::Rejected {
                                unit: self.units,
                                reason: format!("command reply: {e}"),
                                bytes: line.as_bytes().to_vec(),
                            }),
                            (None, Err(e)) => out.push(Decoded::Rejected {
                                unit: self.units,
                                reason: e.to_string(),
                                bytes: line.as_bytes().to_vec(),
                            }),
                        }
                    }
                    LineFeed::Error { error, remaining } => {
                        self.units += 1;
                        out.push(Decoded::Rejected {
                            unit: self.units,
                            reason: error.to_string(),
                            bytes: unit_bytes(before, remaining).to_vec(),
                        });
                        input = remaining;
                    }
                }
            },
        }
    }

    fn unit_name(&self) -> &'static str {
        match self.framing {
            Framing::Binary(_) => "frame",
            Framing::Text { .. } => "line",
        }
    }
}

/// A JSON line with `id` and `state` keys is a command reply (protocol/README.md), not a
/// reading; a reading line with such metric names still parses as a reading.
fn looks_like_reply(line: &str) -> bool {
    line.trim_start().starts_with('{') && line.contains("\"state\"") && line.contains("\"id\"")
}

/// The bytes that carry `cmd` on a port with `framing`: a frame, or a JSON line.
pub fn command_bytes(framing: SerialFraming, cmd: &Command) -> Result<Vec<u8>, String> {
    if framing == SerialFraming::Binary {
        let mut buf = [0u8; edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN + 1];
        let msg = DeviceMessage::Command(cmd.clone());
        return edgestream_protocol::frame::encode_frame(&msg, &mut buf)
            .map(<[u8]>::to_vec)
            .map_err(|e| format!("cannot encode the command frame: {e:?}"));
    }
    let mut line = Vec::with_capacity(192);
    edgestream_protocol::json::encode_command(cmd, &mut line).map_err(|e| e.to_string())?;
    line.push(b'\n');
    Ok(line)
}

/// The part of a unit that was in this read: `before` up to where `remaining` starts, without
/// the terminator.
fn unit_bytes<'a>(before: &'a [u8], remaining: &[u8]) -> &'a [u8] {
    let used = before.len() - remaining.len();
    &before[..used.saturating_sub(1)]
}

fn frame_readings(message: DeviceMessage, unit: u64, bytes: &[u8], out: &mut Vec<Decoded>) {
    let reading = |r: edgestream_protocol::types::Reading| {
        Decoded::Reading(Reading {
            device: r.device,
            metric: r.metric,
            value: r.value,
            ts_ms: r.ts.unwrap_or_else(now_ms),
        })
    };
    match message {
        DeviceMessage::Reading(r) => out.push(reading(r)),
        DeviceMessage::Batch(b) => out.extend(b.readings.into_iter().map(reading)),
        DeviceMessage::Outcome(o) => out.push(Decoded::Outcome(Box::new(o))),
        DeviceMessage::Command(_) => out.push(Decoded::Rejected {
            unit,
            reason: "a device sent a command frame (commands go from gateway to device)".into(),
            bytes: bytes.to_vec(),
        }),
    }
}

fn line_readings(
    rec: &TextRecord,
    default_device: Option<&DeviceId>,
    unit: u64,
    line: &str,
    out: &mut Vec<Decoded>,
) {
    let Some(device) = rec.device.as_ref().or(default_device) else {
        out.push(Decoded::Rejected {
            unit,
            reason: "the line names no device and the port has no `device` configured".into(),
            bytes: line.as_bytes().to_vec(),
        });
        return;
    };
    let ts_ms = rec.ts.unwrap_or_else(now_ms);
    out.extend(rec.values.iter().map(|(metric, value)| {
        Decoded::Reading(Reading {
            device: device.clone(),
            metric: metric.clone(),
            value: *value,
            ts_ms,
        })
    }));
}

/// A configured port and its decoder; [`SerialSource::spawn`] starts its thread.
#[derive(Debug)]
pub struct SerialSource {
    config: SerialConfig,
    decoder: PortDecoder,
    /// Commands for this port and the routing table (`None`: read only).
    link: Option<PortLink>,
    /// Devices already reported to the routing table by this thread.
    learned: HashSet<String>,
}

/// How one connection ended.
enum Ended {
    Stopped,
    RulesStageGone,
    Lost { why: String, got_data: bool },
}

impl SerialSource {
    pub fn new(config: SerialConfig) -> Result<Self, SerialSourceError> {
        let decoder = PortDecoder::new(&config).map_err(|message| SerialSourceError::Config {
            path: config.path.clone(),
            message,
        })?;
        Ok(Self {
            config,
            decoder,
            link: None,
            learned: HashSet::new(),
        })
    }

    /// Lets the port carry commands to its devices and their replies back.
    pub fn with_link(mut self, link: PortLink) -> Self {
        self.link = Some(link);
        self
    }

    fn set_open(&self, open: bool) {
        if let Some(l) = &self.link {
            l.routes.set_open(l.index, open);
            if !open {
                // Commands caught in the hand-off go back to the router's queue.
                while let Ok(cmd) = l.commands.try_recv() {
                    let back = DeviceEvent::Written {
                        id: cmd.id.to_string(),
                        port: l.index,
                        error: Some("serial port closed before the write".into()),
                    };
                    if l.events.blocking_send(back).is_err() {
                        // The router has stopped; the command stays in its saved table.
                        break;
                    }
                }
            }
        }
    }

    /// Writes the commands waiting for this port; an error means the port is lost.
    fn write_commands(&self, port: &mut serialport::TTYPort) -> Result<(), String> {
        let Some(l) = &self.link else {
            return Ok(());
        };
        while let Ok(cmd) = l.commands.try_recv() {
            let written = command_bytes(self.config.framing, &cmd).and_then(|bytes| {
                port.write_all(&bytes)
                    .and_then(|()| port.flush())
                    .map_err(|e| format!("write failed: {e}"))
            });
            let report = DeviceEvent::Written {
                id: cmd.id.to_string(),
                port: l.index,
                error: written.as_ref().err().cloned(),
            };
            if l.events.blocking_send(report).is_err() {
                // The router has stopped; the command's state is in its saved table.
                tracing::debug!(id = %cmd.id, "write result not reported: router stopped");
            }
            written?;
        }
        Ok(())
    }

    /// Tells the routing table (once per device) that `device` is on this port.
    fn learn(&mut self, device: &str) {
        let Some(l) = &self.link else {
            return;
        };
        if self.learned.len() < MAX_LEARNED_DEVICES && !self.learned.contains(device) {
            self.learned.insert(device.to_string());
            l.routes.learn(device, l.index);
        }
    }

    /// Starts the port's reader thread. Must be called inside the tokio runtime (the thread
    /// uses its timer to sleep between reconnects and wake at once on `stop_intake`). The
    /// thread ends, dropping `out`, soon after `stop_intake` is cancelled.
    pub fn spawn(
        self,
        out: mpsc::Sender<SourceMsg>,
        metrics: Arc<Metrics>,
        stop_intake: CancellationToken,
    ) -> Result<JoinHandle<()>, SerialSourceError> {
        let runtime = tokio::runtime::Handle::current();
        let path = self.config.path.clone();
        let name = format!(
            "serial-{}",
            path.file_name()
                .map(|f| f.to_string_lossy().chars().take(8).collect::<String>())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let span = tracing::info_span!("serial", port = %self.config.path.display());
                let _entered = span.enter();
                self.run(out, metrics, stop_intake, runtime);
            })
            .map_err(|source| SerialSourceError::Thread { path, source })
    }

    fn open(&self) -> serialport::Result<serialport::TTYPort> {
        let c = &self.config;
        serialport::new(c.path.to_string_lossy(), c.baud_rate)
            .data_bits(match c.data_bits {
                5 => serialport::DataBits::Five,
                6 => serialport::DataBits::Six,
                7 => serialport::DataBits::Seven,
                _ => serialport::DataBits::Eight,
            })
            .parity(match c.parity {
                SerialParity::None => serialport::Parity::None,
                SerialParity::Odd => serialport::Parity::Odd,
                SerialParity::Even => serialport::Parity::Even,
            })
            .stop_bits(match c.stop_bits {
                2 => serialport::StopBits::Two,
                _ => serialport::StopBits::One,
            })
            .flow_control(match c.flow_control {
                SerialFlowControl::None => serialport::FlowControl::None,
                SerialFlowControl::Software => serialport::FlowControl::Software,
                SerialFlowControl::Hardware => serialport::FlowControl::Hardware,
            })
            .timeout(READ_TIMEOUT)
            .open_native()
    }

    fn run(
        mut self,
        out: mpsc::Sender<SourceMsg>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        runtime: tokio::runtime::Handle,
    ) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_min_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let mut sampler = RejectSampler::new(SOURCE);
        // Whether the current outage was logged: one line per state change, not per retry.
        let mut outage_logged = false;
        while !stop.is_cancelled() {
            let mut port = match self.open() {
                Ok(port) => port,
                Err(e) => {
                    if outage_logged {
                        tracing::debug!(error = %e, "serial port still cannot be opened");
                    } else {
                        tracing::warn!(error = %e, "cannot open serial port; retrying with backoff");
                        outage_logged = true;
                    }
                    if sleep_unless_stopped(&runtime, &stop, backoff.next_delay()) {
                        break;
                    }
                    continue;
                }
            };
            tracing::info!(baud_rate = self.config.baud_rate, "serial port open");
            Metrics::inc(&metrics.serial_connects);
            metrics.serial_ports_open.fetch_add(1, Ordering::Relaxed);
            self.decoder.reset();
            self.set_open(true);
            let ended = self.read_until_lost(&mut port, &out, &metrics, &mut sampler, &stop);
            self.set_open(false);
            drop(port);
            metrics.serial_ports_open.fetch_sub(1, Ordering::Relaxed);
            match ended {
                Ended::Stopped => break,
                Ended::RulesStageGone => {
                    tracing::error!("rules stage has stopped; no longer reading the port");
                    break;
                }
                Ended::Lost { why, got_data } => {
                    Metrics::inc(&metrics.serial_disconnects);
                    tracing::warn!(reason = %why, "serial port lost; reopening with backoff");
                    outage_logged = true;
                    // A connection that carried data was a real one: start the next outage at
                    // the shortest wait. One that failed at once keeps growing the backoff, so a
                    // port that opens and drops in a loop is not hammered.
                    if got_data {
                        backoff.reset();
                    }
                    if sleep_unless_stopped(&runtime, &stop, backoff.next_delay()) {
                        break;
                    }
                }
            }
        }
        // `out` is dropped here, which lets the rules stage finish draining.
        tracing::info!("serial source stopped");
    }

    fn read_until_lost(
        &mut self,
        port: &mut serialport::TTYPort,
        out: &mpsc::Sender<SourceMsg>,
        metrics: &Metrics,
        sampler: &mut RejectSampler,
        stop: &CancellationToken,
    ) -> Ended {
        let mut buf = [0u8; READ_CHUNK];
        let mut decoded = Vec::new();
        let mut got_data = false;
        let path = self.config.path.display().to_string();
        loop {
            // Checked between reads only: what a read returned is always forwarded, so a
            // graceful stop loses nothing that left the kernel's buffer.
            if stop.is_cancelled() {
                return Ended::Stopped;
            }
            if let Err(why) = self.write_commands(port) {
                return Ended::Lost { why, got_data };
            }
            let n = match port.read(&mut buf) {
                Ok(0) => {
                    return Ended::Lost {
                        why: "end of data (device unplugged?)".into(),
                        got_data,
                    }
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    return Ended::Lost {
                        why: e.to_string(),
                        got_data,
                    }
                }
            };
            got_data = true;
            Metrics::add(&metrics.serial_bytes, n as u64);
            self.decoder.feed(&buf[..n], &mut decoded);
            let unit_name = self.decoder.unit_name();
            for d in decoded.drain(..) {
                let msg = match d {
                    Decoded::Reading(r) => {
                        Metrics::inc(&metrics.readings_in_serial);
                        self.learn(&r.device);
                        SourceMsg::Reading(r, None)
                    }
                    Decoded::Outcome(outcome) => {
                        Metrics::inc(&metrics.serial_outcomes);
                        match &self.link {
                            Some(l) => {
                                let reply = DeviceEvent::Reply { outcome, ack: None };
                                if l.events.blocking_send(reply).is_err() {
                                    tracing::warn!("command router has stopped; reply dropped");
                                }
                            }
                            None => {
                                tracing::debug!(id = %outcome.id, "command reply on a port without commands")
                            }
                        }
                        continue;
                    }
                    Decoded::Rejected {
                        unit,
                        reason,
                        bytes,
                    } => {
                        Metrics::inc(&metrics.rejected_serial);
                        let location = format!("{path} {unit_name} {unit}");
                        match sampler.reject(&location, &reason, &bytes) {
                            Some(sample) => SourceMsg::Rejected(Some(sample), None),
                            None => {
                                Metrics::inc(&metrics.deadletters_suppressed);
                                continue;
                            }
                        }
                    }
                };
                // Full-policy block (module doc): this thread waits for room, the tty buffer
                // holds what the device writes meanwhile.
                if out.blocking_send(msg).is_err() {
                    return Ended::RulesStageGone;
                }
            }
        }
    }
}

/// Sleeps `delay` on the runtime's timer; returns `true` at once if `stop` is cancelled.
fn sleep_unless_stopped(
    runtime: &tokio::runtime::Handle,
    stop: &CancellationToken,
    delay: Duration,
) -> bool {
    runtime.block_on(async {
        tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use edgestream_protocol::frame::encode_frame;
    use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
    use edgestream_protocol::types as proto;

    fn text(framing: SerialFraming, device: Option<&str>) -> PortDecoder {
        let mut c = SerialConfig::new("/dev/null", framing);
        c.device = device.map(String::from);
        if framing == SerialFraming::Csv {
            c.columns = vec!["ts".into(), "temperature".into(), "_".into()];
        }
        PortDecoder::new(&c).unwrap()
    }

    fn readings(d: &[Decoded]) -> Vec<(String, String, f64, u64)> {
        d.iter()
            .filter_map(|d| match d {
                Decoded::Reading(r) => {
                    Some((r.device.to_string(), r.metric.to_string(), r.value, r.ts_ms))
                }
                _ => None,
            })
            .collect()
    }

    fn rejected(d: &[Decoded]) -> Vec<u64> {
        d.iter()
            .filter_map(|d| match d {
                Decoded::Rejected { unit, .. } => Some(*unit),
                _ => None,
            })
            .collect()
    }

    fn frame(device: &str, value: f64, ts: u64) -> Vec<u8> {
        let msg = DeviceMessage::Reading(proto::Reading {
            device: heapless::String::try_from(device).unwrap(),
            metric: heapless::String::try_from("temperature").unwrap(),
            value,
            ts: Some(ts),
            seq: None,
            quality: None,
        });
        let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
        encode_frame(&msg, &mut buf).unwrap().to_vec()
    }

    #[test]
    fn text_lines_split_across_reads_and_garbage_between_them() {
        let mut d = text(SerialFraming::KeyValue, Some("probe-1"));
        let mut out = Vec::new();
        d.feed(b"temperature=21.5 humid", &mut out);
        assert!(out.is_empty());
        d.feed(b"ity=40 ts=5\n\x01\xff\xfegarbage\n", &mut out);
        let mut long = vec![b'9'; 600];
        long.push(b'\n');
        d.feed(&long, &mut out);
        d.feed(b"temperature=22 ts=6\r\n", &mut out);
        assert_eq!(
            readings(&out),
            vec![
                ("probe-1".into(), "temperature".into(), 21.5, 5),
                ("probe-1".into(), "humidity".into(), 40.0, 5),
                ("probe-1".into(), "temperature".into(), 22.0, 6),
            ]
        );
        assert_eq!(rejected(&out), vec![2, 3]);
    }

    #[test]
    fn reply_lines_are_outcomes_and_readings_named_state_stay_readings() {
        let mut out = Vec::new();
        text(SerialFraming::KeyValue, Some("valve-1")).feed(
            concat!(
                "{\"v\":1,\"id\":\"c-1\",\"device\":\"valve-1\",\"state\":\"succeeded\",\"detail\":\"ok\"}\n",
                "{\"v\":1,\"id\":\"c-2\",\"device\":\"valve-1\",\"state\":\"exploded\"}\n",
                "percent=40\n",
            )
            .as_bytes(),
            &mut out,
        );
        match &out[0] {
            Decoded::Outcome(o) => {
                assert_eq!((o.id.as_str(), o.detail.as_str()), ("c-1", "ok"));
                assert_eq!(o.state, edgestream_protocol::types::OutcomeState::Succeeded);
            }
            other => panic!("{other:?}"),
        }
        match &out[1] {
            Decoded::Rejected { unit, reason, .. } => {
                assert_eq!(*unit, 2);
                assert!(reason.starts_with("command reply:"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            readings(&out),
            vec![(
                "valve-1".into(),
                "percent".into(),
                40.0,
                readings(&out)[0].3
            )]
        );
        out.clear();
        // A JSON reading whose metrics happen to be called `id` and `state` is a reading.
        text(SerialFraming::Json, Some("p")).feed(b"{\"id\":3,\"state\":1,\"ts\":5}\n", &mut out);
        assert_eq!(
            readings(&out),
            vec![
                ("p".into(), "id".into(), 3.0, 5),
                ("p".into(), "state".into(), 1.0, 5)
            ]
        );
    }

    #[test]
    fn json_and_csv_lines_and_a_line_without_a_device() {
        let mut out = Vec::new();
        text(SerialFraming::Json, None).feed(
            b"{\"device\":\"d-1\",\"temperature\":1,\"ts\":2}\n{\"temperature\":1}\n",
            &mut out,
        );
        assert_eq!(
            readings(&out),
            vec![("d-1".into(), "temperature".into(), 1.0, 2)]
        );
        assert_eq!(rejected(&out), vec![2], "no device anywhere: rejected");
        out.clear();
        text(SerialFraming::Csv, Some("p")).feed(b"7,21.5,x\n7,21.5\n", &mut out);
        assert_eq!(
            readings(&out),
            vec![("p".into(), "temperature".into(), 21.5, 7)]
        );
        assert_eq!(rejected(&out), vec![2]);
    }

    #[test]
    fn binary_frames_resynchronise_after_bad_crc_and_noise() {
        let mut d =
            PortDecoder::new(&SerialConfig::new("/dev/null", SerialFraming::Binary)).unwrap();
        let mut bad = frame("b-1", 9.0, 1);
        bad[10] ^= 0x01;
        if bad[10] == 0 {
            bad[10] = 2;
        }
        let mut wire = frame("b-1", 1.0, 1);
        wire.extend_from_slice(&bad);
        wire.extend_from_slice(&[0x13, 0x37, 0xff, 0x00]);
        wire.extend(std::iter::repeat_n(0x55, 2000));
        wire.push(0);
        wire.extend_from_slice(&frame("b-1", 2.0, 2));
        let mut out = Vec::new();
        // Byte by byte: nothing depends on how reads split the stream.
        for b in &wire {
            d.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(
            readings(&out),
            vec![
                ("b-1".into(), "temperature".into(), 1.0, 1),
                ("b-1".into(), "temperature".into(), 2.0, 2),
            ]
        );
        assert_eq!(rejected(&out), vec![2, 3, 4]);
    }

    fn parse(extra: &str) -> Result<Config, crate::config::ConfigErrors> {
        let base =
            "[gateway]\nid = \"g\"\ndata_dir = \"/tmp/x\"\n[cloud]\nhost = \"h\"\ntls = false\n";
        Config::from_toml(&format!("{base}{extra}"), None)
    }

    #[test]
    fn config_section_with_defaults_and_every_problem_by_path() {
        let c = parse(
            r#"
[[serial]]
path = "/dev/serial/by-id/usb-probe"
framing = "key-value"
device = "probe-1"

[[serial]]
path = "/dev/ttyUSB1"
framing = "csv"
columns = ["ts", "temperature"]
delimiter = ";"
baud_rate = 9600
parity = "even"
"#,
        )
        .unwrap();
        assert_eq!(c.serial.len(), 2);
        assert_eq!(c.serial[0].baud_rate, 115_200);
        assert_eq!(c.serial[1].parity, SerialParity::Even);

        let e = parse(
            r#"
[[serial]]
path = "/dev/a"
framing = "binary"
device = "x"
baud_rate = 7

[[serial]]
path = "/dev/a"
framing = "csv"
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "serial[0].baud_rate",
                "serial[0].device",
                "serial[1].columns",
                "serial[1].path"
            ],
            "{e}"
        );
        let e = parse("[[serial]]\npath = \"/dev/a\"\nframing = \"csv\"\nspeed = 1\n").unwrap_err();
        assert_eq!(e.0[0].path, "serial[0].speed", "{e}");
        assert!(e.0[0].message.contains("unknown field"), "{e}");
        let e = parse("[[serial]]\npath = \"/dev/a\"\nframing = \"morse\"\n").unwrap_err();
        assert_eq!(e.0[0].path, "serial[0].framing", "{e}");
    }
}
