//! edgestream-agent: the gateway daemon. See ARCHITECTURE.md for the data path, every channel
//! and every guarantee with the test that proves it.
//!
//! The folders follow a reading: [`source`] -> [`rules_stage`] -> [`outbox`] -> [`uplink`],
//! with [`commands`] beside them and [`telemetry`] watching all of them. [`pipeline`] is the
//! one place that wires them; [`config`] composes the sections the stages define.

mod backoff;
mod commands;
pub mod config;
mod conn_log;
mod deadletter;
mod durable_file;
pub mod logging;
mod mqtt_link;
// Public for `agent/benches/outbox.rs` and the outbox's system tests, which drive the store
// and check its on-disk format directly.
pub mod outbox;
pub mod pipeline;
mod rules_stage;
mod sdnotify;
mod select_loop;
mod source;
mod telemetry;
mod uplink;
mod validation;

/// `edgestream rules check|test`.
pub use rules_stage::cli as rules_cli;
pub use telemetry::metrics::Metrics;
