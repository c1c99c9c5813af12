//! Simulated devices: MQTT sensors/actuators, serial sensors on real
//! pseudo-terminals, and Modbus TCP slaves on real sockets.

pub mod modbus;
pub mod mqtt;
pub mod serial;
