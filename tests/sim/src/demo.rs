//! `edgestream demo`: the whole data path with nothing installed.
//!
//! Two in-process brokers (rumqttd) stand in for the sensors' broker and the cloud; simulated
//! devices publish realistic signals with injected anomalies, and a simulated energy meter
//! answers Modbus TCP on 127.0.0.1 with word-swapped f32 registers that follow signals; the
//! agent (the `edgestream`
//! binary's `run` command, as a child process) runs the demo rules from a generated config,
//! with its outbox in a temporary directory; a subscriber on the "cloud" counts what arrives.
//! A status line, fed from the agent's Prometheus endpoint, is printed every second and a
//! summary at the end. The exit code is non-zero if nothing flowed end to end or if the agent
//! logged anything at ERROR level.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::agent::AgentChild;
use crate::{simulate, CloudCollector, InProcessBroker, MqttDevice};

/// The rules the demo runs: a threshold with hysteresis that also commands the boiler, two
/// anomaly detectors and a downsampling rule.
pub const DEMO_RULES: &str = r#"
# Boilers: critical when hotter than 80 for 30 s of reading time; clears below 75. The burner
# is turned down while it lasts (the simulated boilers answer on devices/{id}/replies).
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
  command set_burner(level = 20)
  command set_burner(level = 100) on clear

# Pumps: a vibration spike far outside the recent spread.
rule vibration_spike
  on device "pump-*"
  when mad_outlier(vibration, 64, 6)
  alert warning "pump vibration spike"

# Boilers: a pressure sensor that stopped reporting.
rule pressure_missing
  on device "boiler-*"
  when missing(pressure, 3s)
  alert warning "boiler pressure sensor silent"

# Greenhouse humidity is slow: send one avg/min/max per 10 s instead of every reading.
rule humidity_downsample
  on device "greenhouse-*"
  forward avg, min, max of humidity every 10s
"#;

const GATEWAY: &str = "demo-gw";
/// Longest wait for the agent to start (subscribe locally, serve its metrics).
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait, once the devices stop, for the outbox to empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the demo with `agent_exe` as the agent, for `duration` or until Ctrl-C.
pub fn main(duration: Option<u64>, agent_exe: PathBuf) -> anyhow::Result<()> {
    // rumqttd logs every client disconnect at ERROR; the demo's brokers are not the agent.
    crate::init_logging("warn,rumqttd=off");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let s = runtime.block_on(run(duration.map(Duration::from_secs), &agent_exe))?;
    let count = |k: &str| s.metrics.get(k).copied().unwrap_or(0.0) as u64;
    let readings_in = count(r#"edgestream_readings_in_total{source="mqtt"}"#);
    let raised = count(r#"edgestream_alerts_total{transition="raised"}"#);
    let acked = count("edgestream_outbox_acked_total");
    let outcome = |o: &str| count(&format!("edgestream_commands_total{{outcome=\"{o}\"}}"));
    println!();
    println!("summary after {:.1} s", s.elapsed.as_secs_f64());
    println!("  readings in            {readings_in}");
    println!(
        "  modbus readings in     {}",
        count(r#"edgestream_readings_in_total{source="modbus"}"#)
    );
    println!(
        "  alerts raised/cleared  {raised}/{}",
        count(r#"edgestream_alerts_total{transition="cleared"}"#)
    );
    println!(
        "  aggregates             {}",
        count("edgestream_aggregates_total")
    );
    println!(
        "  commands ok/failed/timed out  {}/{}/{}",
        outcome("succeeded"),
        outcome("failed"),
        outcome("timed_out")
    );
    println!(
        "  records forwarded      {}",
        count("edgestream_uplink_records_sent_total")
    );
    println!("  records acknowledged   {acked}");
    println!("  readings at the cloud  {}", s.cloud_readings);
    println!("  alerts at the cloud    {}", s.cloud_alerts);
    println!(
        "  outbox left            {}",
        count("edgestream_outbox_records")
    );
    println!("  errors logged          {}", s.agent_errors);
    println!();
    println!(
        "The agent's config, rules and log stay in {}.",
        s.dir.display()
    );
    println!("To run the agent on your own brokers, copy edgestream.toml and demo.esr, point");
    println!("[local] and [cloud] at the brokers and [gateway] data_dir at a lasting place,");
    println!("then `edgestream check --config edgestream.toml`.");
    if readings_in == 0 || raised == 0 || acked == 0 || s.cloud_readings == 0 {
        anyhow::bail!("the demo did not show data flowing end to end");
    }
    if s.agent_errors > 0 {
        anyhow::bail!(
            "the agent logged {} error(s): see {}",
            s.agent_errors,
            s.dir.join("agent.log").display()
        );
    }
    if let Some(status) = s.agent_exit.filter(|st| !st.success()) {
        anyhow::bail!("the agent exited with {status}");
    }
    Ok(())
}

struct Summary {
    elapsed: Duration,
    /// The agent's counters at the end (Prometheus names).
    metrics: std::collections::HashMap<String, f64>,
    cloud_readings: usize,
    cloud_alerts: usize,
    /// Lines the agent logged at ERROR.
    agent_errors: usize,
    /// How the agent exited when asked to stop (`None`: it had to be killed).
    agent_exit: Option<std::process::ExitStatus>,
    /// Where the config, the rules and the agent's log stay.
    dir: PathBuf,
}

async fn run(duration: Option<Duration>, agent_exe: &Path) -> anyhow::Result<Summary> {
    let local = InProcessBroker::start().await.context("local broker")?;
    let cloud = InProcessBroker::start().await.context("cloud broker")?;
    let dir = tempfile::Builder::new()
        .prefix("edgestream-demo-")
        .tempdir()
        .context("temp dir")?;
    let meter = crate::devices::modbus::energy_meter(0)
        .await
        .context("simulated Modbus meter")?;
    let config = write_config(dir.path(), local.port(), cloud.port(), meter.port())?;
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", GATEWAY)
        .await
        .context("cloud subscriber")?;
    let mut agent = AgentChild::start(agent_exe, &config, &dir.path().join("agent.log"), None)?;
    let mut log = LogWatch::default();
    let started = async {
        agent.wait_ready(AGENT_START_TIMEOUT).await?;
        agent.wait_metrics_port(AGENT_START_TIMEOUT).await
    };
    let metrics_port = match started.await {
        Ok(port) => port,
        Err(e) => {
            log.forward(&agent.logs());
            return Err(e.context(format!("the agent did not start ({})", config.display())));
        }
    };
    let devices: Vec<MqttDevice> = simulate::demo_fleet()
        .into_iter()
        .map(|cfg| MqttDevice::spawn("127.0.0.1", local.port(), cfg))
        .collect();
    println!(
        "edgestream demo: {} simulated devices -> local broker :{} -> agent (pid {}) -> cloud broker :{} (Ctrl-C to stop)",
        devices.len(),
        local.port(),
        agent.pid(),
        cloud.port()
    );
    println!("agent config: {}", config.display());

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    // Ctrl-C in a terminal reaches the agent too (same process group): it starts its own
    // orderly stop, so the figures of the last status line are the summary's fallback.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last = std::collections::HashMap::new();
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
        log.forward(&agent.logs());
        if let Some(status) = agent.exited() {
            anyhow::bail!(
                "the agent exited ({status}); its log: {}",
                agent.log_path().display()
            );
        }
        let m = crate::prometheus::scrape_parsed(metrics_port)
            .await
            .context("scraping the agent's metrics")?;
        let count = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let status = format!(
            "[{:>4}s] in {:>6} | modbus {:>4} | alerts {:>3} | commands {:>3} | forwarded {:>6} | acked {:>6} | outbox {:>5} | cloud readings {:>6}",
            started.elapsed().as_secs(),
            count(r#"edgestream_readings_in_total{source="mqtt"}"#),
            count(r#"edgestream_readings_in_total{source="modbus"}"#),
            count(r#"edgestream_alerts_total{transition="raised"}"#)
                + count(r#"edgestream_alerts_total{transition="cleared"}"#),
            count(r#"edgestream_commands_total{outcome="succeeded"}"#),
            count("edgestream_uplink_records_sent_total"),
            count("edgestream_outbox_acked_total"),
            count("edgestream_outbox_records"),
            collector.telemetry_readings().len(),
        );
        println!("{status}");
        last = m;
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    for mut d in devices {
        d.stop().await;
    }
    // What the devices sent last reaches the cloud before the figures are read.
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    while let Ok(m) = crate::prometheus::scrape_parsed(metrics_port).await {
        let drained = m.get("edgestream_outbox_records") == Some(&0.0);
        last = m;
        if drained || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = last;
    let agent_exit = if interrupted {
        agent.wait_exit(Duration::from_secs(10))
    } else {
        agent.stop(Duration::from_secs(10))
    };
    log.forward(&agent.logs());
    // Let the last publishes reach the subscriber.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The store goes; the config, the rules and the log stay for the user to read and copy.
    let _ = std::fs::remove_dir_all(dir.path().join("data"));
    Ok(Summary {
        elapsed: started.elapsed(),
        metrics,
        cloud_readings: collector.telemetry_readings().len(),
        cloud_alerts: collector.alerts().len(),
        agent_errors: log.errors,
        agent_exit,
        dir: dir.keep(),
    })
}

/// Follows the agent's log: its WARN and ERROR lines are shown on stderr as they come, and
/// the ERROR ones counted.
#[derive(Debug, Default)]
struct LogWatch {
    /// Lines of the log already seen.
    seen: usize,
    errors: usize,
}

impl LogWatch {
    fn forward(&mut self, logs: &str) {
        // A line still being written (no newline yet) is read again next time.
        let complete = &logs[..logs.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines().skip(self.seen) {
            self.seen += 1;
            match log_level(line) {
                Some("ERROR") => {
                    self.errors += 1;
                    eprintln!("agent: {line}");
                }
                Some("WARN") => eprintln!("agent: {line}"),
                _ => {}
            }
        }
    }
}

/// The level of a log line of the agent (`TIMESTAMP  LEVEL target: message`, no colours: its
/// stderr is a file).
fn log_level(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

/// Writes the demo's rules and the agent's config into `dir`; returns the config's path.
fn write_config(
    dir: &Path,
    local_port: u16,
    cloud_port: u16,
    modbus_port: u16,
) -> anyhow::Result<PathBuf> {
    let rules = dir.join("demo.esr");
    std::fs::write(&rules, DEMO_RULES.trim_start()).context("writing the demo rules")?;
    let path = dir.join("edgestream.toml");
    std::fs::write(
        &path,
        config_text(dir, &rules, local_port, cloud_port, modbus_port),
    )
    .context("writing the agent config")?;
    Ok(path)
}

/// The agent's config: the two brokers, small uplink batches so that the status line moves
/// every second, the Prometheus endpoint the status line reads, the one command the demo
/// rules send, and the energy meter polled over Modbus TCP.
fn config_text(
    dir: &Path,
    rules: &Path,
    local_port: u16,
    cloud_port: u16,
    modbus_port: u16,
) -> String {
    format!(
        r#"# Written by `edgestream demo`. The ports are the demo's in-process brokers.
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"
shutdown_timeout_ms = 3000
worker_threads = 1

[local]
host = "127.0.0.1"
port = {local_port}
topics = ["sensors/+/+"]

[cloud]
host = "127.0.0.1"
port = {cloud_port}
tls = false
batch_size = 100
linger_ms = 100

[rules]
file = "{rules}"

[health]
interval_secs = 5

# The burner level of any boiler, 0 to 100: what the `overheat` rule sends.
[[commands.allow]]
name = "set_burner"
devices = ["boiler-*"]
args.level = {{ type = "integer", min = 0, max = 100, required = true }}

# An energy meter polled over Modbus TCP (the demo's simulated slave): f32 measurements in
# word-swapped order, as many meters send them.
[[modbus]]
transport = "tcp"
host = "127.0.0.1"
port = {modbus_port}

[[modbus.slaves]]
unit = 1
device = "meter-1"

[[modbus.slaves.registers]]
metric = "voltage"
function = "input"
address = 0
type = "f32"
word_order = "little"
interval_ms = 1000

[[modbus.slaves.registers]]
metric = "power"
function = "input"
address = 2
type = "f32"
word_order = "little"
interval_ms = 1000
{tail}"#,
        tail = crate::agent::CONFIG_TAIL,
        data = dir.join("data").display(),
        rules = rules.display(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_rules_compile() {
        if let Err(e) = edgestream_rules::compile(super::DEMO_RULES) {
            panic!("{e}");
        }
    }

    #[test]
    fn agent_log_levels() {
        let line = "2026-12-07T17:00:00.000000Z ERROR edgestream_agent::uplink: lost";
        assert_eq!(super::log_level(line), Some("ERROR"));
        let mut w = super::LogWatch::default();
        w.forward(&format!(
            "{line}\n2026-12-07T17:00:00Z  INFO x: y\npartial ERR"
        ));
        assert_eq!((w.seen, w.errors), (2, 1));
        w.forward(&format!(
            "{line}\n2026-12-07T17:00:00Z  INFO x: y\n{line}\n"
        ));
        assert_eq!((w.seen, w.errors), (3, 2));
    }
}
