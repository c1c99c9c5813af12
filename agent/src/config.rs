//! Agent configuration: TOML with defaults, `deny_unknown_fields`, and validation that reports
//! every problem it finds with the path of the field it concerns.
//!
//! Loading happens in three passes so that one mistake does not hide the next:
//! 1. the document is parsed as TOML (a syntax error stops here, with its line and column);
//! 2. each top-level section is deserialised on its own, so an unknown field or a wrong type in
//!    `[cloud]` does not hide another in `[outbox]` (paths come from `serde_path_to_error`);
//! 3. [`Config::validate`] checks values and cross-field rules, again collecting every problem.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest number of readings the uplink packs into one telemetry publish (the protocol's
/// limit for a telemetry batch).
pub const MAX_BATCH_SIZE: usize = edgestream_protocol::limits::MAX_TELEMETRY_BATCH;
/// Longest linger the uplink accepts before it publishes a partial batch.
pub const MAX_LINGER_MS: u64 = 60_000;
/// Smallest outbox byte cap that still holds a useful backlog.
pub const MIN_OUTBOX_BYTES: u64 = 1 << 20;
/// Bounds of `outbox.max_age_secs`: ages are kept in whole seconds; ten years is "forever".
pub const MIN_OUTBOX_AGE_SECS: u64 = 1;
pub const MAX_OUTBOX_AGE_SECS: u64 = 10 * 365 * 24 * 3600;
/// Longest `outbox.commit_linger_ms` accepted: a second of acknowledgement delay.
pub const MAX_COMMIT_LINGER_MS: u64 = 1_000;
/// Longest accepted gateway id; it becomes part of every cloud topic.
pub const MAX_GATEWAY_ID_LEN: usize = 64;
/// Most async runtime threads `gateway.worker_threads` accepts.
pub const MAX_WORKER_THREADS: usize = 64;

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field (`cloud.batch_size`), or `<toml>` for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration. Never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub local: LocalConfig,
    pub cloud: CloudConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Serial ports to read (`[[serial]]`, one table per port).
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// Device commands: what is allowed, how long to wait (`crate::commands::config`).
    #[serde(default)]
    pub commands: crate::commands::config::CommandsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Identifies this gateway in every cloud topic: letters, digits, `-` and `_`.
    pub id: String,
    /// Where the outbox and persisted state live.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take before the agent gives up and reports what is left.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Threads of the async runtime (sources, rules stage, uplink, commands). Serial ports
    /// and sled's I/O have threads of their own. 1 (default) measured 5-7 % less CPU per
    /// reading and 10-14 % more readings/s flat out than 2 on a 2-core machine: no wake-ups
    /// across threads between stages. More helps only when the rules saturate one core.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

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

/// The cloud broker the outbox drains to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub host: String,
    #[serde(default = "default_cloud_port")]
    pub port: u16,
    /// TLS is on unless the config says `tls = false`.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// PEM file of the CA that signs the broker's certificate; system roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS (both or neither).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// ALPN protocols, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Default: `edgestream-{gateway.id}`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Readings per telemetry publish.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more readings.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Publishes awaiting their PUBACK at once.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every batch is flushed to disk before anything is acknowledged upstream (default).
    Batch,
    /// Flushed every `flush_interval_ms`: fewer writes for SD cards, but a power cut can lose
    /// up to that much of what was acknowledged.
    Interval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Make room by dropping the oldest telemetry; alerts go only when no telemetry is left.
    DropOldestTelemetry,
    /// Keep what is stored and refuse new records.
    RefuseNew,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Cap on stored record bytes (keys + values); see ARCHITECTURE.md for the on-disk margin.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: u64,
    /// sled page cache; its default of 1 GiB is wrong for a Pi.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Only with `durability = "interval"`.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Longest a group commit waits after its first input for more to share its flush
    /// (`processor::COMMIT_LINGER` by default). Longer means fewer flushes, fewer bytes
    /// written and less CPU at gateway rates, for that much more latency and acknowledgement
    /// delay; the flush before every acknowledgement stays.
    #[serde(default = "default_commit_linger_ms")]
    pub commit_linger_ms: u64,
    #[serde(default = "default_full_policy")]
    pub full_policy: FullPolicy,
    /// Telemetry stored longer than this is dropped, oldest first (alerts and control
    /// messages never are). Off by default: telemetry waits until the cap.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule file loaded at start.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Inline rules, for small setups.
    #[serde(default)]
    pub text: Option<String>,
    /// Also take rule bundles for this group of gateways, on
    /// `{prefix}/groups/{group}/rules/set`.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Period of the health message on `{prefix}/{id}/health`.
    #[serde(default = "default_health_secs")]
    pub interval_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `edgestream=debug`; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

/// The Prometheus endpoint (`src/prometheus.rs`), always bound to 127.0.0.1.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `http://127.0.0.1:{port}/metrics`. Off by default.
    #[serde(default)]
    pub prometheus: bool,
    /// 0 lets the operating system choose a free port (logged at start).
    #[serde(default = "default_metrics_port")]
    pub port: u16,
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

    fn validate(&self, i: usize, p: &mut Vec<Problem>) {
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
fn validate_serial(ports: &[SerialConfig], p: &mut Vec<Problem>) {
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

fn default_metrics_port() -> u16 {
    9464
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            prometheus: false,
            port: default_metrics_port(),
        }
    }
}

impl MetricsConfig {
    fn validate(&self, _p: &mut [Problem]) {
        // Every u16 is a valid port (0 = chosen by the OS) and the address is fixed to
        // 127.0.0.1, so there is nothing to refuse; kept for the section contract.
    }
}

fn default_worker_threads() -> usize {
    1
}
fn default_shutdown_timeout_ms() -> u64 {
    5_000
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_local_port() -> u16 {
    1883
}
fn default_cloud_port() -> u16 {
    8883
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
fn default_true() -> bool {
    true
}
fn default_prefix() -> String {
    "edgestream".into()
}
/// Filled in 10 ms at 10,000 readings/s, so that a batch adds little to the group commit's
/// wait (`processor::COMMIT_LINGER`); the packaged config has always used it.
pub(crate) fn default_batch_size() -> usize {
    100
}
fn default_linger_ms() -> u64 {
    100
}
pub(crate) fn default_max_inflight() -> u16 {
    16
}
fn default_max_packet_bytes() -> usize {
    1 << 20
}
fn default_backoff_min_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_outbox_bytes() -> u64 {
    256 << 20
}
fn default_cache_bytes() -> u64 {
    4 << 20
}
fn default_durability() -> Durability {
    Durability::Batch
}
fn default_flush_interval_ms() -> u64 {
    1_000
}
pub(crate) fn default_commit_linger_ms() -> u64 {
    crate::processor::COMMIT_LINGER.as_millis() as u64
}
fn default_full_policy() -> FullPolicy {
    FullPolicy::DropOldestTelemetry
}
fn default_health_secs() -> u64 {
    30
}
fn default_log_level() -> String {
    "info".into()
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

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_outbox_bytes(),
            cache_bytes: default_cache_bytes(),
            durability: default_durability(),
            flush_interval_ms: default_flush_interval_ms(),
            commit_linger_ms: default_commit_linger_ms(),
            full_policy: default_full_policy(),
            max_age_secs: None,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_secs: default_health_secs(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

impl CloudConfig {
    /// A plaintext cloud connection to `host:port`, for demos and tests.
    pub fn plaintext(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            alpn: Vec::new(),
            client_id: None,
            topic_prefix: default_prefix(),
            keep_alive_secs: default_keep_alive_secs(),
            batch_size: default_batch_size(),
            linger_ms: default_linger_ms(),
            max_inflight: default_max_inflight(),
            max_packet_bytes: default_max_packet_bytes(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            username: None,
            password: None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file, returning every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Problem {
                path: path.display().to_string(),
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        Self::from_toml(&text, path.parent())
    }

    /// Parses and validates TOML text; `base` resolves a relative rules file.
    pub fn from_toml(text: &str, base: Option<&Path>) -> Result<Config, ConfigErrors> {
        let (config, mut problems) = Self::parse_sections(text, base)?;
        match config {
            Some(c) if problems.is_empty() => {
                problems.extend(c.validate(base));
                if problems.is_empty() {
                    Ok(c)
                } else {
                    Err(ConfigErrors(problems))
                }
            }
            _ => Err(ConfigErrors(problems)),
        }
    }

    /// Parses TOML text into a config without validating values.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        match Self::parse_sections(text, None)? {
            (Some(c), p) if p.is_empty() => Ok(c),
            (_, p) => Err(ConfigErrors(p)),
        }
    }

    /// Passes 1 and 2 (see the module doc). Sections that parse are validated on their own
    /// when another section did not parse, so that their problems are reported too.
    fn parse_sections(
        text: &str,
        base: Option<&Path>,
    ) -> Result<(Option<Config>, Vec<Problem>), ConfigErrors> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![Problem {
                path: "<toml>".into(),
                message: e.to_string().trim().replace('\n', " "),
            }])
        })?;
        let mut problems = Vec::new();
        const SECTIONS: [&str; 10] = [
            "gateway", "local", "cloud", "outbox", "rules", "health", "log", "metrics", "serial",
            "commands",
        ];
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(Problem {
                    path: key.clone(),
                    message: format!("unknown section, expected one of: {}", SECTIONS.join(", ")),
                });
            }
        }
        let gateway = section::<GatewayConfig>(&table, "gateway", &mut problems, None);
        let local = section(&table, "local", &mut problems, Some(LocalConfig::default()));
        let cloud = section::<CloudConfig>(&table, "cloud", &mut problems, None);
        let outbox = section(
            &table,
            "outbox",
            &mut problems,
            Some(OutboxConfig::default()),
        );
        let rules = section(&table, "rules", &mut problems, Some(RulesConfig::default()));
        let health = section(
            &table,
            "health",
            &mut problems,
            Some(HealthConfig::default()),
        );
        let log = section(&table, "log", &mut problems, Some(LogConfig::default()));
        let metrics = section(
            &table,
            "metrics",
            &mut problems,
            Some(MetricsConfig::default()),
        );
        let serial = section::<Vec<SerialConfig>>(&table, "serial", &mut problems, Some(vec![]));
        let commands = section(
            &table,
            "commands",
            &mut problems,
            Some(crate::commands::config::CommandsConfig::default()),
        );
        match (
            gateway, local, cloud, outbox, rules, health, log, metrics, serial, commands,
        ) {
            (
                Some(gateway),
                Some(local),
                Some(cloud),
                Some(outbox),
                Some(rules),
                Some(health),
                Some(log),
                Some(metrics),
                Some(serial),
                Some(commands),
            ) => Ok((
                Some(Config {
                    gateway,
                    local,
                    cloud,
                    outbox,
                    rules,
                    health,
                    log,
                    metrics,
                    serial,
                    commands,
                }),
                problems,
            )),
            (gateway, local, cloud, outbox, rules, health, log, metrics, serial, commands) => {
                if let Some(g) = &gateway {
                    g.validate(&mut problems);
                }
                if let Some(l) = &local {
                    l.validate(&mut problems);
                }
                if let Some(c) = &cloud {
                    c.validate(&mut problems);
                }
                if let Some(o) = &outbox {
                    o.validate(&mut problems);
                }
                if let Some(r) = &rules {
                    r.validate(base, &mut problems);
                }
                if let Some(h) = &health {
                    h.validate(&mut problems);
                }
                if let Some(l) = &log {
                    l.validate(&mut problems);
                }
                if let Some(m) = &metrics {
                    m.validate(&mut problems);
                }
                if let Some(s) = &serial {
                    validate_serial(s, &mut problems);
                }
                if let Some(c) = &commands {
                    c.validate(&mut problems);
                }
                Ok((None, problems))
            }
        }
    }

    /// Checks values and cross-field rules. `base` resolves a relative rules file.
    pub fn validate(&self, base: Option<&Path>) -> Vec<Problem> {
        let mut p = Vec::new();
        self.gateway.validate(&mut p);
        self.local.validate(&mut p);
        self.cloud.validate(&mut p);
        self.outbox.validate(&mut p);
        self.rules.validate(base, &mut p);
        self.health.validate(&mut p);
        self.log.validate(&mut p);
        self.metrics.validate(&mut p);
        validate_serial(&self.serial, &mut p);
        self.commands.validate(&mut p);
        p
    }

    /// The initial rule text and where it came from (`rules.file` path or `rules.text`).
    pub fn rules_source(&self, base: Option<&Path>) -> Result<Option<(String, String)>, Problem> {
        self.rules.source(base)
    }

    pub fn local_client_id(&self) -> String {
        self.local
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgestream-local-{}", self.gateway.id))
    }

    pub fn cloud_client_id(&self) -> String {
        self.cloud
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgestream-{}", self.gateway.id))
    }
}

impl RulesConfig {
    /// The rule text and where it came from (`rules.file (path)` or `rules.text`).
    pub fn source(&self, base: Option<&Path>) -> Result<Option<(String, String)>, Problem> {
        if let Some(text) = &self.text {
            return Ok(Some(("rules.text".into(), text.clone())));
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let path = match base {
            Some(b) if file.is_relative() => b.join(file),
            _ => file.clone(),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some((format!("rules.file ({})", path.display()), text))),
            Err(e) => Err(Problem {
                path: "rules.file".into(),
                message: format!("cannot read {}: {e}", path.display()),
            }),
        }
    }
}

/// The protocol's one naming rule (`edgestream_protocol::types::check_name`: printable ASCII
/// without spaces, '/', '+' or '#', not empty) within `max` bytes.
pub fn valid_name(s: &str, max: usize) -> bool {
    s.len() <= max && edgestream_protocol::types::check_name("name", s).is_ok()
}

fn bad(p: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    p.push(Problem {
        path: path.into(),
        message: message.into(),
    });
}

impl GatewayConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
        let id = &self.id;
        if id.is_empty() || id.len() > MAX_GATEWAY_ID_LEN {
            bad(
                p,
                "gateway.id",
                format!("must be 1 to {MAX_GATEWAY_ID_LEN} characters"),
            );
        } else if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bad(
                p,
                "gateway.id",
                format!("{id:?} may contain only letters, digits, '-' and '_' (it is part of every topic)"),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            bad(p, "gateway.data_dir", "must not be empty");
        }
        if self.shutdown_timeout_ms == 0 || self.shutdown_timeout_ms > 120_000 {
            bad(
                p,
                "gateway.shutdown_timeout_ms",
                "must be between 1 and 120000",
            );
        }
        if self.worker_threads == 0 || self.worker_threads > MAX_WORKER_THREADS {
            bad(
                p,
                "gateway.worker_threads",
                format!("must be between 1 and {MAX_WORKER_THREADS}"),
            );
        }
    }
}

impl LocalConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
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

impl CloudConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
        if self.host.is_empty() {
            bad(p, "cloud.host", "must not be empty");
        }
        if self.port == 0 {
            bad(p, "cloud.port", "must be between 1 and 65535");
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            bad(
                p,
                "cloud.client_key_file",
                "mutual TLS needs both client_cert_file and client_key_file",
            );
        }
        if !self.tls
            && (self.ca_file.is_some() || self.client_cert_file.is_some() || !self.alpn.is_empty())
        {
            bad(p, "cloud.tls", "TLS options are set but tls = false");
        }
        for (field, file) in [
            ("cloud.ca_file", &self.ca_file),
            ("cloud.client_cert_file", &self.client_cert_file),
            ("cloud.client_key_file", &self.client_key_file),
        ] {
            if let Some(f) = file {
                if !f.is_file() {
                    bad(
                        p,
                        field,
                        format!("{} does not exist or is not a file", f.display()),
                    );
                }
            }
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) {
            bad(
                p,
                "cloud.topic_prefix",
                "must be non-empty and free of MQTT wildcards",
            );
        }
        if self.keep_alive_secs < 5 || self.keep_alive_secs > 3600 {
            bad(p, "cloud.keep_alive_secs", "must be between 5 and 3600");
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            bad(
                p,
                "cloud.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            );
        }
        if self.linger_ms > MAX_LINGER_MS {
            bad(
                p,
                "cloud.linger_ms",
                format!("must be at most {MAX_LINGER_MS}"),
            );
        }
        if self.max_inflight == 0 || self.max_inflight > 1000 {
            bad(p, "cloud.max_inflight", "must be between 1 and 1000");
        }
        if self.max_packet_bytes < 16 * 1024 || self.max_packet_bytes > 256 << 20 {
            bad(
                p,
                "cloud.max_packet_bytes",
                "must be between 16384 and 268435456",
            );
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            bad(
                p,
                "cloud.backoff_min_ms",
                "must be at least 1 and at most backoff_max_ms",
            );
        }
    }
}

impl OutboxConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
        if self.max_bytes < MIN_OUTBOX_BYTES {
            bad(
                p,
                "outbox.max_bytes",
                format!("must be at least {MIN_OUTBOX_BYTES}"),
            );
        }
        if self.cache_bytes < 256 * 1024 || self.cache_bytes > 1 << 30 {
            bad(
                p,
                "outbox.cache_bytes",
                "must be between 262144 and 1073741824",
            );
        }
        if self.durability == Durability::Interval
            && (self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000)
        {
            bad(p, "outbox.flush_interval_ms", "must be between 1 and 60000");
        }
        if self.commit_linger_ms > MAX_COMMIT_LINGER_MS {
            bad(
                p,
                "outbox.commit_linger_ms",
                format!("must be between 0 and {MAX_COMMIT_LINGER_MS}"),
            );
        }
        if let Some(age) = self.max_age_secs {
            if !(MIN_OUTBOX_AGE_SECS..=MAX_OUTBOX_AGE_SECS).contains(&age) {
                bad(
                    p,
                    "outbox.max_age_secs",
                    format!("must be between {MIN_OUTBOX_AGE_SECS} and {MAX_OUTBOX_AGE_SECS} (10 years), or left out"),
                );
            }
        }
    }
}

impl RulesConfig {
    fn validate(&self, base: Option<&Path>, p: &mut Vec<Problem>) {
        if self.file.is_some() && self.text.is_some() {
            bad(p, "rules", "give either `file` or `text`, not both");
        }
        if let Some(g) = &self.group {
            if g.is_empty()
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bad(
                    p,
                    "rules.group",
                    format!("{g:?} may contain only letters, digits, '-' and '_'"),
                );
            }
        }
        match self.source(base) {
            Ok(Some((origin, text))) => {
                if let Err(errors) = edgestream_rules::compile(&text) {
                    for e in errors.0 {
                        bad(
                            p,
                            &origin,
                            format!("line {}, column {}: {}", e.line, e.column, e.message),
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(problem) => p.push(problem),
        }
    }
}

impl HealthConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
        if self.interval_secs == 0 || self.interval_secs > 86_400 {
            bad(p, "health.interval_secs", "must be between 1 and 86400");
        }
    }
}

impl LogConfig {
    fn validate(&self, p: &mut Vec<Problem>) {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            bad(
                p,
                "log.level",
                format!("{:?} is not a valid tracing filter", self.level),
            );
        }
    }
}

/// Deserialises one section; a missing section is `default`, or a problem when that is `None`.
fn section<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
    default: Option<T>,
) -> Option<T> {
    let Some(value) = table.get(name) else {
        if default.is_none() {
            problems.push(Problem {
                path: name.into(),
                message: "section is required".into(),
            });
        }
        return default;
    };
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                name.to_string()
            } else if inner.starts_with('[') {
                // An array of tables (`[[serial]]`): `serial[0].baud_rate`.
                format!("{name}{inner}")
            } else {
                format!("{name}.{inner}")
            };
            problems.push(Problem {
                path,
                message: e.into_inner().to_string().trim().replace('\n', " "),
            });
            None
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
