//! Device commands: from the cloud and from local rules, checked, persisted, routed to the
//! device's transport, and tracked to an outcome that goes upstream through the outbox.
//!
//! ```text
//!  cloud  {prefix}/{gw}/commands --(InboundMsg, 16, block)--+
//!  rules stage (RuleCommand, 256, try_send; full: rejected) -+--> CommandRouter --> serial port thread
//!  serial threads, local source (DeviceEvent, 256, block) ---+        |              (PortLink, 8)
//!                                                                     |          --> local broker
//!                                                                     |              devices/{d}/commands
//!                                                      outbox: {prefix}/{gw}/commands/outcomes
//! ```
//!
//! Lifecycle of one command (every step reported on `commands/outcomes`):
//! 1. **Checked**: schema and names (protocol), not a reused id, not expired, allowed by
//!    `[[commands.allow]]` (name, device, every argument's type and range), room in the
//!    pending table. A refusal is a `rejected` outcome whose `detail` says why, except for a
//!    reused id: that id already has its outcomes, so the copy is counted
//!    (`edgestream_commands_duplicate_total`) and refused on the dead-letter topic only.
//! 2. **Accepted**: written to the command table (`data_dir/commands/state.json`, replaced
//!    atomically) *before* the `accepted` outcome is queued and before the cloud's message is
//!    acknowledged. A crash before the acknowledgement makes the broker redeliver it (flagged
//!    `dup`, same content): the router recognises it and reports the current state again.
//! 3. **Sent**: routed ([`routes`]) to the serial port the device is on, or to the local broker.
//!    The table records the hand-off *before* it happens, so a restart never sends a command
//!    twice; a hand-off that fails (port closed, queue full) puts it back in the queue. A
//!    command waits in the queue while its device is unreachable, until it expires
//!    (`expires_at`, held to at most `commands.max_lifetime_ms` after acceptance or restart)
//!    or a `cancel` command ends it ([`CommandRouter::cancel`]).
//! 4. **Finished**: the device's reply (`succeeded`, `failed`, `rejected`) is matched by id and
//!    device; with no final reply by `min(expires_at, sent + reply_timeout_ms)` the gateway
//!    reports `timed_out`. A device's intermediate `accepted` is noted, not forwarded.
//!
//! Restart: pending commands are reloaded; queued ones are sent, sent ones wait for their
//! reply (the local broker keeps replies for our persistent session) or their deadline.
//! Outcomes not yet in the outbox when the agent stopped are reported again (a duplicate
//! outcome is possible, a lost one is not). The one at-most-once window: a crash after the
//! table records a hand-off and before the bytes leave; that command ends `timed_out`.
//!
//! Replies that match nothing (unknown id, wrong device, or arriving after the command
//! finished) are counted and sampled to the dead-letter topic with the reason.

use std::sync::Arc;
use std::time::Duration;

use edgestream_protocol::json::{decode_command, encode_command, encode_outcome};
use edgestream_protocol::limits::MAX_DETAIL_LEN;
use edgestream_protocol::types::{ArgValue, Command, CommandOutcome, OutcomeState};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{self, CommandsConfig};
use super::routes::{DeviceEvent, DeviceRoutes, HandOff, Route};
use super::store::{CommandStore, Finished, Origin, Pending, Stage, Table};
use crate::backoff::Backoff;
use crate::deadletter::RejectSampler;
use crate::outbox::record::{ControlRecord, Record};
use crate::outbox::store::Outbox;
use crate::source::reading::{now_ms, Ack};
use crate::telemetry::metrics::Metrics;
use crate::uplink::inbound::{InboundAck, InboundMsg};
use crate::uplink::wire::truncated;

/// Cloud commands waiting for the router (full-policy: block the uplink; commands are rare).
pub const CLOUD_CAPACITY: usize = 16;
/// Rule-issued commands waiting for the router. Full-policy: the rules stage never waits; it
/// reports the command `rejected` ("command queue full") in its own group commit.
pub const RULE_CAPACITY: usize = 256;
/// Device replies and serial write results waiting for the router (full-policy: block the
/// source; replies are as rare as commands).
pub const DEVICE_CAPACITY: usize = 256;
/// How often deadlines are checked and queued commands offered to their transport.
pub const TICK: Duration = Duration::from_millis(250);
/// Events handled per turn before the table is saved and outcomes are flushed.
const MAX_EVENTS_PER_TURN: usize = 64;
/// Suffix of the cloud topic outcomes go to.
pub const OUTCOMES_SUFFIX: &str = "commands/outcomes";
const SOURCE: &str = "commands";

/// A command a rule issued, with the rule's name.
#[derive(Debug)]
pub struct RuleCommand {
    pub command: Command,
    pub rule: String,
}

/// The router's inputs.
#[derive(Debug)]
pub struct RouterInputs {
    pub cloud: mpsc::Receiver<InboundMsg>,
    pub rules: mpsc::Receiver<RuleCommand>,
    pub devices: mpsc::Receiver<DeviceEvent>,
}

/// The outbox record of one outcome, or `None` if id or device cannot be carried (the caller
/// dead-letters instead).
pub fn outcome_record(
    id: &str,
    device: &str,
    state: OutcomeState,
    detail: &str,
    ts: u64,
) -> Option<Record> {
    let outcome = CommandOutcome {
        id: heapless::String::try_from(id).ok()?,
        device: heapless::String::try_from(device).ok()?,
        state,
        detail: truncated(detail),
        ts: Some(ts),
    };
    let mut payload = Vec::with_capacity(128);
    encode_outcome(&outcome, &mut payload).ok()?;
    Some(Record::Control(ControlRecord {
        topic_suffix: OUTCOMES_SUFFIX.into(),
        payload,
    }))
}

fn fingerprint(cmd: &Command) -> u32 {
    let mut bytes = Vec::with_capacity(128);
    match encode_command(cmd, &mut bytes) {
        Ok(()) => crc32fast::hash(&bytes),
        Err(_) => 0,
    }
}

/// Turns the commands a rule emitted into [`RuleCommand`]s for the router, with ids unique
/// across restarts (`r-{start ms}-{n}`) and a lifetime of `rule_command_ttl_ms`.
#[derive(Debug)]
pub struct RuleCommandIssuer {
    tx: mpsc::Sender<RuleCommand>,
    prefix: String,
    next: u64,
    ttl_ms: u64,
}

impl RuleCommandIssuer {
    pub fn new(tx: mpsc::Sender<RuleCommand>, config: &CommandsConfig) -> Self {
        Self {
            tx,
            prefix: format!("r-{}", now_ms()),
            next: 0,
            ttl_ms: config.rule_command_ttl_ms,
        }
    }

    /// Hands one rule command to the router without waiting. If that is impossible the
    /// command is reported `rejected` through `records` (the rules stage's group commit), so
    /// that nothing a rule decided disappears unseen.
    pub fn issue(
        &mut self,
        action: &edgestream_rules::CommandAction,
        records: &mut Vec<Record>,
        metrics: &Metrics,
    ) {
        self.next += 1;
        let id = format!("{}-{}", self.prefix, self.next);
        let now = now_ms();
        let command = match rule_command(action, &id, now, now + self.ttl_ms) {
            Ok(c) => c,
            Err(why) => {
                Metrics::inc(&metrics.commands_rejected);
                tracing::warn!(rule = %action.rule, device = %action.device, %why, "rule command cannot be built");
                records.extend(outcome_record(
                    &id,
                    &action.device,
                    OutcomeState::Rejected,
                    &why,
                    now,
                ));
                return;
            }
        };
        let rc = RuleCommand {
            command,
            rule: action.rule.to_string(),
        };
        if let Err(e) = self.tx.try_send(rc) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "command queue full",
                mpsc::error::TrySendError::Closed(_) => "command router stopped",
            };
            Metrics::inc(&metrics.commands_rejected);
            tracing::warn!(rule = %action.rule, device = %action.device, why, "rule command not queued");
            records.extend(outcome_record(
                &id,
                &action.device,
                OutcomeState::Rejected,
                why,
                now,
            ));
        }
    }
}

/// The protocol command for a rule's action.
pub fn rule_command(
    action: &edgestream_rules::CommandAction,
    id: &str,
    issued_at: u64,
    expires_at: u64,
) -> Result<Command, String> {
    let mut args = edgestream_protocol::types::CommandArgs::default();
    for (key, value) in action.args.iter() {
        let v = match value {
            edgestream_rules::ArgValue::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                ArgValue::Int(*n as i64)
            }
            edgestream_rules::ArgValue::Number(n) => ArgValue::Float(*n),
            edgestream_rules::ArgValue::Bool(b) => ArgValue::Bool(*b),
            edgestream_rules::ArgValue::Text(t) => ArgValue::Str(
                heapless::String::try_from(&**t)
                    .map_err(|_| format!("argument `{key}` is too long"))?,
            ),
        };
        args.insert(key, v)
            .map_err(|_| format!("argument `{key}` cannot be carried"))?;
    }
    let cmd = Command {
        id: heapless::String::try_from(id).map_err(|_| "command id too long".to_string())?,
        device: heapless::String::try_from(action.device.as_str())
            .map_err(|_| "device name too long".to_string())?,
        name: heapless::String::try_from(&*action.name)
            .map_err(|_| "command name too long".to_string())?,
        args,
        issued_at,
        expires_at,
    };
    cmd.validate().map_err(|e| e.to_string())?;
    Ok(cmd)
}

/// A hand-off decided on this turn: recorded first, performed after the table is saved.
struct Send {
    id: String,
    route: Route,
}

/// Which outcomes of this turn went into the outbox (to mark them reported).
#[derive(Debug)]
enum Reported {
    Accepted(String),
    Finished(String),
}

/// Checks, persists, routes and tracks commands (see the module doc).
#[derive(Debug)]
pub struct CommandRouter {
    config: CommandsConfig,
    store: CommandStore,
    table: Table,
    routes: Arc<DeviceRoutes>,
    local: Option<AsyncClient>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    sampler: RejectSampler,
    dirty: bool,
    records: Vec<Record>,
    reported: Vec<Reported>,
    cloud_acks: Vec<InboundAck>,
    local_acks: Vec<Ack>,
    /// Cancelled when the agent starts to stop: a turn whose table or outcomes cannot be
    /// stored (a full disk) is then given up unacknowledged instead of retried.
    stopping: CancellationToken,
}

impl CommandRouter {
    /// Loads the command table (an unreadable one is moved aside and reported).
    pub fn new(
        config: CommandsConfig,
        store: CommandStore,
        routes: Arc<DeviceRoutes>,
        local: Option<AsyncClient>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
    ) -> Self {
        let table = match store.load() {
            Ok(t) => t,
            Err(e) => {
                let moved = store.move_aside();
                tracing::error!(error = %e, moved_to = ?moved.ok(), "command table unreadable; moved aside, starting with no pending commands");
                Table::default()
            }
        };
        Self {
            config,
            store,
            table,
            routes,
            local,
            outbox,
            metrics,
            sampler: RejectSampler::new(SOURCE),
            dirty: false,
            records: Vec::new(),
            reported: Vec::new(),
            cloud_acks: Vec::new(),
            local_acks: Vec::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// The token cancelled when the agent starts to stop.
    pub fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// Drops this turn's acknowledgements and outcomes: its inputs are redelivered after the
    /// restart and handled again (at-least-once), since nothing of the turn is durable.
    fn give_up_turn(&mut self) {
        tracing::error!(
            inputs = self.cloud_acks.len() + self.local_acks.len(),
            "stopping while the command table or outcomes cannot be stored: this turn's inputs are not acknowledged (the brokers redeliver them)"
        );
        self.cloud_acks.clear();
        self.local_acks.clear();
        self.records.clear();
        self.reported.clear();
    }

    /// Runs until every input has closed, then saves the table.
    pub async fn run(mut self, mut inputs: RouterInputs) {
        self.recover();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut cloud_open, mut rules_open, mut devices_open) = (true, true, true);
        while cloud_open || rules_open || devices_open {
            // Cancellation safety: `recv` on a tokio mpsc loses nothing when another branch
            // wins; the tick only triggers deadline checks.
            tokio::select! {
                m = inputs.cloud.recv(), if cloud_open => match m {
                    Some(m) => self.on_cloud(m),
                    None => cloud_open = false,
                },
                r = inputs.rules.recv(), if rules_open => match r {
                    Some(r) => self.on_rule(r),
                    None => rules_open = false,
                },
                e = inputs.devices.recv(), if devices_open => match e {
                    Some(e) => self.on_device(e),
                    None => devices_open = false,
                },
                _ = tick.tick() => self.on_tick(),
            }
            for _ in 0..MAX_EVENTS_PER_TURN {
                if let Ok(e) = inputs.devices.try_recv() {
                    self.on_device(e);
                } else if let Ok(m) = inputs.cloud.try_recv() {
                    self.on_cloud(m);
                } else if let Ok(r) = inputs.rules.try_recv() {
                    self.on_rule(r);
                } else {
                    break;
                }
            }
            self.end_turn().await;
        }
        self.end_turn().await;
        tracing::info!(pending = self.table.pending.len(), "command router stopped");
    }

    /// After a restart: report again what may not have reached the outbox.
    fn recover(&mut self) {
        let now = now_ms();
        // The lifetime ceiling holds across restarts, whatever the table was written with.
        let ceiling = now.saturating_add(self.config.max_lifetime_ms);
        for p in &mut self.table.pending {
            if p.command.expires_at > ceiling {
                p.command.expires_at = ceiling;
                self.dirty = true;
            }
        }
        let unreported: Vec<(String, String, String)> = self
            .table
            .pending
            .iter()
            .filter(|p| !p.reported)
            .map(|p| {
                (
                    p.command.id.to_string(),
                    p.command.device.to_string(),
                    accepted_detail(&p.origin),
                )
            })
            .collect();
        for (id, device, detail) in unreported {
            self.report(&id, &device, OutcomeState::Accepted, &detail, now);
            self.reported.push(Reported::Accepted(id));
        }
        let finished: Vec<Finished> = self
            .table
            .recent
            .iter()
            .filter(|f| !f.reported)
            .cloned()
            .collect();
        for f in finished {
            self.report(&f.id, &f.device, f.state, &f.detail, f.at_ms);
            self.reported.push(Reported::Finished(f.id));
        }
        Metrics::set(
            &self.metrics.commands_pending,
            self.table.pending.len() as u64,
        );
        if !self.table.pending.is_empty() {
            tracing::info!(
                pending = self.table.pending.len(),
                "resuming commands accepted before the restart"
            );
        }
    }

    fn report(&mut self, id: &str, device: &str, state: OutcomeState, detail: &str, ts: u64) {
        match outcome_record(id, device, state, detail, ts) {
            Some(r) => self.records.push(r),
            None => tracing::error!(%id, %device, "outcome cannot be encoded"),
        }
    }

    fn reject(&mut self, id: &str, device: &str, why: &str) {
        Metrics::inc(&self.metrics.commands_rejected);
        tracing::info!(%id, %device, reason = %why, "command rejected");
        self.report(id, device, OutcomeState::Rejected, why, now_ms());
    }

    /// A command whose id is taken by a pending or finished one: counted, logged and sampled
    /// on the dead-letter topic, with no outcome (the id has its own).
    fn refuse_duplicate(&mut self, id: &str, cmd: &Command, why: &str) {
        Metrics::inc(&self.metrics.commands_duplicate);
        tracing::info!(%id, device = %cmd.device, reason = %why, "command refused");
        let mut payload = Vec::new();
        if encode_command(cmd, &mut payload).is_err() {
            payload.clear();
        }
        self.dead_letter(&format!("command {id}"), why, &payload);
    }

    fn on_cloud(&mut self, msg: InboundMsg) {
        Metrics::inc(&self.metrics.commands_received_cloud);
        let InboundMsg { publish, ack } = msg;
        self.cloud_acks.push(ack);
        match decode_command(&publish.payload) {
            Ok(cmd) => self.admit(cmd, Origin::Cloud, publish.dup),
            Err(e) => {
                let why = format!("malformed command: {e}");
                // Answer on the outcome topic if the id and device can be read; otherwise the
                // dead-letter topic is the only place the sender can learn why.
                let v: Option<serde_json::Value> = serde_json::from_slice(&publish.payload).ok();
                let name = |k: &'static str| {
                    v.as_ref()
                        .and_then(|v| v[k].as_str())
                        .filter(|s| edgestream_protocol::types::check_name(k, s).is_ok())
                        .map(str::to_string)
                };
                match (name("id"), name("device")) {
                    (Some(id), Some(device))
                        if outcome_record(&id, &device, OutcomeState::Rejected, "", 0)
                            .is_some() =>
                    {
                        self.reject(&id, &device, &why)
                    }
                    _ => {
                        Metrics::inc(&self.metrics.commands_rejected);
                        self.dead_letter(&publish.topic, &why, &publish.payload);
                    }
                }
            }
        }
    }

    fn dead_letter(&mut self, location: &str, why: &str, payload: &[u8]) {
        match self.sampler.reject(location, why, payload) {
            Some(sample) => {
                Metrics::inc(&self.metrics.deadletters_sent);
                self.records.push(Record::DeadLetter(sample));
            }
            None => Metrics::inc(&self.metrics.deadletters_suppressed),
        }
    }

    fn on_rule(&mut self, rc: RuleCommand) {
        Metrics::inc(&self.metrics.commands_from_rules);
        self.admit(rc.command, Origin::Rule(rc.rule), false);
    }

    /// Step 1 and 2 of the lifecycle.
    fn admit(&mut self, mut cmd: Command, origin: Origin, redelivered: bool) {
        let (id, device) = (cmd.id.to_string(), cmd.device.to_string());
        let print = fingerprint(&cmd);
        let now = now_ms();
        // A copy the broker redelivered (our acknowledgement was lost to a crash or a
        // reconnect) is answered with the state it has; any other reuse of an id is refused on
        // the dead-letter topic only: the id's outcomes stay one accepted and one final.
        if let Some(p) = self.table.pending(&id) {
            if redelivered && p.fingerprint == print {
                let detail = accepted_detail(&p.origin);
                self.report(&id, &device, OutcomeState::Accepted, &detail, now);
                return;
            }
            let why = format!("duplicate id `{id}`: already accepted, this copy is ignored");
            return self.refuse_duplicate(&id, &cmd, &why);
        }
        if let Some(f) = self.table.finished(&id) {
            if redelivered && f.fingerprint == print {
                let f = f.clone();
                self.report(&f.id, &f.device, f.state, &f.detail, f.at_ms);
                return;
            }
            let why = format!(
                "duplicate id `{id}`: already {}, this copy is ignored",
                f.state.as_str()
            );
            return self.refuse_duplicate(&id, &cmd, &why);
        }
        if now >= cmd.expires_at {
            let why = format!(
                "expired: expires_at {} is {} ms before the gateway's clock",
                cmd.expires_at,
                now - cmd.expires_at
            );
            return self.reject(&id, &device, &why);
        }
        if let Err(why) = config::check(&self.config.allow, &cmd) {
            return self.reject(&id, &device, &why);
        }
        if cmd.name.as_str() == config::CANCEL {
            // Handled at once and never pending: it works with the table full.
            return self.cancel(&cmd, print, now);
        }
        if self.table.pending.len() >= self.config.max_pending {
            let why = format!(
                "too many pending commands ({}); try again later",
                self.table.pending.len()
            );
            return self.reject(&id, &device, &why);
        }
        // The lifetime ceiling: checked against `expires_at` from here on.
        cmd.expires_at = cmd
            .expires_at
            .min(now.saturating_add(self.config.max_lifetime_ms));
        Metrics::inc(&self.metrics.commands_accepted);
        let detail = accepted_detail(&origin);
        tracing::info!(%id, %device, name = %cmd.name, origin = ?origin, "command accepted");
        self.table.pending.push(Pending {
            command: cmd,
            origin,
            stage: Stage::Queued,
            fingerprint: print,
            reported: false,
        });
        self.dirty = true;
        self.report(&id, &device, OutcomeState::Accepted, &detail, now);
        self.reported.push(Reported::Accepted(id));
    }

    /// A `cancel` command (allowed by the allow-list for its device): ends the pending command
    /// `args.id` of the same device as `failed`, and itself `succeeded`; or is `rejected` if
    /// there is no such command. A command already handed to its device may still be carried
    /// out by it: the detail says so, and a reply that comes later is reported as late.
    fn cancel(&mut self, cmd: &Command, print: u32, now: u64) {
        let (id, device) = (cmd.id.to_string(), cmd.device.to_string());
        let target = match cmd.args.get("id") {
            Some(ArgValue::Str(t)) => t.to_string(),
            _ => return self.reject(&id, &device, "`cancel` needs the string argument `id`"),
        };
        let stage = match self.table.pending(&target) {
            Some(p) if p.command.device.as_str() == device => p.stage.clone(),
            _ => {
                let why = format!("no pending command `{target}` for device `{device}`");
                return self.reject(&id, &device, &why);
            }
        };
        let detail = match stage {
            Stage::Queued => format!("cancelled by `{id}` before it was sent"),
            Stage::Sent { via, .. } => {
                format!("cancelled by `{id}` after it was sent via {via}; the device may still act on it")
            }
        };
        tracing::info!(%id, %target, %device, "command cancelled");
        self.finish(
            target.clone(),
            device.clone(),
            OutcomeState::Failed,
            detail,
            now,
        );
        Metrics::inc(&self.metrics.commands_succeeded);
        let detail = format!("cancelled `{target}`");
        self.table.remember(Finished {
            id: id.clone(),
            device: device.clone(),
            fingerprint: print,
            state: OutcomeState::Succeeded,
            detail: detail.clone(),
            at_ms: now,
            reported: false,
        });
        self.dirty = true;
        self.report(&id, &device, OutcomeState::Succeeded, &detail, now);
        self.reported.push(Reported::Finished(id));
    }

    fn on_device(&mut self, e: DeviceEvent) {
        match e {
            DeviceEvent::Reply { outcome, ack } => {
                self.local_acks.extend(ack);
                self.on_reply(*outcome);
            }
            DeviceEvent::Written { id, port, error } => {
                let Some(p) = self
                    .table
                    .pending
                    .iter_mut()
                    .find(|p| p.command.id.as_str() == id)
                else {
                    return;
                };
                match error {
                    None => {
                        tracing::debug!(%id, port = %self.routes.path(port), "command written to its port")
                    }
                    Some(why) => {
                        tracing::info!(%id, port = %self.routes.path(port), reason = %why, "command not written; queued again");
                        p.stage = Stage::Queued;
                        self.dirty = true;
                    }
                }
            }
        }
    }

    fn on_reply(&mut self, o: CommandOutcome) {
        let (id, device) = (o.id.as_str(), o.device.as_str());
        let location = format!("devices/{device}/replies");
        let Some(p) = self.table.pending(id) else {
            let why = match self.table.finished(id) {
                Some(f) if f.state == o.state => {
                    // The same reply again (a redelivery): already reported.
                    tracing::debug!(%id, "repeated reply ignored");
                    return;
                }
                Some(f) => {
                    Metrics::inc(&self.metrics.command_replies_late);
                    format!(
                        "late reply `{}` for command `{id}`, already {}",
                        o.state.as_str(),
                        f.state.as_str()
                    )
                }
                None => {
                    Metrics::inc(&self.metrics.command_replies_unmatched);
                    format!("reply for unknown command `{id}`")
                }
            };
            let bytes = reply_bytes(&o);
            return self.dead_letter(&location, &why, &bytes);
        };
        if p.command.device.as_str() != device {
            Metrics::inc(&self.metrics.command_replies_unmatched);
            let why = format!(
                "reply from `{device}` for command `{id}` addressed to `{}`",
                p.command.device
            );
            let bytes = reply_bytes(&o);
            return self.dead_letter(&location, &why, &bytes);
        }
        if o.state == OutcomeState::Accepted {
            tracing::debug!(%id, %device, "device acknowledged the command");
            return;
        }
        let detail = if o.detail.is_empty() {
            format!("reported by {device}")
        } else {
            o.detail.to_string()
        };
        self.finish(
            id.to_string(),
            device.to_string(),
            o.state,
            detail,
            o.ts.unwrap_or_else(now_ms),
        );
    }

    fn finish(&mut self, id: String, device: String, state: OutcomeState, detail: String, ts: u64) {
        Metrics::inc(match state {
            OutcomeState::Succeeded => &self.metrics.commands_succeeded,
            OutcomeState::Failed => &self.metrics.commands_failed,
            OutcomeState::TimedOut => &self.metrics.commands_timed_out,
            OutcomeState::Rejected | OutcomeState::Accepted => &self.metrics.commands_rejected,
        });
        tracing::info!(%id, %device, state = state.as_str(), %detail, "command finished");
        self.table.finish(&id, state, &detail, ts);
        self.dirty = true;
        self.report(&id, &device, state, &detail, ts);
        self.reported.push(Reported::Finished(id));
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        let reply_timeout = self.config.reply_timeout_ms;
        let expired: Vec<(String, String, String)> = self
            .table
            .pending
            .iter()
            .filter_map(|p| {
                let c = &p.command;
                let (deadline, detail) = match &p.stage {
                    Stage::Queued => (
                        c.expires_at,
                        format!(
                            "not delivered before expires_at: `{}` unreachable",
                            c.device
                        ),
                    ),
                    Stage::Sent { at_ms, via } => (
                        c.expires_at.min(at_ms.saturating_add(reply_timeout)),
                        format!(
                            "no reply within {} ms of sending via {via}",
                            now.saturating_sub(*at_ms)
                        ),
                    ),
                };
                (now >= deadline).then(|| (c.id.to_string(), c.device.to_string(), detail))
            })
            .collect();
        for (id, device, detail) in expired {
            self.finish(id, device, OutcomeState::TimedOut, detail, now);
        }
    }

    /// Commands whose transport is available now; marked sent in the table.
    fn plan_sends(&mut self) -> Vec<Send> {
        let now = now_ms();
        let mut sends = Vec::new();
        for p in &mut self.table.pending {
            if p.stage != Stage::Queued {
                continue;
            }
            let route = self.routes.route(&p.command.device);
            let via = match route {
                Route::Serial(i) if self.routes.is_open(i) => self.routes.path(i),
                Route::Mqtt if self.local.is_some() => "mqtt".to_string(),
                _ => continue,
            };
            p.stage = Stage::Sent { at_ms: now, via };
            self.dirty = true;
            sends.push(Send {
                id: p.command.id.to_string(),
                route,
            });
        }
        sends
    }

    fn perform(&mut self, sends: Vec<Send>) {
        for s in sends {
            let Some(p) = self
                .table
                .pending
                .iter_mut()
                .find(|p| p.command.id.as_str() == s.id)
            else {
                continue;
            };
            let result = match s.route {
                Route::Serial(i) => {
                    self.routes
                        .hand_off(i, p.command.clone())
                        .map_err(|e| match e {
                            HandOff::Closed => "port closed".to_string(),
                            HandOff::Busy => "port busy".to_string(),
                        })
                }
                Route::Mqtt => match &self.local {
                    Some(client) => {
                        let mut payload = Vec::with_capacity(192);
                        match encode_command(&p.command, &mut payload) {
                            Ok(()) => client
                                .try_publish(
                                    format!("devices/{}/commands", p.command.device),
                                    QoS::AtLeastOnce,
                                    false,
                                    payload,
                                )
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    None => Err("no local broker".to_string()),
                },
            };
            match result {
                Ok(()) => {
                    Metrics::inc(&self.metrics.commands_dispatched);
                    tracing::debug!(id = %s.id, route = ?s.route, "command handed to its transport");
                }
                Err(why) => {
                    tracing::debug!(id = %s.id, reason = %why, "command not handed over; queued again");
                    p.stage = Stage::Queued;
                    self.dirty = true;
                }
            }
        }
    }

    /// Saves the table if it changed, stores this turn's outcomes, performs the planned
    /// hand-offs, then acknowledges the inputs (the order is the module doc's guarantee).
    async fn end_turn(&mut self) {
        let sends = self.plan_sends();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        while self.dirty {
            let bytes = match CommandStore::encode(&self.table) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "command table cannot be encoded");
                    break;
                }
            };
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.write(&bytes)).await {
                Ok(Ok(())) => self.dirty = false,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "command table cannot be saved; retrying, nothing acknowledged");
                    if !backoff.wait_unless_stopped(&self.stopping).await {
                        return self.give_up_turn();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "command table save task failed; retrying");
                    if !backoff.wait_unless_stopped(&self.stopping).await {
                        return self.give_up_turn();
                    }
                }
            }
        }
        if !self.records.is_empty() {
            loop {
                let stored = match self.outbox.append(&self.records) {
                    Ok(_) => self.outbox.flush().await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "command outcomes cannot be stored; retrying, nothing acknowledged");
                        if !backoff.wait_unless_stopped(&self.stopping).await {
                            return self.give_up_turn();
                        }
                    }
                }
            }
            self.records.clear();
            for r in self.reported.drain(..) {
                match r {
                    Reported::Accepted(id) => {
                        if let Some(p) = self
                            .table
                            .pending
                            .iter_mut()
                            .find(|p| p.command.id.as_str() == id)
                        {
                            p.reported = true;
                        }
                    }
                    Reported::Finished(id) => {
                        if let Some(f) = self.table.recent.iter_mut().rev().find(|f| f.id == id) {
                            f.reported = true;
                        }
                    }
                }
            }
            // Not saved now: if the agent stops before the next save, these outcomes are
            // reported once more after the restart (a duplicate, never a loss).
        }
        self.perform(sends);
        for ack in self.cloud_acks.drain(..) {
            ack.ack();
        }
        if let Some(client) = &self.local {
            for ack in self.local_acks.drain(..) {
                if let Err(e) = client.try_ack(&ack.to_publish()) {
                    tracing::debug!(error = %e, "reply PUBACK not queued; the broker will redeliver");
                }
            }
        }
        Metrics::set(
            &self.metrics.commands_pending,
            self.table.pending.len() as u64,
        );
    }
}

fn accepted_detail(origin: &Origin) -> String {
    match origin {
        Origin::Cloud => "accepted by the gateway".into(),
        Origin::Rule(rule) => format!("issued by rule `{rule}`"),
    }
}

fn reply_bytes(o: &CommandOutcome) -> Vec<u8> {
    let mut v = Vec::new();
    if encode_outcome(o, &mut v).is_err() {
        v.clear();
    }
    v
}

// Rejection reasons are written to fit the outcome's detail.
const _: () = assert!(MAX_DETAIL_LEN >= 96);
