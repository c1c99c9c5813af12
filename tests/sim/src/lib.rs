//! edgestream-sim: edgestream's tools crate. Simulated devices, brokers and
//! network faults, and the `demo`, `bench` and `simulate` commands built on them.
//!
//! The `edgestream` binary runs the commands ([`ToolCommand`], [`run_tool`])
//! with its `tools` feature; the system tests use the rest. This crate never
//! links the agent: the demo and the bench run it as a child process
//! ([`agent::AgentChild`]). Everything is real where it can be: real brokers
//! ([`broker::Mosquitto`] spawns the mosquitto binary, [`broker::InProcessBroker`]
//! runs rumqttd in-process), real TCP through [`proxy::FaultProxy`], real
//! pseudo-terminals for serial devices. Everything binds 127.0.0.1 and
//! ports chosen by the operating system, so tests run in parallel.
//!
//! * [`broker`]: start/stop/restart brokers.
//! * [`proxy`]: cut, blackhole and restore a TCP path.
//! * [`signal`]: deterministic sensor signals with injected faults.
//! * [`devices`]: MQTT devices and fleets that record what the broker
//!   acknowledged, serial devices, and Modbus TCP slaves.
//! * [`collector`]: records what the gateway published to the cloud broker.
//! * [`simulate`](mod@simulate): run a simulated site (`edgestream simulate`, the demo).
//! * [`demo`], [`bench`]: `edgestream demo` and `edgestream bench`.
//! * [`agent`]: the agent as a child process.
//! * [`procstat`]: a process's and the machine's figures from `/proc`.
//! * [`prometheus`]: scrape and read the agent's Prometheus endpoint.
//!
//! Shared topic contract: readings on `sensors/{device}/{metric}` as
//! `{"value":..,"ts":..,"seq":..}`; commands on `devices/{device}/commands`,
//! replies on `devices/{device}/replies`; cloud topics under
//! `{prefix}/{gateway}/`.

pub mod agent;
pub mod bench;
pub mod broker;
pub mod collector;
pub mod demo;
pub mod devices;
pub mod procstat;
pub mod prometheus;
pub mod proxy;
pub mod signal;
pub mod simulate;
mod tool;
mod wire;

pub use broker::{InProcessBroker, Mosquitto, MosquittoOptions};
pub use collector::{CloudCollector, CloudMessage};
pub use devices::modbus::{
    f32_word_swapped, registers_of, rtu_crc, ModbusFault, ModbusRtuSlave, ModbusTcpSlave,
    Table as ModbusTable,
};
pub use devices::mqtt::{
    CommandBehavior, DeviceStats, MetricSpec, MqttDevice, MqttDeviceConfig, MqttFleet,
    PayloadFormat, Rate, Reading,
};
pub use devices::serial::{LineFormat, SerialDevice, SerialDeviceConfig, SerialStats};
pub use proxy::{FaultProxy, ProxyMode, ProxyStats};
pub use signal::{Fault, FaultKind, Profile, Signal};
pub use simulate::{
    demo_fleet, demo_serial_probe, simulate, simulate_until, uniform_fleet, SimReport,
    SimulateOptions,
};
pub use tool::{init_logging, run_tool, SimulateArgs, ToolCommand};
