//! `edgestream demo`: the whole data path with nothing installed.
//!
//! Two in-process brokers (rumqttd) stand in for the sensors' broker and the cloud; simulated
//! devices publish realistic signals with injected anomalies; the agent runs the demo rules
//! with its outbox in a temporary directory; a subscriber on the "cloud" counts what arrives.
//! A status line is printed every second and a summary at the end. The exit code is non-zero
//! if nothing flowed end to end or if anything was logged at ERROR level.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgestream_sim::{simulate, CloudCollector, InProcessBroker, MqttDevice};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, GatewayConfig};
use crate::outbox::config::OutboxConfig;
use crate::pipeline::Agent;
use crate::rules_stage::config::RulesConfig;
use crate::source::config::LocalConfig;
use crate::telemetry::config::{HealthConfig, LogConfig};
use crate::telemetry::metrics::Metrics;
use crate::uplink::config::CloudConfig;

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

pub fn main(duration: Option<u64>) -> anyhow::Result<()> {
    // rumqttd logs every client disconnect at ERROR; the demo's brokers are not the agent.
    let errors = crate::logging::init_counting("warn,edgestream_agent=info,rumqttd=off");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(run(duration.map(Duration::from_secs)))?;
    let logged_errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    println!();
    println!("summary after {:.1} s", summary.elapsed.as_secs_f64());
    println!(
        "  readings in            {}",
        summary.metrics.readings_in_mqtt
    );
    println!(
        "  alerts raised/cleared  {}/{}",
        summary.metrics.alerts_raised, summary.metrics.alerts_cleared
    );
    println!("  aggregates             {}", summary.metrics.aggregates);
    println!(
        "  commands ok/failed/timed out  {}/{}/{}",
        summary.metrics.commands_succeeded,
        summary.metrics.commands_failed,
        summary.metrics.commands_timed_out
    );
    println!(
        "  records forwarded      {}",
        summary.metrics.uplink_records_sent
    );
    println!("  records acknowledged   {}", summary.metrics.outbox_acked);
    println!("  readings at the cloud  {}", summary.cloud_readings);
    println!("  alerts at the cloud    {}", summary.cloud_alerts);
    println!("  outbox left            {}", summary.outbox_left);
    println!("  errors logged          {logged_errors}");
    let m = &summary.metrics;
    if m.readings_in_mqtt == 0
        || m.alerts_raised == 0
        || m.outbox_acked == 0
        || summary.cloud_readings == 0
    {
        anyhow::bail!("the demo did not show data flowing end to end");
    }
    if logged_errors > 0 {
        anyhow::bail!("{logged_errors} error(s) logged");
    }
    Ok(())
}

struct Summary {
    elapsed: Duration,
    metrics: crate::telemetry::metrics::Snapshot,
    cloud_readings: usize,
    cloud_alerts: usize,
    outbox_left: u64,
}

async fn run(duration: Option<Duration>) -> anyhow::Result<Summary> {
    let local = InProcessBroker::start().await.context("local broker")?;
    let cloud = InProcessBroker::start().await.context("cloud broker")?;
    let data = tempfile::Builder::new()
        .prefix("edgestream-demo-")
        .tempdir()
        .context("temp dir")?;
    let config = demo_config(data.path(), local.port(), cloud.port());
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", GATEWAY)
        .await
        .context("cloud subscriber")?;
    let metrics = Arc::new(Metrics::default());
    let agent = Agent::build(config, None, metrics.clone())?;
    let shutdown = CancellationToken::new();
    crate::logging::cancel_on_signal(shutdown.clone())?;
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    let devices: Vec<MqttDevice> = simulate::demo_fleet()
        .into_iter()
        .map(|cfg| MqttDevice::spawn("127.0.0.1", local.port(), cfg))
        .collect();
    println!(
        "edgestream demo: {} simulated devices -> local broker :{} -> agent -> cloud broker :{} (Ctrl-C to stop)",
        devices.len(),
        local.port(),
        cloud.port()
    );

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let m = metrics.snapshot();
        println!(
            "[{:>4}s] in {:>6} | alerts {:>3} | commands {:>3} | forwarded {:>6} | acked {:>6} | outbox {:>5} | cloud readings {:>6}",
            started.elapsed().as_secs(),
            m.readings_in_mqtt,
            m.alerts_raised + m.alerts_cleared,
            m.commands_succeeded,
            m.uplink_records_sent,
            m.outbox_acked,
            m.outbox_depth,
            collector.telemetry_readings().len(),
        );
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    for mut d in devices {
        d.stop().await;
    }
    shutdown.cancel();
    let report = agent_task.await.context("agent task")??;
    // Let the last publishes reach the subscriber.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Summary {
        elapsed: started.elapsed(),
        metrics: metrics.snapshot(),
        cloud_readings: collector.telemetry_readings().len(),
        cloud_alerts: collector.alerts().len(),
        outbox_left: report.outbox_remaining,
    })
}

fn demo_config(data: &std::path::Path, local_port: u16, cloud_port: u16) -> Config {
    let mut cloud = CloudConfig::plaintext("127.0.0.1", cloud_port);
    cloud.batch_size = 100;
    cloud.linger_ms = 100;
    Config {
        gateway: GatewayConfig {
            id: GATEWAY.into(),
            data_dir: data.to_path_buf(),
            shutdown_timeout_ms: 3_000,
            worker_threads: 1,
        },
        local: LocalConfig {
            port: local_port,
            ..LocalConfig::default()
        },
        cloud,
        outbox: OutboxConfig::default(),
        rules: RulesConfig {
            file: None,
            text: Some(DEMO_RULES.into()),
            group: None,
        },
        health: HealthConfig { interval_secs: 5 },
        log: LogConfig::default(),
        metrics: Default::default(),
        serial: Vec::new(),
        commands: demo_commands(),
    }
}

/// The demo's allow-list: the burner level of any boiler, 0 to 100.
fn demo_commands() -> crate::commands::config::CommandsConfig {
    let mut allow = crate::commands::config::AllowedCommand {
        name: "set_burner".into(),
        devices: vec!["boiler-*".into()],
        args: Default::default(),
    };
    allow.args.insert(
        "level".into(),
        crate::commands::config::ArgSpec {
            kind: crate::commands::config::ArgKind::Integer,
            required: true,
            min: Some(0.0),
            max: Some(100.0),
            one_of: Vec::new(),
        },
    );
    crate::commands::config::CommandsConfig {
        allow: vec![allow],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_config_is_valid() {
        let c = super::demo_config(std::path::Path::new("/tmp/x"), 1883, 1884);
        let problems = c.validate(None);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn demo_rules_compile() {
        if let Err(e) = edgestream_rules::compile(super::DEMO_RULES) {
            panic!("{e}");
        }
    }
}
