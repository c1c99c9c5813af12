//! edgestream-agent: the gateway daemon. See ARCHITECTURE.md for the data path, every channel
//! and every guarantee with the test that proves it.
//!
//! The folders follow a reading: [`source`] -> [`rules_stage`] -> [`outbox`] -> [`uplink`],
//! with [`commands`] beside them and [`telemetry`] watching all of them. [`pipeline`] is the
//! one place that wires them; [`config`] composes the sections the stages define.

pub mod backoff;
pub mod commands;
pub mod config;
pub mod deadletter;
pub mod durable_file;
pub mod logging;
pub mod mqtt_link;
pub mod outbox;
pub mod pipeline;
pub mod rules_stage;
pub mod sdnotify;
pub mod select_loop;
pub mod source;
pub mod telemetry;
pub mod uplink;
pub mod validation;
