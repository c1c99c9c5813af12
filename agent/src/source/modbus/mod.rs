//! Modbus sources (`[[modbus]]`): slaves polled over Modbus TCP or RTU, their registers decoded into
//! readings that enter the rules stage like every other source's.
//!
//! - [`config`]: the `[[modbus]]` tables, their slaves and register maps, and their checks;
//! - [`plan`]: which reads poll a bus (adjacent values of one slave, table and interval in one
//!   request, within the protocol's limits);
//! - [`decode`]: registers to values (every type, byte and word order, scale and offset);
//! - [`writes`]: the write mappings checked against the allow-list;
//! - [`poller`]: the task that polls one bus;
//! - [`rtu`]: the RTU line: the inter-frame silence tokio-modbus does not keep, CRC checks.

pub mod config;
pub mod decode;
pub mod plan;
pub mod poller;
pub mod rtu;
pub mod writes;
