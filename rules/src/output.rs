//! What the engine decides: the reusable [`Output`] buffer and the events in it.

use std::fmt;
use std::sync::Arc;

use edgestream_protocol::limits::{MAX_DEVICE_LEN, MAX_METRIC_LEN};

/// A device identifier, bounded like every device name the protocol accepts.
pub type DeviceName = heapless::String<MAX_DEVICE_LEN>;
/// A metric name, bounded like every metric name the protocol accepts.
pub type MetricName = heapless::String<MAX_METRIC_LEN>;

/// Whether the raw reading goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Disposition {
    /// Forward the reading (with [`Output::tags`]). The default.
    #[default]
    Forward,
    /// Do not forward it: a `drop` rule matched, or a `forward ... every` rule replaces raw
    /// readings of this metric with aggregates.
    Drop,
}

/// Alert severity, as written after `alert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    /// The keyword as written in rules (`info`, `warning`, `critical`).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// Which edge of an alert this event is. Alerts emit only on transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertState {
    Raised,
    Cleared,
}

/// An alert transition for one (rule, device).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub rule: Arc<str>,
    pub device: DeviceName,
    pub severity: Severity,
    pub state: AlertState,
    /// Latest value of the first metric the rule's `when` names (NaN if none yet).
    pub value: f64,
    /// Reading time (or tick time) at which the transition happened.
    pub ts_ms: u64,
    pub message: Arc<str>,
}

/// A command argument value.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Number(f64),
    Bool(bool),
    Text(Arc<str>),
}

/// A device command a rule issued (on raise, or on clear for `... on clear`).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAction {
    pub rule: Arc<str>,
    /// Target device: `to device "..."`, or else the device whose readings fired the rule.
    pub device: DeviceName,
    pub name: Arc<str>,
    pub args: Arc<[(Arc<str>, ArgValue)]>,
    pub ts_ms: u64,
}

/// Aggregate functions a `forward` rule asked for, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct AggFunctions(pub(crate) u8);

impl AggFunctions {
    pub const AVG: AggFunctions = AggFunctions(1);
    pub const MIN: AggFunctions = AggFunctions(2);
    pub const MAX: AggFunctions = AggFunctions(4);
    pub const SUM: AggFunctions = AggFunctions(8);
    pub const COUNT: AggFunctions = AggFunctions(16);
    pub const LAST: AggFunctions = AggFunctions(32);

    /// True if every function in `other` was asked for.
    pub fn contains(self, other: AggFunctions) -> bool {
        self.0 & other.0 == other.0
    }

    pub(crate) fn parse(s: &str) -> Option<AggFunctions> {
        Some(match s {
            "avg" => Self::AVG,
            "min" => Self::MIN,
            "max" => Self::MAX,
            "sum" => Self::SUM,
            "count" => Self::COUNT,
            "last" => Self::LAST,
            _ => return None,
        })
    }
}

/// One closed downsampling window `[start_ms, end_ms)` of one (device, metric). Every field is
/// computed; `functions` says which ones the rule asked to forward.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateEvent {
    pub rule: Arc<str>,
    pub device: DeviceName,
    pub metric: MetricName,
    pub start_ms: u64,
    pub end_ms: u64,
    pub count: u32,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
    pub functions: AggFunctions,
}

/// Reusable result buffers for one reading or one tick. [`Engine`](crate::Engine) clears
/// them first; keep one `Output` alive and pass it every time so that, once its vectors
/// have grown to the bundle's needs, nothing is allocated.
#[derive(Debug, Default)]
pub struct Output {
    /// Forward or drop the raw reading. Always `Forward` after a tick.
    pub disposition: Disposition,
    /// Tags to attach to the forwarded reading, in rule order.
    pub tags: Vec<(Arc<str>, Arc<str>)>,
    pub alerts: Vec<AlertEvent>,
    pub commands: Vec<CommandAction>,
    pub aggregates: Vec<AggregateEvent>,
}

impl Output {
    /// Empties every buffer, keeping their capacity.
    pub fn clear(&mut self) {
        self.disposition = Disposition::Forward;
        self.tags.clear();
        self.alerts.clear();
        self.commands.clear();
        self.aggregates.clear();
    }

    /// True if there is nothing but the default disposition.
    pub fn is_empty(&self) -> bool {
        self.disposition == Disposition::Forward
            && self.tags.is_empty()
            && self.alerts.is_empty()
            && self.commands.is_empty()
            && self.aggregates.is_empty()
    }
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgValue::Number(n) => write!(f, "{n}"),
            ArgValue::Bool(b) => write!(f, "{b}"),
            ArgValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}
