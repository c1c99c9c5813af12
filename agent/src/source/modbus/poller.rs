//! The task that polls one Modbus bus (one `[[modbus]]` table): one TCP connection or one
//! RTU serial port, one request at a time, each read of the [`plan`](super::plan) on its own
//! interval. On RTU every request waits for the line's inter-frame silence
//! ([`SilentLine`]), and an answer with a wrong CRC is told apart from silence.
//!
//! Guarantees and limits:
//! - **Stamped at the poll.** Every value of a read carries the time the request was sent.
//! - **Bounded hand-off, block.** Readings go to the rules stage on the shared source channel
//!   with `send().await` (full-policy **block**, like the serial source): a slow disk delays
//!   the next poll, and the schedule skips the polls it missed rather than bursting to catch
//!   up. A slave cannot resend, so a reading read but not yet in the outbox is lost if the
//!   agent crashes; a graceful stop loses none that was handed over.
//! - **Bad answers are data.** An exception, a timeout, a short answer, an answer that does
//!   not match the request (transaction, unit or function), bytes that do not decode, or an
//!   RTU answer with a wrong CRC are each counted by reason
//!   (`edgestream_modbus_errors_total{reason=...}`), logged at a bounded rate and sampled on
//!   the dead-letter topic with the bus, the unit and the read
//!   (`tcp 10.0.0.5:502 unit 3 holding 100+4`, `rtu /dev/ttyUSB0 unit 3 input 0+2`), each
//!   slave and reason with its own sampling budget (`deadletter.rs`: 10 samples per 10 s). After a timeout or undecodable bytes the
//!   TCP connection is reopened at once, so a late answer cannot be taken for the next one
//!   (on RTU [`SilentLine`] drops bytes still arriving before it sends the next request).
//! - **A silent slave does not hold up the others.** After `missing_after` polls in a row
//!   without an answer (timeouts, undecodable bytes, CRC errors; an exception is one) a slave
//!   is reported missing (warning, `edgestream_modbus_slaves_missing`) and only probed once
//!   per `reconnect_max_ms` with one of its reads and no retries, until it
//!   answers again. Its readings stop, which a rule sees with `missing(metric, duration)`.
//! - **Reconnect with backoff.** A lost connection, or a serial port that fails (unplugged:
//!   reads end or fail), is reopened (by its path) with jittered exponential backoff
//!   ([`Backoff`]); state changes are logged once each.
//! - **Writes.** Between two polls (at least every [`COMMAND_POLL`]) the task takes the
//!   device commands the router handed it ([`PortLink`]) and carries out each with one write
//!   request, mapped by `[[modbus.slaves.writes]]` to a holding register or a coil
//!   ([`write_value`]). The command's outcome is the write's: `succeeded` when the slave
//!   confirmed it, `failed` with the slave's exception, a timeout (the write may or may not
//!   have happened: it is never repeated) or why the value does not fit the register, which
//!   then never reaches the bus. The router has already checked the allow-list.
//! - Memory is fixed per bus: the plan, one state per slave, the answer of one read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgestream_protocol::types::{
    ArgValue, Command, CommandOutcome, DeviceId, MetricName, OutcomeState,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;

use super::config::{ModbusConfig, ModbusFunction, ModbusTransport};
use super::decode::{bit_reading, register_reading, write_value, WriteValue};
use super::plan::{plan_reads, ReadRequest};
use super::rtu::{damaged_frame, LineTiming, LineWatch, SilentLine};
use crate::backoff::Backoff;
use crate::commands::routes::{DeviceEvent, PortLink};
use crate::deadletter::RejectSampler;
use crate::source::config::SerialParity;
use crate::source::reading::{now_ms, Reading, SourceMsg};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::modbus_slaves::SlaveTable;

const SOURCE: &str = "modbus";
/// Longest a command handed to the bus waits for the task to look (between polls).
pub const COMMAND_POLL: Duration = Duration::from_millis(20);
/// How far off the reads of a missing slave are put, other than the one that probes it; they
/// are due again as soon as it answers.
const PARKED: Duration = Duration::from_secs(365 * 86_400);

/// Why a read did not give values.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The slave answered with an exception (its code).
    Exception(u8),
    /// No answer within the slave's `timeout_ms`.
    Timeout,
    /// Fewer values than asked for.
    Short { got: usize, want: u16 },
    /// An answer to another request (transaction, unit or function).
    Mismatch(String),
    /// Bytes that do not decode as a Modbus answer.
    Garbage(String),
    /// RTU: a whole answer whose CRC does not match.
    Crc,
    /// The connection failed.
    Lost(String),
}

impl Fault {
    /// The `reason` label of the fault's counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Fault::Exception(_) => "exception",
            Fault::Timeout => "timeout",
            Fault::Short { .. } => "short",
            Fault::Mismatch(_) => "mismatch",
            Fault::Garbage(_) => "garbage",
            Fault::Crc => "crc",
            Fault::Lost(_) => "connection",
        }
    }

    fn describe(&self, timeout: Duration) -> String {
        match self {
            Fault::Exception(code) => {
                format!(
                    "slave answered exception 0x{code:02x} ({})",
                    exception_name(*code)
                )
            }
            Fault::Timeout => format!("no answer within {} ms", timeout.as_millis()),
            Fault::Short { got, want } => format!("short answer: {got} of {want} values"),
            Fault::Mismatch(m) => format!("answer does not match the request: {m}"),
            Fault::Garbage(m) => format!("undecodable answer: {m}"),
            Fault::Crc => "answer with a wrong CRC".into(),
            Fault::Lost(m) => format!("connection lost: {m}"),
        }
    }

    fn count(&self, m: &Metrics) {
        Metrics::inc(match self {
            Fault::Exception(_) => &m.modbus_errors_exception,
            Fault::Timeout => &m.modbus_errors_timeout,
            Fault::Short { .. } => &m.modbus_errors_short,
            Fault::Mismatch(_) => &m.modbus_errors_mismatch,
            Fault::Garbage(_) => &m.modbus_errors_garbage,
            Fault::Crc => &m.modbus_errors_crc,
            Fault::Lost(_) => &m.modbus_errors_connection,
        });
    }

    /// Whether the slave gave no answer that can be trusted (silent, dead, unplugged behind a
    /// gateway, or on a line too noisy for its frames to survive); only these count toward
    /// reporting it missing. An exception, a short or a mismatched answer come from a slave
    /// that is there.
    fn is_silence(&self) -> bool {
        matches!(self, Fault::Timeout | Fault::Garbage(_) | Fault::Crc)
    }

    /// Whether the connection must be reopened before the next request. TCP: an answer may
    /// still be on its way, or the stream is out of step. RTU: only a failed port; a late
    /// answer is dropped by [`SilentLine`] before the next request, and tokio-modbus clears
    /// its buffer before each request.
    fn poisons_connection(&self, transport: ModbusTransport) -> bool {
        match transport {
            ModbusTransport::Tcp => {
                matches!(self, Fault::Timeout | Fault::Garbage(_) | Fault::Lost(_))
            }
            ModbusTransport::Rtu => matches!(self, Fault::Lost(_)),
        }
    }
}

fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0a => "gateway path unavailable",
        0x0b => "gateway target device failed to respond",
        _ => "unknown",
    }
}

/// The values of one successful read: registers or bits.
#[derive(Debug)]
enum Answer {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
    /// An answer to another function (`call` rejects those first; kept for completeness).
    Other(String),
}

/// What the poller keeps per slave.
#[derive(Debug)]
struct SlaveState {
    unit: u8,
    device: DeviceId,
    /// The metric of each register map entry.
    metrics: Vec<MetricName>,
    timeout: Duration,
    retries: u8,
    failures_in_row: u32,
    missing: bool,
}

/// Why a Modbus source cannot be built (the config's validation catches these first).
#[derive(Debug, thiserror::Error)]
#[error("modbus[{index}]: {message}")]
pub struct ModbusSourceError {
    index: usize,
    message: String,
}

/// One bus and its poll plan; [`ModbusSource::run`] polls it until stopped.
#[derive(Debug)]
pub struct ModbusSource {
    config: ModbusConfig,
    reads: Vec<ReadRequest>,
    slaves: Vec<SlaveState>,
    missing_probe: Duration,
    /// RTU: what the line heard and when it was last busy.
    line: Arc<Mutex<LineWatch>>,
    /// Commands for the bus's devices and the routing table (`None`: read only).
    link: Option<PortLink>,
    /// Per-slave figures for the health message, and this bus's first entry in it.
    table: Option<(Arc<SlaveTable>, usize)>,
}

/// How one connection ended.
enum Ended {
    Stopped,
    RulesStageGone,
    Lost,
}

impl ModbusSource {
    /// `index` is the table's place in the config, for error messages.
    pub fn new(index: usize, config: ModbusConfig) -> Result<Self, ModbusSourceError> {
        let err = |message: String| ModbusSourceError { index, message };
        let mut slaves = Vec::with_capacity(config.slaves.len());
        for s in &config.slaves {
            let device = DeviceId::try_from(s.device.as_str())
                .map_err(|_| err(format!("device {:?} is too long", s.device)))?;
            let metrics = s
                .registers
                .iter()
                .map(|r| {
                    MetricName::try_from(r.metric.as_str())
                        .map_err(|_| err(format!("metric {:?} is too long", r.metric)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            slaves.push(SlaveState {
                unit: s.unit,
                device,
                metrics,
                timeout: Duration::from_millis(config.slave_timeout_ms(s)),
                retries: config.slave_retries(s),
                failures_in_row: 0,
                missing: false,
            });
        }
        Ok(Self {
            reads: plan_reads(&config),
            missing_probe: Duration::from_millis(config.reconnect_max_ms),
            line: Arc::default(),
            link: None,
            table: None,
            slaves,
            config,
        })
    }

    /// Counts polls and failures per slave in `table`, whose entries from `first` on are this
    /// bus's slaves in order.
    pub fn with_slave_table(mut self, table: Arc<SlaveTable>, first: usize) -> Self {
        self.table = Some((table, first));
        self
    }

    fn table_entry(&self, slave: usize) -> Option<(&SlaveTable, usize)> {
        self.table.as_ref().map(|(t, first)| (&**t, first + slave))
    }

    /// Lets the bus carry device commands (writes) and report their outcomes.
    pub fn with_link(mut self, link: PortLink) -> Self {
        self.link = Some(link);
        self
    }

    /// Tells the routing table whether commands can be handed to the bus; on closing, gives
    /// back those caught in the hand-off.
    async fn set_open(&mut self, open: bool) {
        // `&mut`: a `PortLink` holds a std `Receiver`, which is not `Sync`, so the future may
        // hold only exclusive references to it across an await to stay `Send`.
        let Some(l) = self.link.as_mut() else {
            return;
        };
        l.routes.set_open(l.index, open);
        if !open {
            while let Ok(cmd) = l.commands.try_recv() {
                let back = DeviceEvent::Written {
                    id: cmd.id.to_string(),
                    port: l.index,
                    error: Some("modbus bus closed before the write".into()),
                };
                if l.events.send(back).await.is_err() {
                    // The router has stopped; the command stays in its saved table.
                    break;
                }
            }
        }
    }

    /// Carries out the commands waiting for the bus (module doc). `Err` if the connection
    /// must be reopened.
    async fn write_commands(&mut self, ctx: &mut Context, metrics: &Metrics) -> Result<(), Fault> {
        let Self {
            link,
            config,
            slaves,
            ..
        } = self;
        let Some(l) = link.as_mut() else {
            return Ok(());
        };
        while let Ok(cmd) = l.commands.try_recv() {
            let written = DeviceEvent::Written {
                id: cmd.id.to_string(),
                port: l.index,
                error: None,
            };
            if l.events.send(written).await.is_err() {
                tracing::debug!(id = %cmd.id, "write not reported: router stopped");
            }
            let result = write(config, slaves, ctx, &cmd).await;
            let (state, detail, fault) = match result {
                Ok(detail) => (OutcomeState::Succeeded, detail, None),
                Err(WriteError::Refused(why)) => (OutcomeState::Failed, why, None),
                Err(WriteError::Fault(f, timeout)) => {
                    f.count(metrics);
                    let mut detail = f.describe(timeout);
                    if f == Fault::Timeout {
                        detail.push_str("; the write may or may not have happened");
                    }
                    (OutcomeState::Failed, detail, Some(f))
                }
            };
            let mut text = heapless::String::new();
            for c in detail.chars() {
                if text.push(c).is_err() {
                    break;
                }
            }
            let outcome = CommandOutcome {
                id: cmd.id.clone(),
                device: cmd.device.clone(),
                state,
                detail: text,
                ts: Some(now_ms()),
            };
            let reply = DeviceEvent::Reply {
                outcome: Box::new(outcome),
                ack: None,
            };
            if l.events.send(reply).await.is_err() {
                tracing::debug!(id = %cmd.id, "outcome not reported: router stopped");
            }
            if let Some(f) = fault.filter(|f| f.poisons_connection(config.transport)) {
                return Err(f);
            }
        }
        Ok(())
    }

    /// Polls until `stop` is cancelled; drops `out` when it returns.
    pub async fn run(
        mut self,
        out: mpsc::Sender<SourceMsg>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_min_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let mut samplers = Samplers::default();
        let mut outage_logged = false;
        // When each read is due next; kept across reconnects so the schedule does not reset.
        let start = Instant::now();
        let mut due: Vec<Instant> = vec![start; self.reads.len()];
        tracing::info!(
            reads = self.reads.len(),
            slaves = self.slaves.len(),
            "modbus poll plan"
        );
        while !stop.is_cancelled() {
            let connected = tokio::select! {
                _ = stop.cancelled() => break,
                c = connect(&self.config, &self.line) => c,
            };
            let mut ctx = match connected {
                Ok(ctx) => ctx,
                Err(e) => {
                    if outage_logged {
                        tracing::debug!(error = %e, "modbus bus still unreachable");
                    } else {
                        tracing::warn!(error = %e, "cannot connect to modbus bus; retrying with backoff");
                        outage_logged = true;
                    }
                    Metrics::inc(&metrics.modbus_connect_failures);
                    if sleep_unless_stopped(&stop, backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            };
            if outage_logged {
                tracing::info!("modbus bus connected");
            } else {
                tracing::debug!("modbus bus connected");
            }
            outage_logged = false;
            Metrics::inc(&metrics.modbus_connects);
            self.set_open(true).await;
            let ended = self
                .poll_until_lost(
                    &mut ctx,
                    &mut due,
                    &out,
                    &metrics,
                    &mut samplers,
                    &stop,
                    &mut backoff,
                )
                .await;
            self.set_open(false).await;
            match ended {
                Ended::Stopped => break,
                Ended::RulesStageGone => {
                    tracing::error!("rules stage has stopped; no longer polling");
                    break;
                }
                Ended::Lost => {}
            }
        }
        tracing::info!("modbus source stopped");
    }

    #[allow(clippy::too_many_arguments)]
    async fn poll_until_lost(
        &mut self,
        ctx: &mut Context,
        due: &mut [Instant],
        out: &mpsc::Sender<SourceMsg>,
        metrics: &Metrics,
        samplers: &mut Samplers,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Ended {
        let endpoint = self.config.endpoint();
        loop {
            let Some((i, at)) = due.iter().copied().enumerate().min_by_key(|(_, t)| *t) else {
                // No reads (a validated config always has some): wait for the stop.
                stop.cancelled().await;
                return Ended::Stopped;
            };
            // Commands first: a write waits for no poll.
            if let Err(fault) = self.write_commands(ctx, metrics).await {
                Metrics::inc(&metrics.modbus_disconnects);
                tracing::warn!(reason = %fault.describe(Duration::ZERO), "modbus connection reopened after a write");
                return Ended::Lost;
            }
            // With commands to watch for, wake at least every COMMAND_POLL.
            let wake = match &self.link {
                Some(_) => at.min(Instant::now() + COMMAND_POLL),
                None => at,
            };
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stopped,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() < at {
                continue;
            }
            let read = &self.reads[i];
            let slave = &self.slaves[read.slave];
            let ts_ms = now_ms();
            let attempts = if slave.missing { 1 } else { 1 + slave.retries };
            let mut result = Err(Fault::Timeout);
            for _ in 0..attempts {
                // Cancel-safe: on a stop the request in flight is abandoned with its
                // connection; nothing it would have read was acknowledged anywhere.
                result = tokio::select! {
                    _ = stop.cancelled() => return Ended::Stopped,
                    r = request(ctx, slave.unit, read, slave.timeout) => r,
                };
                match &result {
                    Ok(_) | Err(Fault::Exception(_)) => break,
                    Err(f) if f.poisons_connection(self.config.transport) => {
                        // Reopen before a retry, so a late answer cannot be taken for it.
                        match connect(&self.config, &self.line).await {
                            Ok(c) => *ctx = c,
                            Err(e) => {
                                result = Err(Fault::Lost(e));
                                break;
                            }
                        }
                    }
                    Err(_) => {}
                }
            }
            if let Err(Fault::Timeout | Fault::Garbage(_)) = &result {
                if self.config.transport == ModbusTransport::Rtu
                    && damaged_frame(&self.line.lock().unwrap_or_else(|e| e.into_inner()).answer)
                {
                    result = Err(Fault::Crc);
                }
            }
            // Next poll: one interval on, skipping polls already missed.
            let now = Instant::now();
            let interval = read.interval;
            let mut next = at + interval;
            if next <= now {
                let behind = (now - next).as_nanos() / interval.as_nanos().max(1);
                next += interval * (behind as u32 + 1);
            }
            let slave_index = read.slave;
            match result {
                Ok(answer) => {
                    backoff.reset();
                    due[i] = next;
                    Metrics::inc(&metrics.modbus_polls);
                    if let Some((t, e)) = self.table_entry(slave_index) {
                        t.polled(e);
                        t.set_missing(e, false);
                    }
                    let slave = &mut self.slaves[slave_index];
                    slave.failures_in_row = 0;
                    if slave.missing {
                        slave.missing = false;
                        metrics
                            .modbus_slaves_missing
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(unit = slave.unit, device = %slave.device, "modbus slave answers again");
                        // Back on its own schedule: its other reads are due now.
                        for (j, r) in self.reads.iter().enumerate() {
                            if r.slave == slave_index && j != i {
                                due[j] = now;
                            }
                        }
                    }
                    let read = &self.reads[i];
                    let slave = &self.slaves[slave_index];
                    let registers = &self.config.slaves[slave_index].registers;
                    for &v in &read.values {
                        let r = &registers[v];
                        let offset = (r.address - u32::from(read.start)) as usize;
                        let value = match &answer {
                            Answer::Registers(regs) => {
                                let width = usize::from(r.value_type().width());
                                register_reading(r, &regs[offset..offset + width])
                            }
                            Answer::Bits(bits) => bit_reading(r, bits[offset]),
                            Answer::Other(_) => continue,
                        };
                        let reading = Reading {
                            device: slave.device.clone(),
                            metric: slave.metrics[v].clone(),
                            value,
                            ts_ms,
                        };
                        Metrics::inc(&metrics.readings_in_modbus);
                        if out.send(SourceMsg::Reading(reading, None)).await.is_err() {
                            return Ended::RulesStageGone;
                        }
                    }
                }
                Err(fault) => {
                    fault.count(metrics);
                    if let Some((t, e)) = self.table_entry(slave_index) {
                        t.failed(e, fault.reason());
                    }
                    let slave = &mut self.slaves[slave_index];
                    if fault.is_silence() {
                        slave.failures_in_row = slave.failures_in_row.saturating_add(1);
                    }
                    let location = format!(
                        "{endpoint} unit {} {} {}+{}",
                        slave.unit,
                        read.function.name(),
                        read.start,
                        read.count
                    );
                    let reason = format!("{}: {}", fault.reason(), fault.describe(slave.timeout));
                    let became_missing =
                        !slave.missing && slave.failures_in_row >= self.config.missing_after;
                    if became_missing {
                        if let Some((t, e)) = self.table.as_ref().map(|(t, f)| (t, f + slave_index))
                        {
                            t.set_missing(e, true);
                        }
                        slave.missing = true;
                        metrics
                            .modbus_slaves_missing
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                            unit = slave.unit,
                            device = %slave.device,
                            failures = slave.failures_in_row,
                            last = %reason,
                            "modbus slave not answering; probing it every {} ms",
                            self.missing_probe.as_millis()
                        );
                    }
                    due[i] = if self.slaves[slave_index].missing {
                        // Probe with this read only; the slave's other reads wait until it
                        // answers again.
                        for (j, r) in self.reads.iter().enumerate() {
                            if r.slave == slave_index && j != i {
                                due[j] = due[j].max(now + PARKED);
                            }
                        }
                        now + self.missing_probe
                    } else {
                        next
                    };
                    let payload = format!("{fault:?}");
                    let sampler = samplers.of(slave_index, fault.reason());
                    let msg = match sampler.reject(&location, &reason, payload.as_bytes()) {
                        Some(sample) => Some(SourceMsg::Rejected(Some(sample), None)),
                        None => {
                            Metrics::inc(&metrics.deadletters_suppressed);
                            None
                        }
                    };
                    if let Some(msg) = msg {
                        if out.send(msg).await.is_err() {
                            return Ended::RulesStageGone;
                        }
                    }
                    if let Fault::Lost(why) = &fault {
                        Metrics::inc(&metrics.modbus_disconnects);
                        tracing::warn!(reason = %why, "modbus connection lost; reconnecting with backoff");
                        if sleep_unless_stopped(stop, backoff.next_delay()).await {
                            return Ended::Stopped;
                        }
                        return Ended::Lost;
                    }
                }
            }
        }
    }
}

/// Dead-letter sampling per slave and reason, so that a chatty fault does not hide another
/// slave's (each has the budget of [`RejectSampler`]). At most slaves x 6 entries.
#[derive(Debug, Default)]
struct Samplers(HashMap<(usize, &'static str), RejectSampler>);

impl Samplers {
    fn of(&mut self, slave: usize, reason: &'static str) -> &mut RejectSampler {
        self.0
            .entry((slave, reason))
            .or_insert_with(|| RejectSampler::new(SOURCE))
    }
}

/// Why a command was not carried out.
#[derive(Debug)]
enum WriteError {
    /// Before the bus: no mapping, no argument, a value that does not fit.
    Refused(String),
    /// On the bus, with the slave's timeout.
    Fault(Fault, Duration),
}

/// Carries out `cmd` with one write request (module doc).
async fn write(
    config: &ModbusConfig,
    slaves: &[SlaveState],
    ctx: &mut Context,
    cmd: &Command,
) -> Result<String, WriteError> {
    let refused = |why: String| Err(WriteError::Refused(why));
    let Some(s) = config
        .slaves
        .iter()
        .position(|s| s.device == cmd.device.as_str())
    else {
        return refused(format!("{} is not a slave of this bus", cmd.device));
    };
    let slave = &config.slaves[s];
    let Some(w) = slave.writes.iter().find(|w| w.command == cmd.name.as_str()) else {
        return refused(format!(
            "`{}` writes no register of {} (no [[modbus.slaves.writes]] entry)",
            cmd.name, cmd.device
        ));
    };
    let value = match cmd.args.get(&w.arg) {
        Some(ArgValue::Int(i)) => *i as f64,
        Some(ArgValue::Float(f)) => *f,
        Some(ArgValue::Bool(b)) => f64::from(*b),
        Some(ArgValue::Str(_)) => return refused(format!("argument `{}` is not a number", w.arg)),
        None => return refused(format!("argument `{}` is missing", w.arg)),
    };
    let Some(r) = slave.registers.iter().find(|r| r.metric == w.metric) else {
        return refused(format!("no register `{}`", w.metric));
    };
    let on_bus = write_value(r, value).map_err(WriteError::Refused)?;
    let address = r.address as u16;
    let request = match &on_bus {
        WriteValue::Coil(on) => Request::WriteSingleCoil(address, *on),
        WriteValue::Registers(regs) if regs.len() == 1 => {
            Request::WriteSingleRegister(address, regs[0])
        }
        WriteValue::Registers(regs) => {
            Request::WriteMultipleRegisters(address, std::borrow::Cow::Borrowed(regs.as_slice()))
        }
    };
    let state = &slaves[s];
    ctx.set_slave(Slave(state.unit));
    let fault = |f| Err(WriteError::Fault(f, state.timeout));
    match tokio::time::timeout(state.timeout, ctx.call(request)).await {
        Err(_) => fault(Fault::Timeout),
        Ok(Err(e)) => fault(classify(e)),
        Ok(Ok(Err(code))) => fault(Fault::Exception(exception_code(code))),
        Ok(Ok(Ok(_))) => Ok(match on_bus {
            WriteValue::Coil(on) => format!("coil {address} set {}", if on { "on" } else { "off" }),
            WriteValue::Registers(regs) => {
                format!(
                    "{} = {value} written to holding {address}+{}",
                    w.metric,
                    regs.len()
                )
            }
        }),
    }
}

/// Opens the bus: a TCP connection, or the serial port behind a [`SilentLine`].
async fn connect(config: &ModbusConfig, line: &Arc<Mutex<LineWatch>>) -> Result<Context, String> {
    match config.transport {
        ModbusTransport::Tcp => {
            let endpoint = config.tcp_address();
            let timeout = Duration::from_millis(config.timeout_ms.max(1000));
            let attempt = async {
                let addr: SocketAddr = tokio::net::lookup_host(&endpoint)
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{endpoint}: no address"))?;
                tokio_modbus::client::tcp::connect(addr)
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))
            };
            tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| Err(format!("{endpoint}: no connection within {timeout:?}")))
        }
        ModbusTransport::Rtu => {
            use tokio_serial::SerialPortBuilderExt;
            let path = config.path.clone().unwrap_or_default();
            let parity = config.rtu_parity();
            let stream = tokio_serial::new(path.to_string_lossy(), config.rtu_baud_rate())
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(match parity {
                    SerialParity::None => tokio_serial::Parity::None,
                    SerialParity::Odd => tokio_serial::Parity::Odd,
                    SerialParity::Even => tokio_serial::Parity::Even,
                })
                .stop_bits(match config.rtu_stop_bits() {
                    2 => tokio_serial::StopBits::Two,
                    _ => tokio_serial::StopBits::One,
                })
                .open_native_async()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let timing = LineTiming::new(
                config.rtu_baud_rate(),
                8,
                parity != SerialParity::None,
                config.rtu_stop_bits(),
            );
            let line = SilentLine::new(stream, timing, line.clone());
            Ok(tokio_modbus::client::rtu::attach(line))
        }
    }
}

/// One read of `req` from `unit`, within `timeout`.
async fn request(
    ctx: &mut Context,
    unit: u8,
    req: &ReadRequest,
    timeout: Duration,
) -> Result<Answer, Fault> {
    ctx.set_slave(Slave(unit));
    let (start, count) = (req.start, req.count);
    // Through `Client::call`, not the `Reader` methods: those `debug_assert` that the slave
    // sent as many values as asked for, so a short answer would panic a debug build; here it
    // is counted as `short`.
    let request = match req.function {
        ModbusFunction::Holding => Request::ReadHoldingRegisters(start, count),
        ModbusFunction::Input => Request::ReadInputRegisters(start, count),
        ModbusFunction::Coil => Request::ReadCoils(start, count),
        ModbusFunction::DiscreteInput => Request::ReadDiscreteInputs(start, count),
    };
    let call = async {
        ctx.call(request).await.map(|r| {
            r.map(|response| match response {
                Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => {
                    Answer::Registers(w)
                }
                Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => Answer::Bits(b),
                other => Answer::Other(format!("{other:?}")),
            })
        })
    };
    let answer = match tokio::time::timeout(timeout, call).await {
        Err(_) => return Err(Fault::Timeout),
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(Err(code))) => return Err(Fault::Exception(exception_code(code))),
        Ok(Ok(Ok(answer))) => answer,
    };
    match answer {
        Answer::Registers(r) if r.len() != usize::from(count) => Err(Fault::Short {
            got: r.len(),
            want: count,
        }),
        // Bits come packed in whole bytes: up to 7 more than asked.
        Answer::Bits(b) if b.len() < usize::from(count) => Err(Fault::Short {
            got: b.len(),
            want: count,
        }),
        Answer::Bits(mut b) => {
            b.truncate(usize::from(count));
            Ok(Answer::Bits(b))
        }
        Answer::Other(what) => Err(Fault::Mismatch(what)),
        a => Ok(a),
    }
}

fn classify(e: tokio_modbus::Error) -> Fault {
    match e {
        tokio_modbus::Error::Protocol(p) => Fault::Mismatch(p.to_string()),
        tokio_modbus::Error::Transport(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            Fault::Garbage(io.to_string())
        }
        tokio_modbus::Error::Transport(io) => Fault::Lost(io.to_string()),
    }
}

fn exception_code(code: ExceptionCode) -> u8 {
    u8::from(code)
}

/// Sleeps `delay`; returns `true` at once if `stop` is cancelled.
async fn sleep_unless_stopped(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
