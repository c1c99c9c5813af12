//! edgestream-agent: the gateway daemon. See ARCHITECTURE.md for the data path, every channel
//! and every guarantee with the test that proves it.

pub mod backoff;
pub mod commands;
pub mod config;
pub mod deadletter;
pub mod durable_file;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod mqtt_link;
pub mod outbox;
pub mod pipeline;
pub mod processor;
pub mod prometheus;
pub mod record;
pub mod remote_rules;
pub mod rules_cli;
pub mod sdnotify;
pub mod select_loop;
pub mod source;
pub mod topics;
pub mod uplink;
pub mod wire;
