//! Simulated devices: MQTT sensors/actuators and serial sensors on real
//! pseudo-terminals.

pub mod mqtt;
pub mod serial;
