//! The `[health]`, `[log]` and `[metrics]` sections.

use serde::{Deserialize, Serialize};

use crate::validation::{bad, Problem};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Period of the health message on `{prefix}/{id}/health`.
    #[serde(default = "default_health_secs")]
    pub interval_secs: u64,
}

fn default_health_secs() -> u64 {
    30
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_secs: default_health_secs(),
        }
    }
}

impl HealthConfig {
    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
        if self.interval_secs == 0 || self.interval_secs > 86_400 {
            bad(p, "health.interval_secs", "must be between 1 and 86400");
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `edgestream=debug`; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

impl LogConfig {
    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            bad(
                p,
                "log.level",
                format!("{:?} is not a valid tracing filter", self.level),
            );
        }
    }
}

/// The Prometheus endpoint (`telemetry/prometheus.rs`), always bound to 127.0.0.1.
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
    pub(crate) fn validate(&self, _p: &mut [Problem]) {
        // Every u16 is a valid port (0 = chosen by the OS) and the address is fixed to
        // 127.0.0.1, so there is nothing to refuse; kept for the section contract.
    }
}
