//! The rules stage: evaluates every reading against the running rule plan, appends what comes
//! of it to the outbox as one group commit, and only then acknowledges the inputs.
//!
//! Group commit: the stage takes whatever is waiting in its input channel, evaluates it in
//! arrival order, appends all resulting records in one atomic outbox batch, awaits the flush
//! (with `durability = "batch"`), and acknowledges the inputs in arrival order. A flush is the
//! largest per-group cost (sled's log write, fsync and thread hand-offs), so a group may wait
//! up to [`COMMIT_LINGER`] (or `outbox.commit_linger_ms`) after its first input to share it,
//! but only while that is likely to fill it: while more input is already waiting, or while the
//! group is smaller than 3/4 of the size groups are expected to reach (`next_expected_group`).
//! The second rule adapts to the source: when idle, single readings commit at once (a lone
//! reading that lingered sets the expectation to one); when a broker's in-flight window
//! (rumqttd's is a fixed 100) is what bounds a group, the group commits as soon as it holds
//! about a window's worth, instead of lingering for input the broker will not send before its
//! acks.
//!
//! Readings stamped further ahead of the gateway's clock than `rules.max_clock_skew_ms` are
//! rejected before the engine sees them: the engine takes each reading's timestamp as the
//! device's time, and one reading from the far future would make every later reading of that
//! (device, metric) late, so that no rule acted on it again. Readings from the past are
//! evaluated as they come: they cannot move a device's time forward (a late one changes no
//! state and is still forwarded), and devices that buffer readings while offline send them.
//! Such rejections, and devices a full device table leaves unevaluated (a rule's
//! `max_devices`, the engine's own limit), are counted, logged at most once per
//! [`LOG_INTERVAL`](crate::deadletter::LOG_INTERVAL) and sampled to the dead-letter topic
//! (source `rules`).
//!
//! If the outbox cannot store a group (disk full, I/O error) the stage retries it with backoff
//! and acknowledges nothing meanwhile: sources block, brokers hold the data, nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgestream_rules::{drain_prefetching, AlertState, Disposition, Engine, Output, Plan};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::deadletter::RejectSampler;
use crate::outbox::config::COMMIT_LINGER;
use crate::outbox::record::{AggregateRecord, AlertRecord, ReadingRecord, Record};
use crate::outbox::store::Outbox;
use crate::source::reading::{now_ms, Ack, SourceMsg};
use crate::telemetry::metrics::Metrics;

/// Largest number of inputs evaluated and committed as one group.
pub const MAX_GROUP: usize = 1024;

/// How often time-driven rules (missing data, durations, downsampling windows) are ticked.
pub const TICK: Duration = Duration::from_secs(1);

/// Whether a group of `inputs`, still inside its linger, should wait for more input to share
/// its flush: while more is already waiting, or while it holds less than 3/4 of the size
/// groups are expected to reach. Never beyond [`MAX_GROUP`].
fn wait_for_more(inputs: usize, expected: usize, input_waiting: bool) -> bool {
    inputs < MAX_GROUP && (input_waiting || inputs * 4 < expected * 3)
}

/// The expectation before any group: the first group takes the whole linger, and so measures
/// what the source delivers in it.
const FIRST_EXPECTED_GROUP: usize = MAX_GROUP;

/// The size the next group is expected to reach, after a group of `committed` inputs that
/// committed `early` (before [`COMMIT_LINGER`] ran out) or not.
///
/// A group that took the whole linger shows what the source delivers in that time: it becomes
/// the expectation, so a source that slows down or goes idle is followed at once (one group
/// lingers). An early group can only raise it: taking every early group as the expectation
/// would ratchet it down under a steady rate (each group commits as soon as it holds 3/4 of the
/// one before and the channel is momentarily empty, so groups shrink until one delivery burst
/// fills one; at 10,000 readings/s that halves the readings per flush).
fn next_expected_group(expected: usize, committed: usize, early: bool) -> usize {
    if early {
        committed.max(expected)
    } else {
        committed
    }
}

#[derive(Debug)]
pub struct RulesStage {
    engine: Engine,
    outbox: Outbox,
    /// Where acknowledgements go: the local source, which writes them to its broker.
    local_acker: Option<mpsc::Sender<Vec<Ack>>>,
    metrics: Arc<Metrics>,
    plan_updates: Option<mpsc::Receiver<Plan>>,
    /// Acknowledgements not yet taken by the local source's channel, oldest first.
    /// Never awaited: the local source stops taking them while our input channel is full, so
    /// an awaited ack would deadlock the two under a burst. Bounded by the messages the broker
    /// has in flight to us.
    unacked: Vec<Ack>,
    /// Bumped on every turn of the loop and every retry: the systemd watchdog's evidence
    /// that the stage is not wedged.
    heartbeat: Arc<AtomicU64>,
    /// Where rule-issued device commands go (`None`: counted only, as in `rules test`).
    commands: Option<crate::commands::router::RuleCommandIssuer>,
    /// Longest a group waits for more input ([`COMMIT_LINGER`] unless configured).
    linger: Duration,
    /// `rules.max_clock_skew_ms` (0: no limit).
    max_clock_skew_ms: u64,
    /// Cancelled when the agent starts to stop: a group the outbox cannot store is then
    /// given up (unacknowledged) instead of retried.
    stopping: CancellationToken,
    /// Rejections and refusals of this stage, logged and sampled as dead letters.
    sampler: RejectSampler,
    /// The engine's refusal counts last reported: per rule (plan order), and its own.
    rule_refusals_seen: Vec<u64>,
    rule_refusals_total: u64,
    engine_refusals_seen: u64,
}

impl RulesStage {
    pub fn new(
        engine: Engine,
        outbox: Outbox,
        local_acker: Option<mpsc::Sender<Vec<Ack>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            engine,
            outbox,
            local_acker,
            metrics,
            plan_updates: None,
            unacked: Vec::new(),
            heartbeat: Arc::default(),
            commands: None,
            linger: COMMIT_LINGER,
            max_clock_skew_ms: crate::rules_stage::config::DEFAULT_MAX_CLOCK_SKEW_MS,
            stopping: CancellationToken::new(),
            sampler: RejectSampler::new("rules"),
            rule_refusals_seen: Vec::new(),
            rule_refusals_total: 0,
            engine_refusals_seen: 0,
        }
        .with_refusals_seen()
    }

    /// Takes the engine's refusal counts as reported (at start and after a plan swap).
    fn with_refusals_seen(mut self) -> Self {
        self.rule_refusals_seen = self.engine.rule_refusals().map(|(_, n)| n).collect();
        self.rule_refusals_total = self.engine.stats().rule_devices_refused;
        self.engine_refusals_seen = self.engine.stats().engine_devices_refused;
        self
    }

    /// Rejects readings stamped more than `ms` ahead of the gateway's clock (0: no limit).
    pub fn with_max_clock_skew_ms(mut self, ms: u64) -> Self {
        self.max_clock_skew_ms = ms;
        self
    }

    /// Sets how long a group may wait after its first input for more to share its flush
    /// (`outbox.commit_linger_ms`).
    pub fn with_commit_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Hands the commands rules issue to the command router.
    pub fn with_commands(mut self, issuer: crate::commands::router::RuleCommandIssuer) -> Self {
        self.commands = Some(issuer);
        self
    }

    /// The token cancelled when the agent starts to stop (its `stop_intake`).
    pub fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    pub fn with_heartbeat(mut self, heartbeat: Arc<AtomicU64>) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    fn beat(&self) {
        self.heartbeat.fetch_add(1, Ordering::Relaxed);
    }

    /// New plans arrive here and are swapped in between two groups.
    pub fn with_plan_updates(mut self, rx: mpsc::Receiver<Plan>) -> Self {
        self.plan_updates = Some(rx);
        self
    }

    /// Runs until every source has dropped its sender and the channel is drained.
    pub async fn run(mut self, mut input: mpsc::Receiver<SourceMsg>) {
        let mut msgs = Vec::with_capacity(MAX_GROUP);
        let mut records = Vec::with_capacity(MAX_GROUP);
        let mut acks = Vec::with_capacity(MAX_GROUP);
        let mut out = Output::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Inputs evaluated since the last commit, when the first of them was taken, and the
        // size a group is expected to reach.
        let mut group_inputs = 0usize;
        let mut group_since: Option<Instant> = None;
        let mut expected_group = FIRST_EXPECTED_GROUP;
        let mut linger_ends = crate::select_loop::Deadline::new();
        loop {
            self.beat();
            linger_ends.set(group_since.map(|t| t + self.linger));
            tokio::select! {
                n = input.recv_many(&mut msgs, MAX_GROUP.saturating_sub(group_inputs).max(1)) => {
                    if n == 0 {
                        break;
                    }
                }
                // The linger ran out: commit what the group holds.
                _ = linger_ends.elapsed() => {}
                _ = tick.tick() => {
                    self.engine.on_tick(now_ms(), &mut out);
                    self.collect(&out, None, &mut records);
                }
                _ = tokio::time::sleep(ACK_RETRY), if !self.unacked.is_empty() => {
                    self.send_acks();
                    continue;
                }
                Some(plan) = crate::select_loop::recv_or_pending(&mut self.plan_updates) => {
                    tracing::info!(rules = plan.rule_count(), "swapping rule plan");
                    self.engine.swap_plan(plan);
                    // The new plan's rules (their order and names) are what the next
                    // report compares with; refusals of the swap itself are counted.
                    self.rule_refusals_seen = self.engine.rule_refusals().map(|(_, n)| n).collect();
                    self.report_refusals(None, &mut records);
                    continue;
                }
            }
            group_since.get_or_insert_with(Instant::now);
            group_inputs += msgs.len();
            // Readings stamped after this are rejected (module doc); 0: no limit.
            let latest_ts = match self.max_clock_skew_ms {
                0 => u64::MAX,
                skew => now_ms().saturating_add(skew),
            };
            drain_prefetching(
                &mut msgs,
                &mut self,
                Self::prefetch,
                |stage, msg| match msg {
                    SourceMsg::Reading(r, ack) if r.ts_ms > latest_ts => {
                        stage.reject_clock_skew(&r, &mut records);
                        acks.extend(ack);
                    }
                    SourceMsg::Reading(r, ack) => {
                        let reading = edgestream_rules::Reading {
                            device: &r.device,
                            metric: &r.metric,
                            value: r.value,
                            ts_ms: r.ts_ms,
                        };
                        stage.engine.on_reading(&reading, &mut out);
                        Metrics::inc(&stage.metrics.rules_evaluated);
                        stage.report_refusals(Some(&r), &mut records);
                        stage.collect(&out, Some(r), &mut records);
                        acks.extend(ack);
                    }
                    SourceMsg::Rejected(sample, ack) => {
                        if let Some(s) = sample {
                            Metrics::inc(&stage.metrics.deadletters_sent);
                            records.push(Record::DeadLetter(s));
                        }
                        acks.extend(ack);
                    }
                },
            );
            if records.is_empty() && acks.is_empty() {
                group_inputs = 0;
                group_since = None;
                continue;
            }
            // Share the flush with more input if that is likely to come (module doc).
            let lingering = group_since.is_some_and(|t| t.elapsed() < self.linger);
            if lingering && wait_for_more(group_inputs, expected_group, !input.is_empty()) {
                continue;
            }
            if self.commit(&mut records).await {
                self.unacked.append(&mut acks);
            } else {
                acks.clear();
            }
            self.send_acks();
            expected_group = next_expected_group(expected_group, group_inputs, lingering);
            group_inputs = 0;
            group_since = None;
        }
        if (!records.is_empty() || !acks.is_empty()) && self.commit(&mut records).await {
            self.unacked.append(&mut acks);
        }
        // The source keeps polling until we are done: give the last acknowledgements a bounded
        // chance; any left over are redelivered by the broker (duplicates, not losses).
        for _ in 0..200 {
            self.send_acks();
            if self.unacked.is_empty() {
                break;
            }
            tokio::time::sleep(ACK_RETRY).await;
        }
        tracing::info!("rules stage drained");
    }

    /// Lets the engine start loading the state `msg` will need, if it is a reading.
    fn prefetch(&self, msg: &SourceMsg) {
        if let SourceMsg::Reading(r, _) = msg {
            self.engine.prefetch(&r.device, &r.metric);
        }
    }

    /// Counts, logs and samples a reading stamped too far ahead of the gateway's clock.
    fn reject_clock_skew(
        &mut self,
        r: &crate::source::reading::Reading,
        records: &mut Vec<Record>,
    ) {
        Metrics::inc(&self.metrics.readings_clock_skew);
        let reason = format!(
            "timestamp {} is more than rules.max_clock_skew_ms ({} ms) ahead of the gateway's clock",
            r.ts_ms, self.max_clock_skew_ms
        );
        let location = format!("{}/{}", r.device, r.metric);
        self.sample(&location, &reason, &reading_json(r), records);
    }

    /// Reports devices the engine refused since the last report: a rule at its `max_devices`,
    /// or the engine at its own device limit. Cheap when nothing changed (two comparisons).
    fn report_refusals(
        &mut self,
        reading: Option<&crate::source::reading::Reading>,
        records: &mut Vec<Record>,
    ) {
        let stats = self.engine.stats();
        let (engine_total, rules_total) =
            (stats.engine_devices_refused, stats.rule_devices_refused);
        if engine_total == self.engine_refusals_seen && rules_total == self.rule_refusals_total {
            return;
        }
        let device = reading.map_or_else(String::new, |r| r.device.to_string());
        let payload = reading.map(reading_json).unwrap_or_default();
        if engine_total > self.engine_refusals_seen {
            Metrics::add(
                &self.metrics.engine_devices_refused,
                engine_total - self.engine_refusals_seen,
            );
            let reason = "the rules engine tracks no more devices (its device limit): this device's readings are forwarded without rules";
            self.sample(&device, reason, &payload, records);
        }
        self.engine_refusals_seen = engine_total;
        if rules_total > self.rule_refusals_total {
            Metrics::add(
                &self.metrics.rule_devices_refused,
                rules_total - self.rule_refusals_total,
            );
            let counts: Vec<u64> = self.engine.rule_refusals().map(|(_, n)| n).collect();
            let full: Vec<&str> = self
                .engine
                .rule_refusals()
                .zip(self.rule_refusals_seen.iter().chain(std::iter::repeat(&0)))
                .filter(|((_, n), seen)| *n > **seen)
                .map(|((name, _), _)| name)
                .collect();
            let reason = if full.is_empty() {
                // Refused while a new plan was swapped in, for devices already known.
                "rule(s) of the new plan at max_devices: known devices beyond it are not evaluated by them".to_string()
            } else {
                format!(
                    "rule(s) {} at max_devices: this device is not evaluated by them",
                    full.join(", ")
                )
            };
            self.rule_refusals_seen = counts;
            self.sample(&device, &reason, &payload, records);
        }
        self.rule_refusals_total = rules_total;
    }

    /// Logs (at most once per interval) and samples one rejection as a dead letter.
    fn sample(&mut self, location: &str, reason: &str, payload: &[u8], records: &mut Vec<Record>) {
        match self.sampler.reject(location, reason, payload) {
            Some(s) => {
                Metrics::inc(&self.metrics.deadletters_sent);
                records.push(Record::DeadLetter(s));
            }
            None => Metrics::inc(&self.metrics.deadletters_suppressed),
        }
    }

    /// Turns the engine's output for one reading (or one tick) into outbox records.
    fn collect(
        &mut self,
        out: &Output,
        reading: Option<crate::source::reading::Reading>,
        records: &mut Vec<Record>,
    ) {
        let m = &self.metrics;
        for a in &out.alerts {
            let raised = a.state == AlertState::Raised;
            Metrics::inc(if raised {
                &m.alerts_raised
            } else {
                &m.alerts_cleared
            });
            records.push(Record::Alert(AlertRecord {
                rule: crate::uplink::wire::truncated(&a.rule),
                device: a.device.clone(),
                severity: crate::uplink::wire::truncated(a.severity.as_str()),
                raised,
                value: a.value,
                ts_ms: a.ts_ms,
                message: a.message.to_string(),
            }));
        }
        for g in &out.aggregates {
            Metrics::inc(&m.aggregates);
            records.push(Record::Aggregate(AggregateRecord {
                rule: g.rule.to_string(),
                device: g.device.to_string(),
                metric: g.metric.to_string(),
                start_ms: g.start_ms,
                end_ms: g.end_ms,
                count: g.count,
                avg: g.avg,
                min: g.min,
                max: g.max,
            }));
        }
        if !out.commands.is_empty() {
            Metrics::add(&m.rule_commands, out.commands.len() as u64);
            if let Some(issuer) = &mut self.commands {
                for c in &out.commands {
                    issuer.issue(c, records, m);
                }
            }
        }
        if let Some(r) = reading {
            let max_tags = edgestream_protocol::limits::MAX_TAGS;
            if out.tags.len() > max_tags {
                Metrics::add(&m.tags_truncated, (out.tags.len() - max_tags) as u64);
            }
            if out.disposition == Disposition::Drop {
                Metrics::inc(&m.readings_dropped_by_rule);
            } else {
                records.push(Record::Reading(ReadingRecord {
                    device: r.device,
                    metric: r.metric,
                    value: r.value,
                    ts_ms: r.ts_ms,
                    // Each rule is capped by the compiler, but several rules together can
                    // tag one reading; the wire format carries at most MAX_TAGS.
                    tags: out
                        .tags
                        .iter()
                        .take(max_tags)
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                }));
            }
        }
    }

    /// Appends and (by policy) flushes `records`, retrying both until they succeed; returns
    /// whether they are stored. A flush that fails is retried with the append: after a failed
    /// `fdatasync` the kernel may have dropped the written pages and report the next sync as
    /// clean, so only records written again and synced are known durable (duplicates in the
    /// outbox at worst, never a loss). While storage fails the outbox reports the state
    /// (`outbox/fault.rs`) and the group's inputs stay unacknowledged, so sources back up.
    /// Once the agent is stopping, a group that cannot be stored is given up, unacknowledged
    /// (the local broker redelivers it after the restart), so that shutdown stays clean.
    async fn commit(&self, records: &mut Vec<Record>) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let stored = match self.outbox.append(records) {
                Ok(_) if self.outbox.flush_per_batch() => self.outbox.flush().await,
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            let Err(e) = stored else {
                records.clear();
                return true;
            };
            self.beat();
            tracing::debug!(error = %e, records = records.len(), "outbox commit failed; retrying, nothing acknowledged");
            if !backoff.wait_unless_stopped(&self.stopping).await {
                tracing::error!(
                    error = %e,
                    records = records.len(),
                    "stopping while outbox storage fails: the last group is not stored and its inputs are not acknowledged (the local broker redelivers them)"
                );
                records.clear();
                return false;
            }
        }
    }

    /// Hands the queued acknowledgements, as one batch, to the local source; if its channel
    /// is full they wait for the next group or [`ACK_RETRY`].
    fn send_acks(&mut self) {
        let Some(acker) = &self.local_acker else {
            self.unacked.clear();
            return;
        };
        if self.unacked.is_empty() {
            return;
        }
        match acker.try_reserve() {
            Ok(permit) => permit.send(std::mem::take(&mut self.unacked)),
            Err(mpsc::error::TrySendError::Full(())) => {}
            Err(mpsc::error::TrySendError::Closed(())) => {
                // The local source is gone; the broker will redeliver (a duplicate in the
                // outbox, never a loss).
                tracing::debug!(
                    count = self.unacked.len(),
                    "PUBACKs not queued: local source stopped"
                );
                self.unacked.clear();
            }
        }
    }
}

/// A reading as the dead-letter sample shows it (the protocol's local reading, with names).
fn reading_json(r: &crate::source::reading::Reading) -> Vec<u8> {
    serde_json::json!({
        "device": r.device.as_str(),
        "metric": r.metric.as_str(),
        "value": r.value,
        "ts": r.ts_ms,
    })
    .to_string()
    .into_bytes()
}

/// How soon acknowledgements refused by a full channel to the local source are offered again.
const ACK_RETRY: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the stage's grouping decisions over a source that offers `offered(t)` inputs at
    /// each millisecond `t`, of which at most `window` may be delivered and not yet committed
    /// (a broker's in-flight window; commits acknowledge at once). Returns each group's size
    /// and whether it ran out its linger.
    fn simulate(ms: u64, window: usize, offered: impl Fn(u64) -> usize) -> Vec<(usize, bool)> {
        simulate_linger(COMMIT_LINGER, ms, window, offered)
    }

    /// [`simulate`] with a linger of `linger` instead of the default.
    fn simulate_linger(
        linger: Duration,
        ms: u64,
        window: usize,
        offered: impl Fn(u64) -> usize,
    ) -> Vec<(usize, bool)> {
        let linger = u64::try_from(linger.as_millis()).unwrap();
        let mut expected = FIRST_EXPECTED_GROUP;
        let (mut held, mut group, mut since) = (0usize, 0usize, None);
        let mut groups = Vec::new();
        for t in 0..ms {
            held += offered(t);
            let delivered = held.min(window - group);
            held -= delivered;
            group += delivered;
            if delivered > 0 {
                since.get_or_insert(t);
            }
            let Some(first) = since else { continue };
            let lingering = t - first < linger;
            if lingering && wait_for_more(group, expected, false) {
                continue;
            }
            groups.push((group, !lingering));
            expected = next_expected_group(expected, group, lingering);
            (group, since) = (0, None);
        }
        groups
    }

    #[test]
    fn groups_keep_their_size_under_a_steady_rate() {
        // 10 inputs every millisecond, no window: the first group measures the linger's worth
        // (the linger's milliseconds and the first one's input), and no later group shrinks
        // below 3/4 of it.
        let linger = usize::try_from(COMMIT_LINGER.as_millis()).unwrap();
        let first = (linger + 1) * 10;
        let groups = simulate(2_000, usize::MAX, |_| 10);
        assert_eq!(groups[0], (first, true));
        assert!(groups.len() > 2_000 / (linger + 1), "{groups:?}");
        for &(size, _) in &groups[1..] {
            assert!((first * 3 / 4..=first).contains(&size), "{groups:?}");
        }
    }

    #[test]
    fn a_longer_linger_makes_fewer_larger_groups_at_gateway_rates() {
        // One input a millisecond (1,000 readings/s): the default linger commits groups of
        // 13-17, a 100 ms linger groups of 76-101 (a group commits once it holds 3/4 of what
        // the last full linger gathered), so about a sixth as many flushes.
        let short = simulate(10_000, usize::MAX, |_| 1);
        let long = simulate_linger(Duration::from_millis(100), 10_000, usize::MAX, |_| 1);
        assert_eq!(long[0], (101, true));
        for &(size, _) in &long[1..] {
            assert!((76..=101).contains(&size), "{long:?}");
        }
        assert!(
            long.len() * 5 < short.len(),
            "{} against {}",
            long.len(),
            short.len()
        );
        // Behind a window of 20, only the first group waits out the long linger; the others
        // commit once they hold 3/4 of the window, without waiting for input that will not come.
        let windowed = simulate_linger(Duration::from_millis(100), 2_000, 20, |_| 1);
        assert_eq!(windowed[0], (20, true));
        assert!(windowed.len() > 100, "{windowed:?}");
        assert!(
            windowed[1..]
                .iter()
                .all(|&(size, full)| (15..=20).contains(&size) && !full),
            "{windowed:?}"
        );
    }

    #[test]
    fn window_bound_groups_commit_without_lingering() {
        // The source could deliver 50 a millisecond, but its broker stops at 100 unacknowledged:
        // after the first group has measured that, groups commit as soon as the window is full.
        let groups = simulate(2_000, 100, |_| 50);
        assert_eq!(groups[0], (100, true));
        assert!(groups.len() > 500, "{groups:?}");
        assert!(groups[1..].iter().all(|&g| g == (100, false)), "{groups:?}");
    }

    #[test]
    fn sparse_input_after_load_commits_at_once_after_one_linger() {
        // Load for 100 ms, then, once the load's last group has committed, one reading every
        // 50 ms: one lone reading waits out the linger, the others commit as they come.
        assert!(COMMIT_LINGER < Duration::from_millis(100));
        let groups = simulate(2_100, usize::MAX, |t| match t {
            0..100 => 10,
            200.. if t % 50 == 0 => 1,
            _ => 0,
        });
        let sparse: Vec<_> = groups.iter().filter(|g| g.0 == 1).collect();
        assert_eq!(sparse.len(), 38, "{groups:?}");
        assert_eq!(sparse.iter().filter(|g| g.1).count(), 1, "{groups:?}");
    }
}
