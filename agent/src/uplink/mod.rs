//! The cloud uplink: drains the outbox to the cloud broker and brings the cloud's messages
//! (commands, rule bundles) in.
//!
//! - [`link`]: the connection's mode machine; a record leaves the outbox only on its PUBACK;
//! - [`inbound`]: a message from the cloud and the token that acknowledges it;
//! - [`topics`]: the cloud topic scheme;
//! - [`wire`]: the JSON forms of outbox records as published;
//! - [`config`]: the `[cloud]` section.

pub mod config;
pub mod inbound;
pub mod link;
pub mod topics;
pub mod wire;
