//! Sources: where readings enter the agent.
//!
//! - [`mqtt`]: the local MQTT broker (`sensors/{device}/{metric}`), persistent session, a
//!   PUBACK only once the reading's result is in the outbox;
//! - [`serial`]: serial ports (binary frames or text lines), one OS thread per port;
//! - [`modbus`]: Modbus TCP slaves, polled on their registers' intervals;
//! - [`reading`]: what every source hands to the rules stage ([`reading::SourceMsg`]);
//! - [`config`]: the `[local]` and `[[serial]]` sections.

pub mod config;
pub mod modbus;
pub mod mqtt;
pub mod reading;
pub mod serial;
