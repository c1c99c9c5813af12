//! The `[[modbus]]` tables: one per bus (a Modbus TCP connection or an RTU serial line), each with its slaves
//! (`[[modbus.slaves]]`: unit id and device name) and each slave's register map
//! (`[[modbus.slaves.registers]]`: metric, function, address, type, byte and word order,
//! scale, offset, poll interval).
//!
//! Addresses are the protocol's, counted from 0 in each of the four tables: the register a
//! datasheet calls 40001 is `function = "holding"`, `address = 0`; 30001 is `"input"`, 0.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::source::config::SerialParity;
use crate::validation::{bad, valid_name, Problem};

/// Most `[[modbus]]` tables (each is one task and one connection).
pub const MAX_MODBUS_BUSES: usize = 32;
/// Most slaves on one bus (RTU addresses 1 to 247 fit).
pub const MAX_SLAVES_PER_BUS: usize = 247;
/// Most registers in one slave's map.
pub const MAX_REGISTERS_PER_SLAVE: usize = 1024;
/// The protocol's limit on registers in one read (holding and input: 125, function 3 and 4).
pub const MAX_READ_REGISTERS: u16 = 125;
/// The protocol's limit on bits in one read (coils and discrete inputs: 2000, function 1 and 2).
pub const MAX_READ_BITS: u16 = 2000;
/// Shortest and longest poll interval.
pub const MIN_INTERVAL_MS: u64 = 10;
pub const MAX_INTERVAL_MS: u64 = 86_400_000;

/// How the bus is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModbusTransport {
    /// Modbus TCP (MBAP header) to `host`:`port`.
    Tcp,
    /// Modbus RTU (binary frames with a CRC, delimited by silence) on the serial port `path`.
    Rtu,
}

/// The four tables of a Modbus slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModbusFunction {
    /// Holding registers (read: function 3; write: 6 and 16).
    Holding,
    /// Input registers (read only: function 4).
    Input,
    /// Coils (read: function 1; write: 5 and 15).
    Coil,
    /// Discrete inputs (read only: function 2).
    DiscreteInput,
}

impl ModbusFunction {
    /// Coils and discrete inputs hold bits; holding and input registers hold 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, ModbusFunction::Coil | ModbusFunction::DiscreteInput)
    }

    /// Most items one read of this table may ask for.
    pub fn max_read(self) -> u16 {
        if self.is_bits() {
            MAX_READ_BITS
        } else {
            MAX_READ_REGISTERS
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModbusFunction::Holding => "holding",
            ModbusFunction::Input => "input",
            ModbusFunction::Coil => "coil",
            ModbusFunction::DiscreteInput => "discrete-input",
        }
    }
}

/// How the registers of one value are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    /// Beyond 2^53 a reading (an f64) keeps the nearest representable value.
    U64,
    I64,
    F32,
    F64,
    /// A coil or a discrete input: 1.0 or 0.0.
    Bool,
    /// One bit (`bit`, 0 = least significant) of a register: 1.0 or 0.0.
    Bit,
}

impl ValueType {
    /// Registers (or bits, for `bool`) the value spans.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 | ValueType::Bool | ValueType::Bit => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
        }
    }
}

/// Order of the bytes within a register, or of the registers within a value. `big`: the
/// protocol's own (most significant first); `little`: swapped. A 32-bit value 0xAABBCCDD
/// reads as registers `[AABB, CCDD]` big/big, `[CCDD, AABB]` with `word_order = "little"`
/// (word-swapped, "CDAB"), `[BBAA, DDCC]` with `byte_order = "little"` ("BADC").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    Big,
    Little,
}

/// One `[[modbus]]` table: a bus and the slaves polled over it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    pub transport: ModbusTransport,
    /// TCP: the slave's or the Modbus gateway's address.
    #[serde(default)]
    pub host: Option<String>,
    /// TCP: default 502.
    #[serde(default)]
    pub port: Option<u16>,
    /// RTU: the serial port (an RS-485 adapter), preferably a `/dev/serial/by-id/...` link:
    /// it is reopened by this path after an unplug.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// RTU: default 19200 (the spec's).
    #[serde(default)]
    pub baud_rate: Option<u32>,
    /// RTU: default `"even"` (the spec's).
    #[serde(default)]
    pub parity: Option<SerialParity>,
    /// RTU: 8 (the only size RTU frames have).
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// RTU: 1 or 2; default 1.
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// How long a slave may take to answer one request, unless the slave sets its own.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Further attempts after a request timed out or was answered with garbage (not after an
    /// exception: the slave did answer), unless the slave sets its own.
    #[serde(default = "default_retries")]
    pub retries: u8,
    /// Unread registers (or bits) allowed between two values of one read: reading a few
    /// unused registers is cheaper than another request. 0 (default): only adjacent ones.
    #[serde(default)]
    pub max_gap: u16,
    /// Polls in a row that fail before a slave is reported missing; while missing it is
    /// probed once per `reconnect_max_ms`, so it does not hold up the bus.
    #[serde(default = "default_missing_after")]
    pub missing_after: u32,
    /// First and longest wait before reconnecting (jittered, doubling).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    pub slaves: Vec<SlaveConfig>,
}

/// One slave (`[[modbus.slaves]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveConfig {
    /// The unit identifier (the slave address on an RTU line behind a TCP gateway).
    pub unit: u8,
    /// The device its readings speak for (`{device}/{metric}`).
    pub device: String,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<u8>,
    pub registers: Vec<RegisterConfig>,
    /// Device commands that write one of its registers or coils (`[[modbus.slaves.writes]]`).
    #[serde(default)]
    pub writes: Vec<WriteConfig>,
}

/// A device command that writes a value of the register map (`[[modbus.slaves.writes]]`):
/// the command `command`'s argument `arg`, as `(arg - offset) / scale` in the register's type,
/// byte and word order, to its holding registers (function 6 for one, 16 for more) or its
/// coil (function 5). The command must also be allowed by `[[commands.allow]]`, which checks
/// the argument's type and range before anything reaches the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteConfig {
    pub command: String,
    /// The argument that carries the value.
    #[serde(default = "default_write_arg")]
    pub arg: String,
    /// The `metric` of the register map entry written.
    pub metric: String,
}

fn default_write_arg() -> String {
    "value".into()
}

/// One value of a slave's register map (`[[modbus.slaves.registers]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    pub metric: String,
    pub function: ModbusFunction,
    /// The first register (or bit), from 0.
    pub address: u32,
    /// Default: `bool` for coils and discrete inputs, `u16` for registers.
    #[serde(default, rename = "type")]
    pub value_type: Option<ValueType>,
    /// `type = "bit"` only: which bit, 0 (least significant) to 15.
    #[serde(default)]
    pub bit: Option<u8>,
    #[serde(default = "default_order")]
    pub byte_order: Order,
    #[serde(default = "default_order")]
    pub word_order: Order,
    /// The reading is `raw * scale + offset`.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

impl RegisterConfig {
    pub fn value_type(&self) -> ValueType {
        self.value_type.unwrap_or(if self.function.is_bits() {
            ValueType::Bool
        } else {
            ValueType::U16
        })
    }

    /// Registers or bits spanned, `address .. address + width`.
    fn span(&self) -> (u32, u32) {
        (
            self.address,
            self.address + u32::from(self.value_type().width()),
        )
    }
}

fn default_timeout_ms() -> u64 {
    500
}

fn default_retries() -> u8 {
    1
}

fn default_missing_after() -> u32 {
    3
}

fn default_reconnect_min_ms() -> u64 {
    100
}

fn default_reconnect_max_ms() -> u64 {
    5_000
}

fn default_order() -> Order {
    Order::Big
}

fn default_scale() -> f64 {
    1.0
}

fn default_interval_ms() -> u64 {
    1_000
}

impl ModbusConfig {
    /// TCP: `host:port`.
    pub fn tcp_address(&self) -> String {
        format!(
            "{}:{}",
            self.host.as_deref().unwrap_or_default(),
            self.port.unwrap_or(502)
        )
    }

    /// The bus as logs and dead letters name it: `tcp host:port` or `rtu /dev/...`.
    pub fn endpoint(&self) -> String {
        match self.transport {
            ModbusTransport::Tcp => format!("tcp {}", self.tcp_address()),
            ModbusTransport::Rtu => format!(
                "rtu {}",
                self.path
                    .as_deref()
                    .unwrap_or_else(|| "".as_ref())
                    .display()
            ),
        }
    }

    pub fn rtu_baud_rate(&self) -> u32 {
        self.baud_rate.unwrap_or(19_200)
    }

    pub fn rtu_parity(&self) -> SerialParity {
        self.parity.unwrap_or(SerialParity::Even)
    }

    pub fn rtu_stop_bits(&self) -> u8 {
        self.stop_bits.unwrap_or(1)
    }

    pub fn slave_timeout_ms(&self, slave: &SlaveConfig) -> u64 {
        slave.timeout_ms.unwrap_or(self.timeout_ms)
    }

    pub fn slave_retries(&self, slave: &SlaveConfig) -> u8 {
        slave.retries.unwrap_or(self.retries)
    }

    pub(crate) fn validate(&self, i: usize, p: &mut Vec<Problem>) {
        let at = |field: &str| format!("modbus[{i}].{field}");
        match self.transport {
            ModbusTransport::Tcp => {
                match &self.host {
                    None => bad(p, &at("host"), "Modbus TCP needs a host"),
                    Some(h) if h.is_empty() => bad(p, &at("host"), "must not be empty"),
                    Some(_) => {}
                }
                if self.port == Some(0) {
                    bad(p, &at("port"), "must be between 1 and 65535");
                }
                let serial = [
                    ("path", self.path.is_some()),
                    ("baud_rate", self.baud_rate.is_some()),
                    ("parity", self.parity.is_some()),
                    ("data_bits", self.data_bits.is_some()),
                    ("stop_bits", self.stop_bits.is_some()),
                ];
                for (field, set) in serial {
                    if set {
                        bad(p, &at(field), "only used with transport = \"rtu\"");
                    }
                }
            }
            ModbusTransport::Rtu => {
                match &self.path {
                    None => bad(p, &at("path"), "Modbus RTU needs the serial port's path"),
                    Some(path) if path.as_os_str().is_empty() => {
                        bad(p, &at("path"), "must not be empty")
                    }
                    Some(_) => {}
                }
                for (field, set) in [("host", self.host.is_some()), ("port", self.port.is_some())] {
                    if set {
                        bad(p, &at(field), "only used with transport = \"tcp\"");
                    }
                }
                if !(300..=4_000_000).contains(&self.rtu_baud_rate()) {
                    bad(p, &at("baud_rate"), "must be between 300 and 4000000");
                }
                if self.data_bits.is_some_and(|d| d != 8) {
                    bad(
                        p,
                        &at("data_bits"),
                        "Modbus RTU characters have 8 data bits",
                    );
                }
                if !(1..=2).contains(&self.rtu_stop_bits()) {
                    bad(p, &at("stop_bits"), "must be 1 or 2");
                }
            }
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            bad(p, &at("timeout_ms"), "must be between 1 and 60000");
        }
        if self.retries > 10 {
            bad(p, &at("retries"), "must be at most 10");
        }
        if self.max_gap > MAX_READ_REGISTERS {
            bad(
                p,
                &at("max_gap"),
                format!("must be at most {MAX_READ_REGISTERS}"),
            );
        }
        if self.missing_after == 0 || self.missing_after > 1000 {
            bad(p, &at("missing_after"), "must be between 1 and 1000");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            bad(
                p,
                &at("reconnect_min_ms"),
                "must be at least 1 and at most reconnect_max_ms",
            );
        }
        if self.reconnect_max_ms > 600_000 {
            bad(p, &at("reconnect_max_ms"), "must be at most 600000");
        }
        if self.slaves.is_empty() {
            bad(p, &at("slaves"), "needs at least one slave");
        }
        if self.slaves.len() > MAX_SLAVES_PER_BUS {
            bad(
                p,
                &at("slaves"),
                format!("at most {MAX_SLAVES_PER_BUS} slaves per bus"),
            );
        }
        for (j, s) in self.slaves.iter().enumerate() {
            let at = |field: &str| format!("modbus[{i}].slaves[{j}].{field}");
            if self.transport == ModbusTransport::Rtu && !(1..=247).contains(&s.unit) {
                bad(
                    p,
                    &at("unit"),
                    "an RTU slave address is 1 to 247 (0 is broadcast, which no slave answers)",
                );
            }
            if let Some(k) = self.slaves[..j].iter().position(|o| o.unit == s.unit) {
                bad(
                    p,
                    &at("unit"),
                    format!("unit {} is already slaves[{k}] on this bus", s.unit),
                );
            }
            if !valid_name(&s.device, edgestream_protocol::limits::MAX_DEVICE_LEN) {
                bad(
                    p,
                    &at("device"),
                    format!("{:?} is not a valid device name", s.device),
                );
            }
            if let Some(t) = s.timeout_ms {
                if !(1..=60_000).contains(&t) {
                    bad(p, &at("timeout_ms"), "must be between 1 and 60000");
                }
            }
            if s.retries.is_some_and(|r| r > 10) {
                bad(p, &at("retries"), "must be at most 10");
            }
            if s.registers.is_empty() {
                bad(p, &at("registers"), "needs at least one register");
            }
            if s.registers.len() > MAX_REGISTERS_PER_SLAVE {
                bad(
                    p,
                    &at("registers"),
                    format!("at most {MAX_REGISTERS_PER_SLAVE} registers per slave"),
                );
            }
            for (k, r) in s.registers.iter().enumerate() {
                validate_register(
                    &s.registers[..k],
                    r,
                    &format!("{}[{k}]", at("registers")),
                    p,
                );
            }
            for (k, w) in s.writes.iter().enumerate() {
                validate_write(s, &s.writes[..k], w, &format!("{}[{k}]", at("writes")), p);
            }
        }
    }
}

/// A `[[modbus.slaves.writes]]` entry: a command name once per slave, mapped to a holding
/// register or coil of the slave's map (not an input register, a discrete input or one bit).
fn validate_write(
    slave: &SlaveConfig,
    before: &[WriteConfig],
    w: &WriteConfig,
    at: &str,
    p: &mut Vec<Problem>,
) {
    let field = |f: &str| format!("{at}.{f}");
    if !valid_name(
        &w.command,
        edgestream_protocol::limits::MAX_COMMAND_NAME_LEN,
    ) {
        bad(
            p,
            &field("command"),
            format!("{:?} is not a valid command name", w.command),
        );
    } else if let Some(o) = before.iter().position(|o| o.command == w.command) {
        bad(
            p,
            &field("command"),
            format!("{:?} is already writes[{o}] of this slave", w.command),
        );
    }
    if !valid_name(&w.arg, edgestream_protocol::limits::MAX_ARG_KEY_LEN) {
        bad(
            p,
            &field("arg"),
            format!("{:?} is not a valid argument name", w.arg),
        );
    }
    let Some(k) = slave.registers.iter().position(|r| r.metric == w.metric) else {
        bad(
            p,
            &field("metric"),
            format!("{:?} is not in this slave's registers", w.metric),
        );
        return;
    };
    let r = &slave.registers[k];
    if matches!(
        r.function,
        ModbusFunction::Input | ModbusFunction::DiscreteInput
    ) {
        bad(
            p,
            &field("metric"),
            format!(
                "{:?} (registers[{k}]) is a {} register: read only; only holding registers and coils can be written",
                w.metric,
                r.function.name()
            ),
        );
    } else if r.value_type() == ValueType::Bit {
        bad(
            p,
            &field("metric"),
            format!(
                "{:?} (registers[{k}]) is one bit of a register, which cannot be written alone; map the whole register",
                w.metric
            ),
        );
    }
}

fn validate_register(
    before: &[RegisterConfig],
    r: &RegisterConfig,
    at: &str,
    p: &mut Vec<Problem>,
) {
    let field = |f: &str| format!("{at}.{f}");
    if !valid_name(&r.metric, edgestream_protocol::limits::MAX_METRIC_LEN) {
        bad(
            p,
            &field("metric"),
            format!("{:?} is not a valid metric name", r.metric),
        );
    } else if let Some(k) = before.iter().position(|o| o.metric == r.metric) {
        bad(
            p,
            &field("metric"),
            format!("{:?} is already registers[{k}] of this slave", r.metric),
        );
    }
    let t = r.value_type();
    let type_ok = match (r.function.is_bits(), t) {
        (true, ValueType::Bool) => true,
        (true, _) => {
            bad(
                p,
                &field("type"),
                format!(
                    "a {} holds one bit: its type is \"bool\"",
                    r.function.name()
                ),
            );
            false
        }
        (false, ValueType::Bool) => {
            bad(
                p,
                &field("type"),
                "\"bool\" is for coils and discrete inputs; for one bit of a register use type = \"bit\" and `bit`",
            );
            false
        }
        (false, _) => true,
    };
    match (t, r.bit) {
        (ValueType::Bit, None) => bad(p, &field("bit"), "type \"bit\" needs `bit` (0 to 15)"),
        (ValueType::Bit, Some(b)) if b > 15 => bad(p, &field("bit"), "must be between 0 and 15"),
        (ValueType::Bit, Some(_)) => {}
        (_, Some(_)) => bad(p, &field("bit"), "only used with type = \"bit\""),
        (_, None) => {}
    }
    let (start, end) = r.span();
    if end > 65_536 {
        bad(
            p,
            &field("address"),
            format!(
                "{} spans {start}..{}, past the last address (65535)",
                r.address,
                end - 1
            ),
        );
    } else if type_ok {
        let overlapping = before.iter().position(|o| {
            let (s, e) = o.span();
            let same_table = o.function == r.function;
            let both_bits_apart = o.value_type() == ValueType::Bit
                && t == ValueType::Bit
                && o.address == r.address
                && o.bit != r.bit;
            same_table && s < end && start < e && !both_bits_apart
        });
        if let Some(k) = overlapping {
            let o = &before[k];
            bad(
                p,
                &field("address"),
                format!(
                    "{} {start}..{} overlaps registers[{k}] ({:?}, {}..{})",
                    r.function.name(),
                    end - 1,
                    o.metric,
                    o.span().0,
                    o.span().1 - 1
                ),
            );
        }
    }
    if !r.scale.is_finite() || r.scale == 0.0 {
        bad(p, &field("scale"), "must be a finite number other than 0");
    }
    if !r.offset.is_finite() {
        bad(p, &field("offset"), "must be a finite number");
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&r.interval_ms) {
        bad(
            p,
            &field("interval_ms"),
            format!("must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS}"),
        );
    }
}

/// Checks every bus, that no device is polled on two slaves (its readings would mix) and that
/// no serial port is two buses (each is opened exclusively).
pub(crate) fn validate_modbus(buses: &[ModbusConfig], p: &mut Vec<Problem>) {
    if buses.len() > MAX_MODBUS_BUSES {
        bad(p, "modbus", format!("at most {MAX_MODBUS_BUSES} buses"));
    }
    let mut devices: Vec<(&str, usize, usize)> = Vec::new();
    for (i, bus) in buses.iter().enumerate() {
        bus.validate(i, p);
        if let Some(path) = &bus.path {
            if let Some(j) = buses[..i]
                .iter()
                .position(|o| o.path.as_ref() == Some(path))
            {
                bad(
                    p,
                    &format!("modbus[{i}].path"),
                    format!("{} is already modbus[{j}]", path.display()),
                );
            }
        }
        for (j, s) in bus.slaves.iter().enumerate() {
            if let Some((_, bi, sj)) = devices.iter().find(|(d, _, _)| *d == s.device) {
                bad(
                    p,
                    &format!("modbus[{i}].slaves[{j}].device"),
                    format!("{:?} is already modbus[{bi}].slaves[{sj}]", s.device),
                );
            } else {
                devices.push((&s.device, i, j));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(text: &str) -> ModbusConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_per_slave_overrides() {
        let b = bus(
            "transport = \"rtu\"\npath = \"/dev/ttyUSB0\"\ntimeout_ms = 300\n\
             [[slaves]]\nunit = 1\ndevice = \"a\"\nregisters = []\n\
             [[slaves]]\nunit = 2\ndevice = \"b\"\ntimeout_ms = 900\nretries = 0\nregisters = []\n",
        );
        assert_eq!(
            (b.rtu_baud_rate(), b.rtu_parity(), b.rtu_stop_bits()),
            (19_200, SerialParity::Even, 1),
            "the spec's defaults"
        );
        assert_eq!(b.endpoint(), "rtu /dev/ttyUSB0");
        assert_eq!(
            (
                b.slave_timeout_ms(&b.slaves[0]),
                b.slave_retries(&b.slaves[0])
            ),
            (300, 1)
        );
        assert_eq!(
            (
                b.slave_timeout_ms(&b.slaves[1]),
                b.slave_retries(&b.slaves[1])
            ),
            (900, 0)
        );
        let t = bus("transport = \"tcp\"\nhost = \"10.0.0.5\"\nslaves = []\n");
        assert_eq!(t.endpoint(), "tcp 10.0.0.5:502");
    }
}
