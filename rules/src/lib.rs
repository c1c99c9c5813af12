//! edgestream-rules: the rule language of edgestream, its compiler and its engine.
//!
//! Operators write rules as text (grammar and functions: the crate's README.md);
//! [`compile()`] turns a bundle into a validated [`Plan`] or returns every mistake with its
//! line and column; an [`Engine`] runs a plan on each [`Reading`], writing its decisions
//! (forward or drop, tags, alerts, device commands, downsampled aggregates) into a reusable
//! [`Output`].
//!
//! ```
//! use edgestream_rules::{compile, Engine, Output, Reading, AlertState};
//!
//! let plan = compile(r#"
//! rule overheat
//!   on device "boiler-*"
//!   when temperature > 80 for 30s
//!   clear when temperature < 75
//!   alert critical "boiler overheating"
//! "#).unwrap();
//! let mut engine = Engine::new(plan);
//! let mut out = Output::default();
//! for (ts, t) in [(0, 85.0), (10_000, 86.0), (30_000, 84.0)] {
//!     engine.on_reading(&Reading { device: "boiler-1", metric: "temperature", value: t, ts_ms: ts }, &mut out);
//! }
//! assert_eq!(out.alerts.len(), 1);
//! assert_eq!(out.alerts[0].state, AlertState::Raised);
//! ```
//!
//! Guarantees: no I/O and no clock (time comes from readings and ticks, so replay is
//! deterministic); bounded memory computed at compile time ([`Plan::state_bytes`]); no heap
//! allocation per reading once the engine is warm; no panics on any rule text.

mod batch;
mod compile;
mod detector;
mod engine;
mod error;
mod glob;
mod lexer;
mod limits;
mod output;
mod parser;
mod plan;
mod prefetch;
#[cfg(test)]
mod proptests;
mod replay;
mod window;

pub use batch::{drain_prefetching, PREFETCH_AHEAD};
pub use compile::{compile, compile_with};
pub use engine::{Engine, EngineStats, Reading};
pub use error::{CompileError, CompileErrors};
pub use glob::glob_match;
pub use limits::{Limits, MAX_CACHED_METRICS_PER_DEVICE};
pub use output::{
    AggFunctions, AggregateEvent, AlertEvent, AlertState, ArgValue, CommandAction, DeviceName,
    Disposition, MetricName, Output, Severity,
};
pub use plan::Plan;
pub use replay::{replay, OwnedReading, ReplayEvent};
