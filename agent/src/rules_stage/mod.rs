//! The rules stage: every reading meets the running rule plan here, and what comes of it is
//! stored in the outbox before the reading is acknowledged.
//!
//! - [`stage`]: evaluation, group commit and acknowledgement after the flush;
//! - [`remote`]: rule bundles over MQTT (validated, versioned, persisted, applied atomically);
//! - [`cli`]: `edgestream rules check|test`;
//! - [`config`]: the `[rules]` section.

pub mod cli;
pub mod config;
pub mod remote;
pub mod stage;
