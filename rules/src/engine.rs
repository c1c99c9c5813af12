//! The engine: runs a [`Plan`] over readings with bounded memory.
//!
//! # Guarantees
//!
//! - **Synchronous and pure.** No I/O, no clock: time comes from readings (`ts_ms`) and from
//!   the caller's ticks, so the same inputs always give the same outputs (see
//!   [`replay`](crate::replay())).
//! - **No allocation per reading once warm.** State for a (rule, device) pair is allocated
//!   once, when the device is first seen, at its final size; routing for a (device, metric)
//!   pair is cached on first sight; [`Output`] buffers are reused. After every device and
//!   metric has been seen once and `Output` has grown to fit, `on_reading` allocates nothing
//!   (`tests/alloc.rs` counts).
//! - **Bounded memory.** A rule tracks at most `max_devices` devices (its clause, or
//!   [`Limits::default_max_devices`](crate::Limits)); the engine at most
//!   [`Limits::max_engine_devices`](crate::Limits). Past a rule's limit, a new device is
//!   simply not evaluated by that rule (counted once per device in
//!   [`EngineStats::rule_devices_refused`]); past the engine's limit, a new device's readings
//!   are forwarded untouched and counted in [`EngineStats::engine_devices_refused`]. Windows
//!   are ring buffers sized at compile time. Worst-case bytes are
//!   [`Plan::state_bytes`].
//! - **Alerts emit only on transitions** (raised, cleared), per (rule, device).
//!
//! # Time, late and out-of-order readings
//!
//! Each (device, metric) remembers its newest timestamp. A reading older than that is
//! *late*: it changes no state (windows stay time-ordered, rates stay meaningful), it is
//! counted in [`EngineStats::late_readings`], and it is still forwarded raw (with the tags of
//! currently active rules, and dropped if a currently active `drop` rule selects it) so that no
//! data is lost: the cloud can order it. Equal timestamps are not late. Downsampling treats a
//! reading for a window that was already closed and emitted the same way: forwarded raw.
//!
//! A tick at `now_ms` advances every time-driven rule (durations, time windows, `missing`,
//! downsampling) of every device whose newest reading is not newer than `now_ms`; ticks
//! should come from the same clock as readings' timestamps.
//!
//! Readings whose value is NaN or infinite are forwarded untouched and counted in
//! [`EngineStats::non_finite`]; they never enter a window.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::detector::Det;
use crate::glob::glob_match;
use crate::limits::MAX_CACHED_METRICS_PER_DEVICE;
use crate::output::{
    AggregateEvent, AlertEvent, AlertState, CommandAction, DeviceName, Disposition, MetricName,
    Output,
};
use crate::parser::BinOp;
use crate::plan::{bool_f, DetSpec, Node, Plan, PlanInner, RulePlan};
use crate::window::Ring;

/// One reading, borrowed from the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading<'a> {
    pub device: &'a str,
    pub metric: &'a str,
    pub value: f64,
    /// Reading time in milliseconds (the device's or the gateway's clock, consistently).
    pub ts_ms: u64,
}

/// Counters of everything the engine refused or degraded. Never reset by the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Readings given to `on_reading`.
    pub readings: u64,
    /// Readings with a NaN or infinite value (forwarded untouched).
    pub non_finite: u64,
    /// Readings older than the newest of their (device, metric), or for a closed
    /// downsampling window (forwarded raw, no state change).
    pub late_readings: u64,
    /// Readings whose device name is longer than the protocol allows (forwarded untouched).
    pub device_name_too_long: u64,
    /// Readings from devices beyond [`Limits::max_engine_devices`](crate::Limits)
    /// (forwarded untouched).
    pub engine_devices_refused: u64,
    /// (rule, device) pairs not tracked because the rule was at its `max_devices`.
    pub rule_devices_refused: u64,
    /// Samples that left a time window early because it was full
    /// ([`Limits::time_window_samples`](crate::Limits)).
    pub window_early_evictions: u64,
    /// Readings of metrics beyond the per-device routing cache (evaluated correctly, slower).
    pub uncached_metric_readings: u64,
}

/// A word-at-a-time multiplicative hash (the FxHash recipe) for the device table: device
/// names are short and hashed on every reading, and SipHash's flooding resistance buys
/// nothing here because the table is bounded by `max_engine_devices`.
#[derive(Default)]
struct WordHash(u64);

impl WordHash {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
}

type DeviceMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHash>>;

const NO_INPUT: u8 = u8::MAX;

/// How one reading of one (device, metric) reaches one rule.
#[derive(Debug, Clone, Copy)]
struct Route {
    rule: u32,
    slot: u32,
    /// The rule's input index for this metric, or `NO_INPUT`.
    input: u8,
    /// The rule's selector picks this metric, so its tags and `drop` apply to it.
    selected: bool,
}

#[derive(Debug)]
struct MetricRoutes {
    metric: MetricName,
    newest_ts: u64,
    routes: Vec<Route>,
}

#[derive(Debug)]
struct DeviceEntry {
    name: DeviceName,
    newest_ts: u64,
    /// (rule, slot) of every rule tracking this device.
    rules: Vec<(u32, u32)>,
    metrics: Vec<MetricRoutes>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Normal,
    Pending { since: u64 },
    Raised,
    Clearing { since: u64 },
}

/// An open downsampling window.
#[derive(Debug, Clone, Default)]
struct Downsample {
    open: bool,
    start: u64,
    count: u32,
    sum: f64,
    /// Running mean: the average when `sum` has overflowed (readings near `f64::MAX`), so
    /// that the aggregate's `avg` stays finite, as the protocol requires.
    mean: f64,
    min: f64,
    max: f64,
    last: f64,
    /// End of the last emitted window: readings before it are late.
    closed_until: u64,
}

/// One rule's state for one device.
///
/// Laid out by hand, with what every reading touches first and the whole starting a cache
/// line: a reading of a device whose state has left the cache then misses once on its slot,
/// not on each of the two or three lines Rust's own order spread those fields over (the
/// device name alone fills most of one). What only alerts and downsampling read comes last.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Slot {
    now: u64,
    latest: Box<[f64]>,
    dets: Box<[Det]>,
    phase: Phase,
    down: Downsample,
    device: DeviceName,
}

impl Slot {
    fn new(rule: &RulePlan, device: DeviceName, ts: u64) -> Slot {
        Slot {
            device,
            latest: vec![f64::NAN; rule.inputs.len()].into_boxed_slice(),
            dets: rule.dets.iter().map(|d| Det::new(d, ts)).collect(),
            phase: Phase::Normal,
            now: ts,
            down: Downsample::default(),
        }
    }
}

/// Worst-case bytes of one (rule, device) state, for the compile-time budget.
pub(crate) fn slot_bytes(inputs: usize, dets: &[DetSpec], _forward: bool) -> usize {
    let mut b =
        std::mem::size_of::<Slot>() + inputs * 8 + (inputs + 1) * std::mem::size_of::<Route>();
    for d in dets {
        b += std::mem::size_of::<Det>()
            + if d.window.cap > 0 {
                Ring::heap_bytes(
                    d.window.cap,
                    d.window.horizon_ms > 0,
                    d.window.sorted,
                    d.window.values,
                )
            } else {
                0
            };
    }
    b
}

#[derive(Debug, Default)]
struct RuleState {
    slots: Vec<Slot>,
    /// Devices this rule refused (it was at `max_devices`).
    refused: u64,
}

/// Runs a [`Plan`] over readings. See the module documentation for its guarantees.
#[derive(Debug)]
pub struct Engine {
    plan: Plan,
    states: Vec<RuleState>,
    index: DeviceMap<Box<str>, u32>,
    devices: Vec<DeviceEntry>,
    scratch: Vec<Route>,
    stats: EngineStats,
}

impl Engine {
    pub fn new(plan: Plan) -> Self {
        let states = plan
            .inner
            .rules
            .iter()
            .map(|_| RuleState::default())
            .collect();
        Engine {
            plan,
            states,
            index: DeviceMap::default(),
            devices: Vec::new(),
            scratch: Vec::new(),
            stats: EngineStats::default(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Devices tracked (bounded by `Limits::max_engine_devices`).
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Devices each rule refused because it was at its `max_devices`, in plan order.
    pub fn rule_refusals(&self) -> impl Iterator<Item = (&str, u64)> {
        self.plan
            .inner
            .rules
            .iter()
            .zip(&self.states)
            .map(|(r, s)| (&*r.name, s.refused))
    }

    /// Evaluates one reading. Clears `out` first, then fills it.
    pub fn on_reading(&mut self, r: &Reading<'_>, out: &mut Output) {
        out.clear();
        self.stats.readings += 1;
        if !r.value.is_finite() {
            self.stats.non_finite += 1;
            return;
        }
        let id = match self.index.get(r.device) {
            Some(id) => *id as usize,
            None => match self.add_device(r.device, r.ts_ms) {
                Some(id) => id,
                None => return,
            },
        };
        let plan = &*self.plan.inner;
        let entry = &mut self.devices[id];
        entry.newest_ts = entry.newest_ts.max(r.ts_ms);
        let mut late = false;
        let routes: &[Route] = match entry
            .metrics
            .iter()
            .position(|m| m.metric.as_str() == r.metric)
        {
            Some(mi) => {
                let m = &mut entry.metrics[mi];
                late = r.ts_ms < m.newest_ts;
                m.newest_ts = m.newest_ts.max(r.ts_ms);
                &m.routes
            }
            None => {
                build_routes(plan, &entry.rules, r.metric, &mut self.scratch);
                match MetricName::try_from(r.metric) {
                    Ok(metric) if entry.metrics.len() < MAX_CACHED_METRICS_PER_DEVICE => {
                        let routes = self.scratch.clone();
                        entry.metrics.push(MetricRoutes {
                            metric,
                            newest_ts: r.ts_ms,
                            routes,
                        });
                        entry.metrics.last().map(|m| &m.routes[..]).unwrap_or(&[])
                    }
                    _ => {
                        // Beyond the cache: no per-metric lateness tracking either.
                        self.stats.uncached_metric_readings += 1;
                        &self.scratch
                    }
                }
            }
        };
        if late {
            self.stats.late_readings += 1;
        }
        for route in routes {
            let rule = &plan.rules[route.rule as usize];
            let slot = &mut self.states[route.rule as usize].slots[route.slot as usize];
            if late {
                apply_reading_actions(rule, slot, route.selected, out);
                continue;
            }
            slot.now = slot.now.max(r.ts_ms);
            if route.input != NO_INPUT {
                slot.latest[route.input as usize] = r.value;
                for (spec, det) in rule.dets.iter().zip(slot.dets.iter_mut()) {
                    if spec.input == route.input && det.update(r.ts_ms, r.value) {
                        self.stats.window_early_evictions += 1;
                    }
                }
                if let Some(f) = &rule.forward {
                    if f.input == route.input {
                        if downsample(rule, slot, r.ts_ms, r.value, out) {
                            out.disposition = Disposition::Drop;
                        } else {
                            self.stats.late_readings += 1;
                        }
                    }
                }
                if rule.when.is_some() {
                    step(rule, slot, r.ts_ms, out);
                }
            }
            apply_reading_actions(rule, slot, route.selected, out);
        }
    }

    /// Starts loading, without changing anything, the state that
    /// [`on_reading`](Engine::on_reading) will touch for a reading of `metric` from `device`:
    /// each of its rules' slots for the device and the ring buffers the reading will go into.
    ///
    /// Between two readings of one device, the readings of every other device pass through
    /// the engine, so under load a device's state has usually left the CPU's caches, and a
    /// reading waits on one miss after another (a sorted window's binary search alone is a
    /// chain of them). Called a few readings ahead of `on_reading`, this lets those loads
    /// overlap the work on the readings in between. The loads are the processor's prefetch
    /// instructions, which never make the caller wait; only the pointers that lead to the
    /// next level are read. It changes nothing: results are the same with or without it. A
    /// device or metric the engine has not seen yet is skipped.
    pub fn prefetch<'a>(&'a self, device: &str, metric: &str) {
        let Some(entry) = self
            .index
            .get(device)
            .and_then(|id| self.devices.get(*id as usize))
        else {
            return;
        };
        let Some(m) = entry.metrics.iter().find(|m| m.metric.as_str() == metric) else {
            return;
        };
        let rules = &self.plan.inner.rules;
        let states = &self.states;
        let fed = || {
            m.routes.iter().filter_map(|route| {
                let rule = rules.get(route.rule as usize)?;
                let slot = states
                    .get(route.rule as usize)?
                    .slots
                    .get(route.slot as usize)?;
                Some((route.input, rule, slot))
            })
        };
        // Level by level, so that each level's loads are all in flight together: first every
        // slot's first line (its address needs no load), then what the slots point to (the
        // newest inputs and the detectors), then the detectors' buffers. Walking one rule at
        // a time instead waited on each rule's chain of misses in turn.
        for (_, _, slot) in fed() {
            crate::prefetch::value(&slot.now);
        }
        let dets = |input: u8, rule: &'a RulePlan, slot: &'a Slot| {
            rule.dets
                .iter()
                .zip(slot.dets.iter())
                .filter(move |(spec, _)| spec.input == input)
                .map(|(_, det)| det)
        };
        for (input, rule, slot) in fed() {
            if input != NO_INPUT {
                crate::prefetch::slice(&slot.latest);
                dets(input, rule, slot).for_each(crate::prefetch::object);
            }
        }
        for (input, rule, slot) in fed() {
            if input != NO_INPUT {
                dets(input, rule, slot).for_each(Det::prefetch);
            }
        }
    }

    /// Advances time-driven rules to `now_ms` (missing data, `for` durations, time windows,
    /// downsampling windows closing). Clears `out` first.
    pub fn on_tick(&mut self, now_ms: u64, out: &mut Output) {
        out.clear();
        for (rule, state) in self.plan.inner.rules.iter().zip(self.states.iter_mut()) {
            if !rule.needs_tick {
                continue;
            }
            for slot in state.slots.iter_mut() {
                if now_ms < slot.now {
                    continue;
                }
                slot.now = now_ms;
                if let Some(f) = &rule.forward {
                    if slot.down.open && now_ms >= slot.down.start.saturating_add(f.every_ms) {
                        emit_downsample(rule, slot, out);
                    }
                }
                if rule.when.is_some() {
                    step(rule, slot, now_ms, out);
                }
            }
        }
    }

    /// Replaces the plan between two readings. A rule whose text (its tokens) is unchanged
    /// keeps its per-device state (windows, alert states); other rules start fresh, and
    /// removed rules' state is freed. Devices stay known.
    pub fn swap_plan(&mut self, plan: Plan) {
        let old_plan = std::mem::replace(&mut self.plan, plan);
        let mut old_states: Vec<Option<RuleState>> = std::mem::take(&mut self.states)
            .into_iter()
            .map(Some)
            .collect();
        let new = &*self.plan.inner;
        let mut carried = vec![false; new.rules.len()];
        self.states = new
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let found = old_plan
                    .inner
                    .rules
                    .iter()
                    .position(|o| o.fingerprint == r.fingerprint && o.name == r.name)
                    .and_then(|oi| old_states[oi].take());
                carried[i] = found.is_some();
                found.unwrap_or_default()
            })
            .collect();
        drop(old_states);
        // Carried rules: find each device's slot by name.
        let slot_maps: Vec<DeviceMap<DeviceName, u32>> = self
            .states
            .iter()
            .zip(&carried)
            .map(|(s, c)| {
                if *c {
                    s.slots
                        .iter()
                        .enumerate()
                        .map(|(i, sl)| (sl.device.clone(), i as u32))
                        .collect()
                } else {
                    DeviceMap::default()
                }
            })
            .collect();
        for entry in self.devices.iter_mut() {
            entry.rules.clear();
            for (ri, rule) in new.rules.iter().enumerate() {
                if !glob_match(&rule.device, &entry.name) {
                    continue;
                }
                if let Some(s) = slot_maps[ri].get(&entry.name) {
                    entry.rules.push((ri as u32, *s));
                    continue;
                }
                if let Some(s) = new_slot(
                    rule,
                    &mut self.states[ri],
                    &entry.name,
                    entry.newest_ts,
                    &mut self.stats,
                ) {
                    entry.rules.push((ri as u32, s));
                }
            }
            for m in entry.metrics.iter_mut() {
                m.routes.clear();
                build_routes(new, &entry.rules, &m.metric, &mut m.routes);
            }
        }
    }

    fn add_device(&mut self, device: &str, ts: u64) -> Option<usize> {
        if self.devices.len() >= self.plan.inner.limits.max_engine_devices {
            self.stats.engine_devices_refused += 1;
            return None;
        }
        let Ok(name) = DeviceName::try_from(device) else {
            self.stats.device_name_too_long += 1;
            return None;
        };
        let mut rules = Vec::new();
        for (ri, rule) in self.plan.inner.rules.iter().enumerate() {
            if glob_match(&rule.device, device) {
                if let Some(s) = new_slot(rule, &mut self.states[ri], &name, ts, &mut self.stats) {
                    rules.push((ri as u32, s));
                }
            }
        }
        let id = self.devices.len();
        self.devices.push(DeviceEntry {
            name,
            newest_ts: ts,
            rules,
            metrics: Vec::new(),
        });
        self.index.insert(device.into(), id as u32);
        Some(id)
    }
}

fn new_slot(
    rule: &RulePlan,
    state: &mut RuleState,
    device: &DeviceName,
    ts: u64,
    stats: &mut EngineStats,
) -> Option<u32> {
    if state.slots.len() >= rule.max_devices {
        state.refused += 1;
        stats.rule_devices_refused += 1;
        return None;
    }
    state.slots.push(Slot::new(rule, device.clone(), ts));
    Some((state.slots.len() - 1) as u32)
}

fn build_routes(plan: &PlanInner, rules: &[(u32, u32)], metric: &str, out: &mut Vec<Route>) {
    out.clear();
    for &(ri, slot) in rules {
        let rule = &plan.rules[ri as usize];
        let input = rule
            .inputs
            .iter()
            .position(|m| &**m == metric)
            .map(|i| i as u8)
            .unwrap_or(NO_INPUT);
        let selected = rule.metric.as_ref().is_none_or(|g| glob_match(g, metric));
        let acts = selected && (rule.drop || !rule.tags.is_empty());
        if input != NO_INPUT || acts {
            out.push(Route {
                rule: ri,
                slot,
                input,
                selected,
            });
        }
    }
}

/// Tags and `drop` of a rule that is active (no `when`, or its alert is raised).
fn apply_reading_actions(rule: &RulePlan, slot: &Slot, selected: bool, out: &mut Output) {
    if !selected || rule.forward.is_some() {
        return;
    }
    let active =
        rule.when.is_none() || matches!(slot.phase, Phase::Raised | Phase::Clearing { .. });
    if !active {
        return;
    }
    for (k, v) in &rule.tags {
        out.tags.push((k.clone(), v.clone()));
    }
    if rule.drop {
        out.disposition = Disposition::Drop;
    }
}

/// Adds a reading to the open downsampling window; false if the reading is late for it.
fn downsample(rule: &RulePlan, slot: &mut Slot, ts: u64, x: f64, out: &mut Output) -> bool {
    let Some(f) = &rule.forward else { return false };
    if ts < slot.down.closed_until {
        return false;
    }
    if slot.down.open && ts >= slot.down.start.saturating_add(f.every_ms) {
        emit_downsample(rule, slot, out);
    }
    let d = &mut slot.down;
    if !d.open {
        *d = Downsample {
            open: true,
            start: ts - ts % f.every_ms,
            count: 0,
            sum: 0.0,
            mean: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: f64::NAN,
            closed_until: d.closed_until,
        };
    }
    d.count = d.count.saturating_add(1);
    d.sum += x;
    // Both terms are finite whatever the readings: no intermediate can overflow.
    let n = f64::from(d.count);
    d.mean += x / n - d.mean / n;
    d.min = d.min.min(x);
    d.max = d.max.max(x);
    d.last = x;
    true
}

fn emit_downsample(rule: &RulePlan, slot: &mut Slot, out: &mut Output) {
    let Some(f) = &rule.forward else { return };
    let d = &mut slot.down;
    let end = d.start.saturating_add(f.every_ms);
    out.aggregates.push(AggregateEvent {
        rule: rule.name.clone(),
        device: slot.device.clone(),
        metric: f.metric.clone(),
        start_ms: d.start,
        end_ms: end,
        count: d.count,
        avg: if d.sum.is_finite() {
            d.sum / f64::from(d.count.max(1))
        } else {
            d.mean
        },
        min: d.min,
        max: d.max,
        sum: d.sum,
        last: d.last,
        functions: f.functions,
    });
    d.open = false;
    d.closed_until = end;
}

fn eval(n: &Node, latest: &[f64], dets: &mut [Det], now: u64) -> f64 {
    match n {
        Node::Const(c) => *c,
        Node::Latest(i) => latest[*i as usize],
        Node::Det(i) => dets[*i as usize].value(now),
        Node::AggOf(i, f) => dets[*i as usize].agg(now, *f),
        Node::Neg(a) => -eval(a, latest, dets, now),
        Node::Not(a) => {
            let v = eval(a, latest, dets, now);
            if v.is_nan() {
                v
            } else {
                bool_f(v == 0.0)
            }
        }
        Node::Abs(a) => eval(a, latest, dets, now).abs(),
        Node::CmpLatest(op, i, c) => {
            let x = latest[*i as usize];
            if x.is_nan() {
                return f64::NAN;
            }
            bool_f(match op {
                BinOp::Lt => x < *c,
                BinOp::Le => x <= *c,
                BinOp::Gt => x > *c,
                BinOp::Ge => x >= *c,
                BinOp::Eq => x == *c,
                _ => x != *c,
            })
        }
        Node::Bin(op, a, b) => {
            let x = eval(a, latest, dets, now);
            let y = eval(b, latest, dets, now);
            // Unknown (NaN) follows SQL's three-valued logic: a comparison with an unknown
            // value is unknown, `not unknown` is unknown, `false and unknown` is false and
            // `true or unknown` is true. Only a definite true makes a condition hold.
            let known = !x.is_nan() && !y.is_nan();
            match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                _ if !known && !matches!(op, BinOp::And | BinOp::Or) => f64::NAN,
                BinOp::Lt => bool_f(x < y),
                BinOp::Le => bool_f(x <= y),
                BinOp::Gt => bool_f(x > y),
                BinOp::Ge => bool_f(x >= y),
                BinOp::Eq => bool_f(x == y),
                BinOp::Ne => bool_f(x != y),
                BinOp::And if x == 0.0 || y == 0.0 => 0.0,
                BinOp::Or if x == 1.0 || y == 1.0 => 1.0,
                BinOp::And | BinOp::Or => {
                    if known {
                        bool_f(op == &BinOp::And)
                    } else {
                        f64::NAN
                    }
                }
            }
        }
    }
}

/// Only a definite true holds; false and unknown do not.
fn holds(n: &Node, slot: &mut Slot, now: u64) -> bool {
    eval(n, &slot.latest, &mut slot.dets, now) == 1.0
}

/// Advances a (rule, device) alert state machine at time `now`.
fn step(rule: &RulePlan, slot: &mut Slot, now: u64, out: &mut Output) {
    let Some(when) = &rule.when else { return };
    match slot.phase {
        Phase::Normal => {
            if holds(when, slot, now) {
                if rule.for_ms == 0 {
                    transition(rule, slot, now, AlertState::Raised, out);
                } else {
                    slot.phase = Phase::Pending { since: now };
                }
            }
        }
        Phase::Pending { since } => {
            if !holds(when, slot, now) {
                slot.phase = Phase::Normal;
            } else if now.saturating_sub(since) >= rule.for_ms {
                transition(rule, slot, now, AlertState::Raised, out);
            }
        }
        Phase::Raised => {
            if clears(rule, when, slot, now) {
                if rule.clear_for_ms == 0 {
                    transition(rule, slot, now, AlertState::Cleared, out);
                } else {
                    slot.phase = Phase::Clearing { since: now };
                }
            }
        }
        Phase::Clearing { since } => {
            if !clears(rule, when, slot, now) {
                slot.phase = Phase::Raised;
            } else if now.saturating_sub(since) >= rule.clear_for_ms {
                transition(rule, slot, now, AlertState::Cleared, out);
            }
        }
    }
}

fn clears(rule: &RulePlan, when: &Node, slot: &mut Slot, now: u64) -> bool {
    match &rule.clear {
        Some(c) => holds(c, slot, now),
        None => !holds(when, slot, now),
    }
}

fn transition(rule: &RulePlan, slot: &mut Slot, now: u64, state: AlertState, out: &mut Output) {
    slot.phase = if state == AlertState::Raised {
        Phase::Raised
    } else {
        Phase::Normal
    };
    let value = slot.latest.first().copied().unwrap_or(f64::NAN);
    if let Some((severity, message)) = &rule.alert {
        out.alerts.push(AlertEvent {
            rule: rule.name.clone(),
            device: slot.device.clone(),
            severity: *severity,
            state,
            value,
            ts_ms: now,
            message: message.clone(),
        });
    }
    let on_clear = state == AlertState::Cleared;
    for c in rule.commands.iter().filter(|c| c.on_clear == on_clear) {
        out.commands.push(CommandAction {
            rule: rule.name.clone(),
            device: c.target.clone().unwrap_or_else(|| slot.device.clone()),
            name: c.name.clone(),
            args: c.args.clone(),
            ts_ms: now,
        });
    }
}
