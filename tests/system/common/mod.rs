//! Shared harness for the system tests: the real `edgestream` binary as a child process,
//! config files, and a publisher that knows which readings the local broker acknowledged.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use edgestream_sim::{CloudCollector, FaultProxy, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// The canonical alert rule used across the system tests.
pub const OVERHEAT_RULES: &str = r#"
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
"#;

/// The real agent binary, run as a child process with its own data directory.
pub struct AgentProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

/// The usual set-up: two real mosquitto brokers ("local" and "cloud"), a cloud subscriber,
/// and the agent between them, started and subscribed. With `via_proxy` the agent reaches
/// the cloud through a [`FaultProxy`] the test can cut.
pub struct Rig {
    pub local: Mosquitto,
    pub cloud: Mosquitto,
    pub proxy: Option<FaultProxy>,
    pub collector: CloudCollector,
    pub dir: tempfile::TempDir,
    /// The agent's config text, for restarts on the same data directory.
    pub config: String,
    pub agent: AgentProcess,
}

/// Which broker the agent reaches through the [`FaultProxy`], if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyIn {
    Neither,
    Cloud,
    Local,
}

impl Rig {
    /// Both brokers, the agent, and the cloud collector; `via_proxy` puts the fault proxy
    /// between the agent and the cloud broker.
    pub async fn start(gateway: &str, rules: &str, via_proxy: bool) -> Rig {
        let proxy_in = if via_proxy {
            ProxyIn::Cloud
        } else {
            ProxyIn::Neither
        };
        Self::start_with(gateway, rules, proxy_in).await
    }

    /// [`Rig::start`] with the fault proxy in front of the broker `proxy_in` names.
    pub async fn start_with(gateway: &str, rules: &str, proxy_in: ProxyIn) -> Rig {
        let local = Mosquitto::start().await.expect("local broker");
        let cloud = Mosquitto::start().await.expect("cloud broker");
        let proxy = match proxy_in {
            ProxyIn::Neither => None,
            ProxyIn::Cloud => Some(FaultProxy::start(cloud.addr()).await.expect("proxy")),
            ProxyIn::Local => Some(FaultProxy::start(local.addr()).await.expect("proxy")),
        };
        let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", gateway)
            .await
            .expect("collector");
        let dir = tempfile::tempdir().expect("temp dir");
        let proxied = |side: ProxyIn, port: u16| match &proxy {
            Some(p) if proxy_in == side => p.port(),
            _ => port,
        };
        let config = config_toml(
            gateway,
            &dir.path().join("data"),
            proxied(ProxyIn::Local, local.port()),
            proxied(ProxyIn::Cloud, cloud.port()),
            rules,
            "",
        );
        let mut agent = AgentProcess::start(dir.path(), &config);
        agent.wait_subscribed().await;
        Rig {
            local,
            cloud,
            proxy,
            collector,
            dir,
            config,
            agent,
        }
    }
}

/// A config for a gateway with plaintext brokers on 127.0.0.1.
pub fn config_toml(
    gateway: &str,
    data_dir: &Path,
    local_port: u16,
    cloud_port: u16,
    rules: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[gateway]
id = "{gateway}"
data_dir = "{data}"
shutdown_timeout_ms = 5000

[local]
host = "127.0.0.1"
port = {local_port}
topics = ["sensors/+/+"]

[cloud]
host = "127.0.0.1"
port = {cloud_port}
tls = false
batch_size = 50
linger_ms = 50
backoff_min_ms = 100
backoff_max_ms = 1000

[rules]
text = """{rules}"""

[health]
interval_secs = 1
{extra}
"#,
        data = data_dir.display(),
    )
}

impl AgentProcess {
    /// Writes `config` into `dir` and starts `edgestream run` on it.
    pub fn start(dir: &Path, config: &str) -> AgentProcess {
        Self::start_with_env(dir, config, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables (e.g. systemd's).
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, String)]) -> AgentProcess {
        std::fs::create_dir_all(dir).expect("create agent dir");
        let config_path = dir.join("edgestream.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.join(format!("agent-{}.log", now_nanos()));
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_edgestream"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,edgestream_agent=debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgestream");
        AgentProcess {
            child: Some(child),
            dir: dir.to_path_buf(),
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until the agent's log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                self.is_running(),
                "agent exited while waiting for {needle:?}\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "agent never logged {needle:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the agent is subscribed on the local broker (readings published before
    /// that are not queued for it: the broker has no session for it yet).
    pub async fn wait_subscribed(&mut self) {
        self.wait_log("subscribed to local topics", Duration::from_secs(20))
            .await;
    }

    /// SIGTERM, then waits for a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent did not stop within {timeout:?} after SIGTERM\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL agent");
            child.wait().expect("reap agent");
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One reading to publish: `sensors/{device}/{metric}` with `{"value":..,"ts":..}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub ts: u64,
}

pub fn sample(device: &str, metric: &str, value: f64, ts: u64) -> Sample {
    Sample {
        device: device.into(),
        metric: metric.into(),
        value,
        ts,
    }
}

/// Publishes raw payloads with QoS 1 and returns once the broker acknowledged all of them.
pub async fn publish_raw(port: u16, items: &[(String, Vec<u8>)]) {
    let id = format!("test-pub-{}", now_nanos());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 256);
    let pending = items.len();
    let publisher = {
        let client = client.clone();
        let items = items.to_vec();
        tokio::spawn(async move {
            for (topic, payload) in items {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("queue publish");
            }
        })
    };
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked < pending {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("local broker did not acknowledge in time");
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("test publisher lost the local broker: {e}"),
        }
    }
    publisher.await.expect("publisher task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

/// Publishes readings as JSON and waits for all their PUBACKs.
pub async fn publish_samples(port: u16, samples: &[Sample]) {
    let items: Vec<(String, Vec<u8>)> = samples
        .iter()
        .map(|s| {
            (
                format!("sensors/{}/{}", s.device, s.metric),
                serde_json::json!({"value": s.value, "ts": s.ts})
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect();
    publish_raw(port, &items).await;
}

/// Readings as the cloud saw them: (device, metric, value, ts, seq), in arrival order.
pub fn cloud_readings(values: &[serde_json::Value]) -> Vec<(String, String, f64, u64, u64)> {
    values
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap_or_default().to_string(),
                r["metric"].as_str().unwrap_or_default().to_string(),
                r["value"].as_f64().unwrap_or(f64::NAN),
                r["ts"].as_u64().unwrap_or(0),
                r["seq"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Waits until the agent's retained status says it is online.
pub async fn wait_online(collector: &edgestream_sim::CloudCollector) -> bool {
    collector
        .wait_for(
            |m| {
                m.iter()
                    .any(|m| m.topic.ends_with("/status") && m.payload["state"] == "online")
            },
            Duration::from_secs(20),
        )
        .await
}

/// Waits until `n` distinct readings (by `seq`) reached the cloud; duplicates from resent
/// in-flight batches do not count.
pub async fn wait_unique_readings(
    collector: &edgestream_sim::CloudCollector,
    n: usize,
    timeout: Duration,
) -> bool {
    let suffix = "/telemetry";
    collector
        .wait_for(
            |msgs| {
                let mut seqs = std::collections::HashSet::new();
                for m in msgs.iter().filter(|m| m.topic.ends_with(suffix)) {
                    if let Some(rs) = m.payload["readings"].as_array() {
                        seqs.extend(rs.iter().filter_map(|r| r["seq"].as_u64()));
                    }
                }
                seqs.len() >= n
            },
            timeout,
        )
        .await
}

/// Asserts that every sample arrived, exactly once per `seq`, and in order per device.
pub fn assert_all_delivered_in_order(
    samples: &[Sample],
    cloud: &[(String, String, f64, u64, u64)],
) {
    use std::collections::{HashMap, HashSet};
    // Drop duplicates (same seq), keeping the first arrival.
    let mut seen = HashSet::new();
    let unique: Vec<_> = cloud.iter().filter(|r| seen.insert(r.4)).collect();
    let mut expected: HashMap<&str, Vec<(f64, u64)>> = HashMap::new();
    for s in samples {
        expected.entry(&s.device).or_default().push((s.value, s.ts));
    }
    let mut got: HashMap<&str, Vec<(f64, u64)>> = HashMap::new();
    for r in &unique {
        got.entry(r.0.as_str()).or_default().push((r.2, r.3));
    }
    for (device, exp) in &expected {
        let g = got.get(device).cloned().unwrap_or_default();
        assert_eq!(
            g.len(),
            exp.len(),
            "device {device}: expected {} readings at the cloud, got {}",
            exp.len(),
            g.len()
        );
        assert_eq!(
            &g, exp,
            "device {device}: readings differ or are out of order"
        );
    }
}

/// The port from the agent's `metrics endpoint listening addr=127.0.0.1:PORT` log line.
pub fn metrics_port(logs: &str) -> u16 {
    edgestream_sim::agent::metrics_port_in(logs).expect("metrics endpoint port in the log")
}
