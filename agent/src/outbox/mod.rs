//! The durable outbox: every record bound for the cloud waits on disk until the cloud broker
//! has acknowledged it.
//!
//! - [`store`]: the [`store::OutboxStore`] contract and its sled implementation;
//! - [`record`]: what is stored and its checksummed on-disk form;
//! - [`config`]: the `[outbox]` section (durability, byte cap, age limit, commit linger).

pub mod config;
pub mod record;
pub mod store;
