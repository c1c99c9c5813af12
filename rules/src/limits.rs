//! Every size the rule compiler and engine accept, in one place.
//!
//! Two kinds of bound live here. Constants (`MAX_*`) are fixed, by the language itself (the
//! evaluation stack, the parser's recursion depth) or by the wire format (everything a rule
//! emits must fit a message), and cannot be raised without changing the code that relies
//! on them. [`Limits`] are policy: the defaults suit a Raspberry Pi-class
//! gateway and an operator may tighten or loosen them when compiling a bundle.

/// Deepest nesting of an expression (parentheses, operators, calls). Bounds the parser's
/// recursion and the evaluation stack, so hostile input cannot overflow either.
pub(crate) const MAX_EXPR_DEPTH: usize = 32;
/// Most operations in one compiled expression. The evaluation stack never exceeds this.
pub(crate) const MAX_EXPR_OPS: usize = 256;
// What a rule emits (rule name, alert message, tags, command name and arguments) is bounded
// by the wire format's own limits, so that it always fits a message.
pub(crate) use edgestream_protocol::limits::{
    MAX_ALERT_MESSAGE_LEN, MAX_ARG_KEY_LEN, MAX_ARG_STR_LEN, MAX_COMMAND_ARGS,
    MAX_COMMAND_NAME_LEN, MAX_RULE_NAME_LEN, MAX_TAGS, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN,
};
/// Longest string literal (alert messages, tag values, command arguments), in bytes.
pub(crate) const MAX_STRING_LEN: usize = 256;
/// Most `command` actions in one rule.
pub(crate) const MAX_COMMANDS_PER_RULE: usize = 8;
/// Most distinct metrics one rule may name.
pub(crate) const MAX_METRICS_PER_RULE: usize = 16;
/// Most detector calls (window functions, anomaly detectors) in one rule.
pub(crate) const MAX_DETECTORS_PER_RULE: usize = 16;
/// Distinct metric names the engine caches routing for, per device. Readings of further
/// metrics are still evaluated correctly, on a slower uncached path.
pub const MAX_CACHED_METRICS_PER_DEVICE: usize = 64;
/// Ceiling for a rule's own `max_devices` clause.
pub(crate) const MAX_DEVICES_PER_RULE_CEILING: usize = 65_536;

/// Policy limits for one compiled bundle, checked at compile time and carried by the
/// [`Plan`](crate::Plan) into the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most rules in one bundle. Default 256.
    pub max_rules: usize,
    /// Worst-case bytes of per-device engine state for the whole bundle: every rule's
    /// per-device state times its device limit. Default 16 MiB.
    pub max_state_bytes: usize,
    /// Largest bundle source text, in bytes. Default 256 KiB.
    pub max_source_bytes: usize,
    /// Largest window counted in samples (`avg(x, 100 samples)`, `zscore(x, 256)`).
    /// Default 4096.
    pub max_window_samples: usize,
    /// Longest window or duration in time (`avg(x, 5m)`, `for 30s`, `every 1m`,
    /// `missing(x, 2m)`). Default one day.
    pub max_window_ms: u64,
    /// Samples a time window keeps at most. A time window is a ring buffer too: if readings
    /// arrive faster than this many per window span, the oldest leave early (counted in
    /// [`EngineStats::window_early_evictions`](crate::EngineStats)). Default 512.
    pub time_window_samples: usize,
    /// Devices one rule tracks when it does not say `max_devices N`. Default 256.
    pub default_max_devices: usize,
    /// Distinct devices the engine tracks at all. Readings of further devices are
    /// forwarded untouched and counted. Default 4096.
    pub max_engine_devices: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rules: 256,
            max_state_bytes: 16 * 1024 * 1024,
            max_source_bytes: 256 * 1024,
            max_window_samples: 4096,
            max_window_ms: 24 * 60 * 60 * 1000,
            time_window_samples: 512,
            default_max_devices: 256,
            max_engine_devices: 4096,
        }
    }
}
