//! Device commands: from the cloud and from local rules, checked against the allow-list,
//! persisted before `accepted`, routed to the device's transport, and tracked to one final
//! outcome that goes upstream through the outbox.
//!
//! - [`router`]: the task that owns every command's lifecycle;
//! - [`routes`]: which transport (a serial port or the local broker) reaches a device;
//! - [`store`]: the persisted table of unfinished and recently finished commands;
//! - [`config`]: the `[commands]` section.

pub mod config;
pub mod router;
pub mod routes;
pub mod store;
