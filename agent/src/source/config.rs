//! The `[local]` section (the sensors' broker) and the `[[serial]]` tables (one per port).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validation::{bad, valid_name, Problem};

/// The local broker the sensors publish to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_local_port")]
    pub port: u16,
    /// Fixed so that the broker keeps our persistent session across restarts.
    /// Default: `edgestream-local-{gateway.id}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Subscriptions; every topic must read as `.../{device}/{metric}` (last two levels).
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// 1 (default): a reading is acknowledged to the broker only once it is in the outbox.
    /// 0: fire and forget, for sensors whose data is not worth a round trip.
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_local_port() -> u16 {
    1883
}

fn default_topics() -> Vec<String> {
    vec!["sensors/+/+".into()]
}

fn default_qos() -> u8 {
    1
}

fn default_keep_alive_secs() -> u64 {
    30
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_local_port(),
            client_id: None,
            topics: default_topics(),
            qos: default_qos(),
            keep_alive_secs: default_keep_alive_secs(),
            username: None,
            password: None,
        }
    }
}

impl LocalConfig {
    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
        if self.host.is_empty() {
            bad(p, "local.host", "must not be empty");
        }
        if self.port == 0 {
            bad(p, "local.port", "must be between 1 and 65535");
        }
        if self.topics.is_empty() {
            bad(p, "local.topics", "needs at least one topic filter");
        }
        for (i, t) in self.topics.iter().enumerate() {
            if let Err(why) = check_topic_filter(t) {
                bad(p, &format!("local.topics[{i}]"), format!("{t:?}: {why}"));
            }
        }
        if self.qos > 1 {
            bad(
                p,
                "local.qos",
                format!("{} is not supported; use 0 or 1", self.qos),
            );
        }
        if self.keep_alive_secs < 5 || self.keep_alive_secs > 3600 {
            bad(p, "local.keep_alive_secs", "must be between 5 and 3600");
        }
    }
}

/// Checks an MQTT subscription filter used for readings.
fn check_topic_filter(t: &str) -> Result<(), &'static str> {
    if t.is_empty() {
        return Err("is empty");
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err("'#' must be a whole level and the last one");
        }
        if l.contains('+') && *l != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

/// Most serial ports one agent reads (each has its own OS thread).
pub const MAX_SERIAL_PORTS: usize = 32;

/// How bytes on a serial port are cut into readings (protocol/README.md, sections 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialFraming {
    /// edgestream-protocol COBS + CRC frames; each frame names its device and metric.
    Binary,
    /// One JSON object per line: `{"temperature":23.5,"ts":1700000000123}`.
    Json,
    /// `temperature=23.5 humidity=41` lines.
    KeyValue,
    /// CSV lines read through `columns` (and `delimiter`).
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialParity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialFlowControl {
    None,
    Software,
    Hardware,
}

/// One serial port (`[[serial]]`): where it is, how it is set up, how its bytes are framed and
/// which device its text lines speak for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The port, preferably a stable `/dev/serial/by-id/...` link: it is reopened by this path
    /// after every unplug, and ttyUSB numbers change when adapters come back in another order.
    pub path: PathBuf,
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    /// 5 to 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_parity")]
    pub parity: SerialParity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default = "default_flow_control")]
    pub flow_control: SerialFlowControl,
    pub framing: SerialFraming,
    /// Text framings: the device a line speaks for when it has no `device` key or column.
    /// Not allowed with binary framing (frames name their device).
    #[serde(default)]
    pub device: Option<String>,
    /// Devices reached through this port for commands, besides those learned from its
    /// readings (a device that only listens must be listed).
    #[serde(default)]
    pub devices: Vec<String>,
    /// CSV only: what each column holds (`ts`, `device`, `seq`, `quality`, `_` to skip, any
    /// other name is a metric).
    #[serde(default)]
    pub columns: Vec<String>,
    /// CSV only: one of `,` `;` `|` tab or space.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// First and longest wait before reopening a port that failed or was unplugged (jittered,
    /// doubling).
    #[serde(default = "default_serial_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_serial_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_baud_rate() -> u32 {
    115_200
}

fn default_data_bits() -> u8 {
    8
}

fn default_parity() -> SerialParity {
    SerialParity::None
}

fn default_stop_bits() -> u8 {
    1
}

fn default_flow_control() -> SerialFlowControl {
    SerialFlowControl::None
}

fn default_delimiter() -> String {
    ",".into()
}

fn default_serial_reconnect_min_ms() -> u64 {
    100
}

fn default_serial_reconnect_max_ms() -> u64 {
    5_000
}

impl SerialConfig {
    /// A port at the defaults (115200 8N1, no flow control) with this framing.
    pub fn new(path: impl Into<PathBuf>, framing: SerialFraming) -> Self {
        Self {
            path: path.into(),
            baud_rate: default_baud_rate(),
            data_bits: default_data_bits(),
            parity: default_parity(),
            stop_bits: default_stop_bits(),
            flow_control: default_flow_control(),
            framing,
            device: None,
            devices: Vec::new(),
            columns: Vec::new(),
            delimiter: default_delimiter(),
            reconnect_min_ms: default_serial_reconnect_min_ms(),
            reconnect_max_ms: default_serial_reconnect_max_ms(),
        }
    }

    /// The CSV delimiter as a char, if it is exactly one.
    pub fn delimiter_char(&self) -> Option<char> {
        let mut chars = self.delimiter.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Some(c),
            _ => None,
        }
    }

    /// The CSV column map (`Err` explains why it is refused).
    pub fn csv_map(&self) -> Result<edgestream_protocol::text::CsvMap, String> {
        let delimiter = self
            .delimiter_char()
            .ok_or_else(|| format!("delimiter {:?} must be one character", self.delimiter))?;
        edgestream_protocol::text::CsvMap::new(self.columns.iter().map(String::as_str), delimiter)
            .map_err(|e| e.to_string())
    }

    pub(crate) fn validate(&self, i: usize, p: &mut Vec<Problem>) {
        let at = |field: &str| format!("serial[{i}].{field}");
        if self.path.as_os_str().is_empty() {
            bad(p, &at("path"), "must not be empty");
        }
        if !(50..=4_000_000).contains(&self.baud_rate) {
            bad(p, &at("baud_rate"), "must be between 50 and 4000000");
        }
        if !(5..=8).contains(&self.data_bits) {
            bad(p, &at("data_bits"), "must be 5, 6, 7 or 8");
        }
        if !(1..=2).contains(&self.stop_bits) {
            bad(p, &at("stop_bits"), "must be 1 or 2");
        }
        match (&self.device, self.framing) {
            (Some(_), SerialFraming::Binary) => bad(
                p,
                &at("device"),
                "binary frames name their own device; remove `device`",
            ),
            (Some(d), _) => {
                if !valid_name(d, edgestream_protocol::limits::MAX_DEVICE_LEN) {
                    bad(
                        p,
                        &at("device"),
                        format!(
                            "{d:?} must be 1 to {} printable ASCII characters without spaces, '/', '+' or '#'",
                            edgestream_protocol::limits::MAX_DEVICE_LEN
                        ),
                    );
                }
            }
            (None, _) => {}
        }
        for (j, d) in self.devices.iter().enumerate() {
            if !valid_name(d, edgestream_protocol::limits::MAX_DEVICE_LEN) {
                bad(
                    p,
                    &at(&format!("devices[{j}]")),
                    format!("{d:?} is not a valid device name"),
                );
            }
        }
        if self.framing == SerialFraming::Csv {
            if self.columns.is_empty() {
                bad(p, &at("columns"), "CSV framing needs a column map");
            } else if let Err(why) = self.csv_map() {
                bad(p, &at("columns"), why);
            }
        } else {
            if !self.columns.is_empty() {
                bad(p, &at("columns"), "only used with framing = \"csv\"");
            }
            if self.delimiter != default_delimiter() {
                bad(p, &at("delimiter"), "only used with framing = \"csv\"");
            }
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
    }
}

/// Checks every port, and that no two share a path (each port is opened exclusively).
pub(crate) fn validate_serial(ports: &[SerialConfig], p: &mut Vec<Problem>) {
    if ports.len() > MAX_SERIAL_PORTS {
        bad(p, "serial", format!("at most {MAX_SERIAL_PORTS} ports"));
    }
    for (i, port) in ports.iter().enumerate() {
        port.validate(i, p);
        if let Some(j) = ports[..i].iter().position(|o| o.path == port.path) {
            bad(
                p,
                &format!("serial[{i}].path"),
                format!("{} is already serial[{j}]", port.path.display()),
            );
        }
    }
}
