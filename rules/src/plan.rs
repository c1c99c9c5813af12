//! The compiled plan: what [`compile`](crate::compile()) produces and an
//! [`Engine`](crate::Engine) runs.
//!
//! Every value here has been checked by the compiler (names, types, window sizes, per-rule
//! bounds, the bundle's state budget), so the engine evaluates a plan without checking it
//! again. The types other than [`Plan`] are the crate's own: a `Plan` is opaque to callers.

use std::sync::Arc;

use crate::limits::Limits;
use crate::output::{AggFunctions, ArgValue, DeviceName, MetricName, Severity};
use crate::parser::BinOp;

/// A compiled expression node. Booleans are `1.0`/`0.0`; an unknown value is NaN, which
/// the engine carries through three-valued logic (a comparison with it is unknown, `false
/// and unknown` is false), so that only a definite `1.0` makes a condition hold.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Const(f64),
    /// Latest value of the rule's n-th input metric.
    Latest(u8),
    /// Current output of the rule's n-th detector.
    Det(u8),
    /// Another aggregate over the n-th detector's window: `max(x, 100) - min(x, 100)` keeps
    /// one ring, not two.
    AggOf(u8, AggFn),
    Neg(Box<Node>),
    Not(Box<Node>),
    Abs(Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    /// `metric OP constant`, the shape of most thresholds, fused to skip two node visits.
    CmpLatest(BinOp, u8, f64),
}

/// A condition's result in the plan's encoding of booleans: `1.0` for true, `0.0` for false.
pub(crate) fn bool_f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Which statistic a window aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum AggFn {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    Stddev,
    /// Quantile in `[0, 1]` (median is 0.5).
    Quantile(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum DetKind {
    Agg(AggFn),
    ZScore,
    MadScore,
    EwmaDev { alpha: f64 },
    Ewma { alpha: f64 },
    Rate,
    Flatline { dur_ms: u64, tolerance: f64 },
    Missing { dur_ms: u64 },
}

/// Shape of a detector's ring buffer. `cap == 0` means the detector keeps no window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowSpec {
    pub cap: usize,
    /// Time span in ms for time windows; 0 for sample windows.
    pub horizon_ms: u64,
    /// Keeps a sorted copy for quantiles and MAD.
    pub sorted: bool,
    /// Keeps the samples' values (everything but `count` reads them).
    pub values: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DetSpec {
    pub kind: DetKind,
    pub input: u8,
    pub window: WindowSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CommandSpec {
    pub name: Arc<str>,
    pub args: Arc<[(Arc<str>, ArgValue)]>,
    pub target: Option<DeviceName>,
    pub on_clear: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ForwardSpec {
    pub functions: AggFunctions,
    pub input: u8,
    pub metric: MetricName,
    pub every_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RulePlan {
    pub name: Arc<str>,
    pub device: Box<str>,
    pub metric: Option<Box<str>>,
    pub inputs: Vec<Box<str>>,
    pub dets: Vec<DetSpec>,
    pub when: Option<Node>,
    pub for_ms: u64,
    pub clear: Option<Node>,
    pub clear_for_ms: u64,
    pub alert: Option<(Severity, Arc<str>)>,
    pub commands: Vec<CommandSpec>,
    pub tags: Vec<(Arc<str>, Arc<str>)>,
    pub drop: bool,
    pub forward: Option<ForwardSpec>,
    pub max_devices: usize,
    /// Worst-case bytes of state for one device of this rule.
    pub slot_bytes: usize,
    /// Hash of this rule's tokens: equal fingerprints mean an unchanged rule.
    pub fingerprint: u64,
    /// Evaluated on ticks too (durations, time windows, missing data, downsampling).
    pub needs_tick: bool,
}

#[derive(Debug)]
pub(crate) struct PlanInner {
    pub rules: Vec<RulePlan>,
    pub limits: Limits,
    pub hash: u64,
    pub state_bytes: usize,
}

/// A compiled, validated rule bundle. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) inner: Arc<PlanInner>,
}

impl Plan {
    /// Number of rules in the bundle.
    pub fn rule_count(&self) -> usize {
        self.inner.rules.len()
    }

    /// Names of the rules that can keep a reading from being forwarded as it came: `drop`,
    /// or `forward ... every`, which replaces a window's raw readings with aggregates.
    pub fn dropping_rules(&self) -> impl Iterator<Item = &str> {
        self.inner
            .rules
            .iter()
            .filter(|r| r.drop || r.forward.is_some())
            .map(|r| &*r.name)
    }

    /// Worst-case bytes of per-device state: for every rule, its per-device state times its
    /// device limit. Checked against [`Limits::max_state_bytes`] at compile time.
    pub fn state_bytes(&self) -> usize {
        self.inner.state_bytes
    }

    /// Stable 64-bit FNV-1a hash of the normalized source (tokens separated by one space;
    /// comments and layout do not count). The same text gives the same hash on every
    /// platform and version of this crate's format.
    pub fn hash(&self) -> u64 {
        self.inner.hash
    }

    /// The limits the bundle was compiled under (the engine enforces the run-time ones).
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Names of the rules, in bundle order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.inner.rules.iter().map(|r| &*r.name)
    }

    /// Worst-case state bytes of each rule (per-device bytes times device limit), in order.
    pub fn rule_state_bytes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.inner
            .rules
            .iter()
            .map(|r| (&*r.name, r.slot_bytes.saturating_mul(r.max_devices)))
    }
}
