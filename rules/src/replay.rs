//! Deterministic replay of recorded readings, for `edgestream rules test`.

use std::fmt;
use std::sync::Arc;

use crate::engine::{Engine, Reading};
use crate::output::{
    AggregateEvent, AlertEvent, AlertState, ArgValue, CommandAction, Disposition, Output,
};
use crate::plan::Plan;

/// A reading that owns its strings (one line of a readings.jsonl file).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedReading {
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub ts_ms: u64,
}

/// Something the engine decided during a replay.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayEvent {
    Alert(AlertEvent),
    Command(CommandAction),
    Aggregate(AggregateEvent),
    /// Reading number `index` (0-based, in input order) was not forwarded.
    Dropped {
        index: usize,
        device: String,
        metric: String,
        ts_ms: u64,
    },
    /// Reading number `index` was forwarded with these tags.
    Tagged {
        index: usize,
        device: String,
        metric: String,
        ts_ms: u64,
        tags: Vec<(Arc<str>, Arc<str>)>,
    },
}

/// Period of the ticks replay simulates between readings, as a live agent would tick.
pub(crate) const REPLAY_TICK_MS: u64 = 1_000;
/// Most simulated ticks in one gap between readings, so that a timestamp far in the future
/// cannot make a replay run for ever; past it, time jumps straight to the next reading.
pub(crate) const MAX_REPLAY_TICKS_PER_GAP: u64 = 100_000;

/// Runs `readings`, in the order given, through a fresh engine for `plan` and returns every
/// event. Between readings, time advances in ticks at every whole second of the readings'
/// clock and at each new reading timestamp, so time-driven detectors (`missing`, durations,
/// downsampling) fire as they would live with a one-second tick; a gap of more than 100,000
/// seconds jumps straight to the next reading after that many ticks. Pure and
/// deterministic: the same plan and readings always give the same events in the same order.
pub fn replay(plan: Plan, readings: impl IntoIterator<Item = OwnedReading>) -> Vec<ReplayEvent> {
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let mut events = Vec::new();
    let mut clock: Option<u64> = None;
    for (index, r) in readings.into_iter().enumerate() {
        if let Some(c) = clock {
            let mut t = (c / REPLAY_TICK_MS + 1).saturating_mul(REPLAY_TICK_MS);
            let mut n = 0;
            while t < r.ts_ms && n < MAX_REPLAY_TICKS_PER_GAP {
                engine.on_tick(t, &mut out);
                collect(&out, &mut events);
                t = t.saturating_add(REPLAY_TICK_MS);
                n += 1;
            }
        }
        if clock.is_none_or(|c| r.ts_ms > c) {
            clock = Some(r.ts_ms);
            engine.on_tick(r.ts_ms, &mut out);
            collect(&out, &mut events);
        }
        engine.on_reading(
            &Reading {
                device: &r.device,
                metric: &r.metric,
                value: r.value,
                ts_ms: r.ts_ms,
            },
            &mut out,
        );
        collect(&out, &mut events);
        if out.disposition == Disposition::Drop {
            events.push(ReplayEvent::Dropped {
                index,
                device: r.device,
                metric: r.metric,
                ts_ms: r.ts_ms,
            });
        } else if !out.tags.is_empty() {
            events.push(ReplayEvent::Tagged {
                index,
                device: r.device,
                metric: r.metric,
                ts_ms: r.ts_ms,
                tags: out.tags.clone(),
            });
        }
    }
    events
}

fn collect(out: &Output, events: &mut Vec<ReplayEvent>) {
    events.extend(out.alerts.iter().cloned().map(ReplayEvent::Alert));
    events.extend(out.commands.iter().cloned().map(ReplayEvent::Command));
    events.extend(out.aggregates.iter().cloned().map(ReplayEvent::Aggregate));
}

/// A JSON string literal.
struct J<'a>(&'a str);

impl fmt::Display for J<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// A JSON number (`null` for NaN and infinities, which JSON cannot carry).
struct N(f64);

impl fmt::Display for N {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_finite() {
            write!(f, "{}", self.0)
        } else {
            f.write_str("null")
        }
    }
}

/// One JSON object per event, on one line, fields in a fixed order.
impl fmt::Display for ReplayEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayEvent::Alert(a) => write!(
                f,
                r#"{{"event":"alert","ts":{},"rule":{},"device":{},"severity":"{}","state":"{}","value":{},"message":{}}}"#,
                a.ts_ms,
                J(&a.rule),
                J(&a.device),
                a.severity.as_str(),
                if a.state == AlertState::Raised {
                    "raised"
                } else {
                    "cleared"
                },
                N(a.value),
                J(&a.message)
            ),
            ReplayEvent::Command(c) => {
                write!(
                    f,
                    r#"{{"event":"command","ts":{},"rule":{},"device":{},"name":{},"args":{{"#,
                    c.ts_ms,
                    J(&c.rule),
                    J(&c.device),
                    J(&c.name)
                )?;
                for (i, (k, v)) in c.args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match v {
                        ArgValue::Number(n) => write!(f, "{}:{}", J(k), N(*n))?,
                        ArgValue::Bool(b) => write!(f, "{}:{b}", J(k))?,
                        ArgValue::Text(t) => write!(f, "{}:{}", J(k), J(t))?,
                    }
                }
                f.write_str("}}")
            }
            ReplayEvent::Aggregate(g) => write!(
                f,
                r#"{{"event":"aggregate","ts":{},"rule":{},"device":{},"metric":{},"start":{},"end":{},"count":{},"avg":{},"min":{},"max":{},"sum":{},"last":{}}}"#,
                g.end_ms,
                J(&g.rule),
                J(&g.device),
                J(&g.metric),
                g.start_ms,
                g.end_ms,
                g.count,
                N(g.avg),
                N(g.min),
                N(g.max),
                N(g.sum),
                N(g.last)
            ),
            ReplayEvent::Dropped {
                index,
                device,
                metric,
                ts_ms,
            } => write!(
                f,
                r#"{{"event":"dropped","ts":{ts_ms},"index":{index},"device":{},"metric":{}}}"#,
                J(device),
                J(metric)
            ),
            ReplayEvent::Tagged {
                index,
                device,
                metric,
                ts_ms,
                tags,
            } => {
                write!(
                    f,
                    r#"{{"event":"tagged","ts":{ts_ms},"index":{index},"device":{},"metric":{},"tags":{{"#,
                    J(device),
                    J(metric)
                )?;
                for (i, (k, v)) in tags.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{}", J(k), J(v))?;
                }
                f.write_str("}}")
            }
        }
    }
}
