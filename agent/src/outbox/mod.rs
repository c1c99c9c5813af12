//! The durable outbox: every record bound for the cloud waits on disk until the cloud broker
//! has acknowledged it.
//!
//! - [`store`]: the [`store::OutboxStore`] contract and the segment-log [`store::Outbox`];
//! - [`log`]: the files on disk (segments of CRC-framed records, the acknowledgement file);
//! - [`fault`]: a failing disk (full, or erroring) as a state that is reported and ends by itself;
//! - [`record`]: what is stored, and the value forms of the sled store of earlier releases;
//! - [`legacy`]: reading that sled store, to migrate its backlog;
//! - [`verify`]: the offline check behind `edgestream outbox verify`;
//! - [`config`]: the `[outbox]` section (durability, byte cap, age limit, commit linger).

pub mod config;
pub mod fault;
pub mod legacy;
pub mod log;
pub mod record;
pub mod store;
pub mod verify;
