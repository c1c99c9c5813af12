//! Agent configuration: TOML with defaults, `deny_unknown_fields`, and validation that reports
//! every problem it finds with the path of the field it concerns.
//!
//! Loading happens in three passes so that one mistake does not hide the next:
//! 1. the document is parsed as TOML (a syntax error stops here, with its line and column);
//! 2. each top-level section is deserialised on its own, so an unknown field or a wrong type in
//!    `[cloud]` does not hide another in `[outbox]` (paths come from `serde_path_to_error`);
//! 3. [`Config::validate`] checks values and cross-field rules, again collecting every problem.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::commands::config::CommandsConfig;
use crate::outbox::config::OutboxConfig;
use crate::rules_stage::config::RulesConfig;
use crate::source::config::{validate_serial, LocalConfig, SerialConfig};
use crate::source::modbus::config::{validate_modbus, ModbusConfig};
use crate::source::modbus::writes::validate_writes;
use crate::telemetry::config::{HealthConfig, LogConfig, MetricsConfig};
use crate::uplink::config::CloudConfig;
use crate::validation::{bad, section, with_placeholders};
pub use crate::validation::{ConfigErrors, Problem};

/// Longest accepted gateway id; it becomes part of every cloud topic.
pub const MAX_GATEWAY_ID_LEN: usize = 64;

/// Most async runtime threads `gateway.worker_threads` accepts.
pub const MAX_WORKER_THREADS: usize = 64;

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
    /// Modbus buses to poll (`[[modbus]]`, one table per bus).
    #[serde(default)]
    pub modbus: Vec<ModbusConfig>,
    /// Device commands: what is allowed, how long to wait (`crate::commands::config`).
    #[serde(default)]
    pub commands: CommandsConfig,
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

fn default_worker_threads() -> usize {
    1
}

fn default_shutdown_timeout_ms() -> u64 {
    5_000
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
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![syntax_problem(text, &e)]))?;
        let mut problems = Vec::new();
        const SECTIONS: [&str; 11] = [
            "gateway", "local", "cloud", "outbox", "rules", "health", "log", "metrics", "serial",
            "modbus", "commands",
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
        let modbus = section::<Vec<ModbusConfig>>(&table, "modbus", &mut problems, Some(vec![]));
        let commands = section(
            &table,
            "commands",
            &mut problems,
            Some(CommandsConfig::default()),
        );
        match (
            gateway, local, cloud, outbox, rules, health, log, metrics, serial, modbus, commands,
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
                Some(modbus),
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
                    modbus,
                    commands,
                }),
                problems,
            )),
            (
                gateway,
                local,
                cloud,
                outbox,
                rules,
                health,
                log,
                metrics,
                serial,
                modbus,
                commands,
            ) => {
                // A section that failed on some fields is still validated on the others, with
                // placeholders for the failed ones (whose problems are already reported).
                let mut placeholders = Vec::new();
                let gateway = gateway.or_else(|| {
                    let (g, paths) = with_placeholders::<GatewayConfig>(&table, "gateway")?;
                    placeholders = paths;
                    Some(g)
                });
                let first_value_problem = problems.len();
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
                if let Some(m) = &modbus {
                    validate_modbus(m, &mut problems);
                }
                if let Some(c) = &commands {
                    c.validate(&mut problems);
                }
                let mut i = 0;
                problems.retain(|p| {
                    i += 1;
                    i <= first_value_problem
                        || !placeholders
                            .iter()
                            .any(|f| p.path == *f || p.path.starts_with(&format!("{f}.")))
                });
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
        validate_modbus(&self.modbus, &mut p);
        self.commands.validate(&mut p);
        validate_writes(&self.modbus, &self.commands.allow, &mut p);
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

/// A TOML syntax error as the field it is in (when its line is `key = ...` under a table
/// header), its line and column, and the parser's message, without the excerpt of the line
/// the parser's own `Display` adds: that line may hold a secret (a password whose closing
/// quote is missing).
fn syntax_problem(text: &str, e: &toml::de::Error) -> Problem {
    let mut path = "<toml>".to_string();
    let mut at = String::new();
    if let Some(span) = e.span() {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        at = format!("line {line}, column {column}: ");
        let bare = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        let table = text
            .lines()
            .take(line)
            .filter_map(|l| {
                let l = l.trim();
                let name = l.strip_prefix('[')?.trim_start_matches('[');
                let name = name.split(']').next()?.trim();
                bare(name).then_some(name)
            })
            .last();
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| bare(k));
        if let Some(key) = key {
            path = match table {
                Some(t) => format!("{t}.{key}"),
                None => key.to_string(),
            };
        }
    }
    Problem {
        path,
        message: format!("{at}{}", e.message().trim().replace('\n', " ")),
    }
}

impl GatewayConfig {
    /// Whether `data_dir` can hold the agent's state: it is a directory (or can be created as
    /// one) and a file can be created in it. With `create` the directory is created first
    /// (`run`); without, the nearest existing ancestor is tested instead (`check`, which
    /// changes nothing). The message says what is wrong in one sentence.
    pub fn check_data_dir(&self, create: bool) -> Result<(), Problem> {
        let dir = &self.data_dir;
        let problem = |message: String| Problem {
            path: "gateway.data_dir".into(),
            message: format!("{}: {message}", dir.display()),
        };
        if create {
            if let Err(e) = std::fs::create_dir_all(dir) {
                return Err(problem(match std::fs::metadata(dir) {
                    Ok(m) if !m.is_dir() => "exists and is not a directory".into(),
                    _ => format!("cannot create it: {e}"),
                }));
            }
        }
        let mut probe_dir = dir.as_path();
        loop {
            match std::fs::metadata(probe_dir) {
                Ok(m) if m.is_dir() => break,
                Ok(_) if probe_dir == dir => {
                    return Err(problem("exists and is not a directory".into()))
                }
                Ok(_) => {
                    return Err(problem(format!(
                        "cannot be created: {} is not a directory",
                        probe_dir.display()
                    )))
                }
                Err(_) => match probe_dir.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => probe_dir = parent,
                    _ => return Ok(()),
                },
            }
        }
        let probe = probe_dir.join(format!(".edgestream-write-test-{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) if probe_dir == dir => Err(problem(format!("is not writable: {e}"))),
            Err(e) => Err(problem(format!(
                "cannot be created: {} is not writable: {e}",
                probe_dir.display()
            ))),
        }
    }

    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
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
