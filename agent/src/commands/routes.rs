//! Which transport reaches a device: one of the ports (a serial port, or a Modbus bus), or
//! else the local MQTT broker.
//!
//! A device is on a serial port if that port's `[[serial]] devices` lists it, or if readings
//! from it arrived on that port (learned, at most [`MAX_LEARNED_DEVICES`]; the latest port
//! wins, so a sensor moved to another adapter follows). A device is on a Modbus bus if it is
//! one of the bus's `[[modbus.slaves]]`. Every other device is addressed on the local broker
//! (`devices/{device}/commands`). Ports are numbered serial ports first, then Modbus buses,
//! each in config order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use edgestream_protocol::types::{Command, CommandOutcome};
use tokio::sync::mpsc;

use crate::source::config::SerialConfig;
use crate::source::modbus::config::ModbusConfig;
use crate::source::reading::Ack;

/// What the device side tells the router.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A device's reply; `ack` acknowledges its MQTT publish once the outcome is stored.
    Reply {
        // Boxed: an outcome is about 300 bytes, the other variant a tenth of that.
        outcome: Box<CommandOutcome>,
        ack: Option<Ack>,
    },
    /// A port wrote a command (`error: None`) or could not.
    Written {
        id: String,
        port: usize,
        error: Option<String>,
    },
}

/// Devices remembered from serial readings; past it, a new device is addressed over MQTT
/// unless its port lists it.
pub const MAX_LEARNED_DEVICES: usize = 1024;
/// Commands waiting for one port's thread. Full-policy: the command stays queued at the
/// router and is offered again on its next turn.
pub const PORT_COMMAND_CAPACITY: usize = 8;

#[derive(Debug)]
struct Port {
    path: PathBuf,
    listed: Vec<String>,
    tx: std::sync::mpsc::SyncSender<Command>,
    open: AtomicBool,
}

/// The routing table, shared by the router (reads) and the ports (learn, open/close).
#[derive(Debug)]
pub struct DeviceRoutes {
    ports: Vec<Port>,
    learned: Mutex<HashMap<String, usize>>,
}

/// What a port (a serial port's thread, a Modbus bus's task) needs for commands: its queue,
/// where to report, the table.
#[derive(Debug)]
pub struct PortLink {
    pub index: usize,
    pub commands: std::sync::mpsc::Receiver<Command>,
    pub events: mpsc::Sender<DeviceEvent>,
    pub routes: Arc<DeviceRoutes>,
}

/// Where a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Serial(usize),
    Mqtt,
}

/// Why a hand-off to a port failed; the command stays queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    Closed,
    Busy,
}

impl DeviceRoutes {
    /// One link per configured port: `serial` in order, then `modbus` in order.
    pub fn new(
        serial: &[SerialConfig],
        modbus: &[ModbusConfig],
        events: &mpsc::Sender<DeviceEvent>,
    ) -> (Arc<DeviceRoutes>, Vec<PortLink>) {
        let mut ports = Vec::new();
        let mut receivers = Vec::new();
        let serial = serial.iter().map(|s| (s.path.clone(), s.devices.clone()));
        let modbus = modbus.iter().map(|b| {
            let devices = b.slaves.iter().map(|s| s.device.clone()).collect();
            (PathBuf::from(b.endpoint()), devices)
        });
        for (path, listed) in serial.chain(modbus) {
            let (tx, rx) = std::sync::mpsc::sync_channel(PORT_COMMAND_CAPACITY);
            ports.push(Port {
                path,
                listed,
                tx,
                open: AtomicBool::new(false),
            });
            receivers.push(rx);
        }
        let routes = Arc::new(DeviceRoutes {
            ports,
            learned: Mutex::new(HashMap::new()),
        });
        let links = receivers
            .into_iter()
            .enumerate()
            .map(|(index, commands)| PortLink {
                index,
                commands,
                events: events.clone(),
                routes: routes.clone(),
            })
            .collect();
        (routes, links)
    }

    pub fn route(&self, device: &str) -> Route {
        if let Some(i) = self
            .ports
            .iter()
            .position(|p| p.listed.iter().any(|d| d == device))
        {
            return Route::Serial(i);
        }
        match self.learned.lock() {
            Ok(m) => m.get(device).map_or(Route::Mqtt, |&i| Route::Serial(i)),
            Err(_) => Route::Mqtt,
        }
    }

    /// Called by a port's thread for each device it hears from (cheap when already known).
    pub fn learn(&self, device: &str, port: usize) {
        let Ok(mut m) = self.learned.lock() else {
            return;
        };
        if let Some(p) = m.get_mut(device) {
            *p = port;
        } else if m.len() < MAX_LEARNED_DEVICES {
            m.insert(device.to_string(), port);
        }
    }

    pub fn set_open(&self, port: usize, open: bool) {
        if let Some(p) = self.ports.get(port) {
            p.open.store(open, Ordering::Relaxed);
        }
    }

    pub fn is_open(&self, port: usize) -> bool {
        self.ports
            .get(port)
            .is_some_and(|p| p.open.load(Ordering::Relaxed))
    }

    pub fn path(&self, port: usize) -> String {
        self.ports
            .get(port)
            .map(|p| p.path.display().to_string())
            .unwrap_or_default()
    }

    /// Offers `cmd` to the port's thread without waiting.
    pub fn hand_off(&self, port: usize, cmd: Command) -> Result<(), HandOff> {
        let Some(p) = self.ports.get(port) else {
            return Err(HandOff::Closed);
        };
        if !p.open.load(Ordering::Relaxed) {
            return Err(HandOff::Closed);
        }
        p.tx.try_send(cmd).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => HandOff::Busy,
            std::sync::mpsc::TrySendError::Disconnected(_) => HandOff::Closed,
        })
    }
}
