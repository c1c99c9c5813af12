//! The `[cloud]` section: the broker the outbox drains to, TLS, batching and backoff.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validation::{bad, Problem};

/// Largest number of readings the uplink packs into one telemetry publish (the protocol's
/// limit for a telemetry batch).
pub const MAX_BATCH_SIZE: usize = edgestream_protocol::limits::MAX_TELEMETRY_BATCH;

/// Longest linger the uplink accepts before it publishes a partial batch.
pub const MAX_LINGER_MS: u64 = 60_000;

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

fn default_cloud_port() -> u16 {
    8883
}

fn default_true() -> bool {
    true
}

fn default_keep_alive_secs() -> u64 {
    30
}
fn default_prefix() -> String {
    "edgestream".into()
}

/// Filled in 10 ms at 10,000 readings/s, so that a batch adds little to the group commit's
/// wait (`processor::COMMIT_LINGER`); the packaged config has always used it.
fn default_batch_size() -> usize {
    100
}

fn default_linger_ms() -> u64 {
    100
}

fn default_max_inflight() -> u16 {
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

impl CloudConfig {
    pub(crate) fn validate(&self, p: &mut Vec<Problem>) {
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
