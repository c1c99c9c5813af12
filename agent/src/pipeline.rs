//! Wires the whole graph in one place:
//!
//! ```text
//!  LocalMqttSource --(SourceMsg, 512, block)--> RulesStage --(group commit)--> Outbox
//!        ^                                          |                           |
//!        +------------- PUBACK after flush ---------+                 Uplink --(QoS 1)--> cloud
//!  SerialSource (one OS thread per port) --(same channel, blocking_send, no ack)--> RulesStage
//!  ModbusSource (one task per bus) ---------(same channel, send().await, no ack)--> RulesStage
//!
//!  cloud commands (uplink) ---------+                      +--> serial port thread, Modbus bus task (PortLink)
//!  RulesStage (rule commands) ------+--> CommandRouter ----+--> local broker devices/{d}/commands
//!  replies (serial, local broker) --+        |
//!                                            +--> outbox (commands/outcomes)
//! ```
//!
//! Capacities and full-policies of the command channels are in `commands/router.rs`.
//!
//! The parts, in the order a run goes through them: [`Agent::build`] opens the outbox and
//! compiles the initial rules (errors here stop the start); [`Agent::start`] wires and spawns
//! the stages; [`feed_watchdog`] keeps systemd's watchdog fed while the rules stage beats;
//! [`Running::stop`] is the ordered shutdown below, driven by [`ShutdownPhases`].
//!
//! Shutdown order (each step bounded by `gateway.shutdown_timeout_ms`):
//! 1. sources stop forwarding and drop their senders (they keep their connection open);
//! 2. the rules stage drains its channel, commits and acknowledges everything it was given;
//! 3. sources send their last acknowledgements and disconnect;
//! 4. the uplink drains the outbox until it is empty or the deadline passes, publishes the
//!    offline status and disconnects. Whatever is left stays on disk for the next start.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgestream_rules::{Engine, Plan};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commands::router::{CommandRouter, RouterInputs, RuleCommandIssuer};
use crate::commands::routes::DeviceRoutes;
use crate::commands::store::CommandStore;
use crate::config::Config;
use crate::outbox::store::{OpenReport, Outbox, OutboxError, OutboxSettings};
use crate::rules_stage::remote::{RemoteRules, RuleStore, StoredState};
use crate::rules_stage::stage::{RulesStage, TICK};
use crate::source::modbus::poller::{ModbusSource, ModbusSourceError};
use crate::source::mqtt::LocalMqttSource;
use crate::source::reading::SOURCE_CHANNEL_CAPACITY;
use crate::source::serial::{SerialSource, SerialSourceError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::modbus_slaves::SlaveTable;
use crate::uplink::link::{StatusInfo, Uplink, UplinkError};
use crate::uplink::topics::CloudTopics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created or written; the message says which and why.
    #[error("{0}")]
    DataDir(crate::config::Problem),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The initial rules do not compile; `edgestream check` lists every error.
    #[error("initial rules do not compile:\n{0}")]
    Rules(String),
    #[error("initial rules: {0}")]
    RulesSource(String),
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The Prometheus endpoint cannot listen; pick another `[metrics] port` or turn it off.
    #[error("metrics endpoint on 127.0.0.1:{port}: {source}")]
    MetricsEndpoint { port: u16, source: std::io::Error },
    #[error(transparent)]
    Serial(#[from] SerialSourceError),
    #[error(transparent)]
    Modbus(#[from] ModbusSourceError),
}

/// What stopping left behind.
#[derive(Debug, Clone, Default)]
pub struct StopReport {
    pub outbox_remaining: u64,
    /// Tasks that did not stop within their deadline.
    pub stuck: Vec<&'static str>,
}

/// A built, not yet running agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    plan: Plan,
    rule_store: RuleStore,
    rule_state: StoredState,
    pub open_report: OpenReport,
}

impl Agent {
    /// Opens the outbox and compiles the initial rules. `config_dir` resolves a relative rules
    /// file.
    pub fn build(
        config: Config,
        config_dir: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Agent, StartError> {
        let dir = &config.gateway.data_dir;
        config
            .gateway
            .check_data_dir(true)
            .map_err(StartError::DataDir)?;
        let (outbox, open_report) = Outbox::open(
            &dir.join("outbox"),
            OutboxSettings::from(&config.outbox),
            metrics.clone(),
        )?;
        // A persisted remote bundle wins over the config file (rules_stage/remote.rs module doc).
        let rule_store = RuleStore::new(dir);
        let rule_state = rule_store.load().unwrap_or_else(|e| {
            tracing::error!(error = %e, "persisted rule bundle unreadable; starting on the config file's rules");
            StoredState::default()
        });
        let remote = rule_state
            .current
            .as_ref()
            .and_then(|b| match edgestream_rules::compile(&b.rules) {
                Ok(plan) => Some(plan),
                Err(e) => {
                    tracing::error!(version = b.version, errors = %e, "persisted rule bundle no longer compiles; starting on the config file's rules");
                    None
                }
            });
        let plan = match remote {
            Some(plan) => plan,
            None => {
                let text = config
                    .rules_source(config_dir)
                    .map_err(|p| StartError::RulesSource(p.to_string()))?
                    .map(|(_, t)| t)
                    .unwrap_or_default();
                edgestream_rules::compile(&text).map_err(|e| StartError::Rules(e.to_string()))?
            }
        };
        let rules_version = rule_state.current.as_ref().map_or(0, |b| b.version);
        tracing::info!(
            rules_version,
            gateway = %config.gateway.id,
            rules = plan.rule_count(),
            rule_state_bytes = plan.state_bytes(),
            backlog = open_report.records,
            "agent built"
        );
        Ok(Agent {
            config,
            metrics,
            outbox,
            plan,
            rule_store,
            rule_state,
            open_report,
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Runs until `shutdown` is cancelled, then stops in order (see the module doc).
    pub async fn run(self, shutdown: CancellationToken) -> Result<StopReport, StartError> {
        let deadline = Duration::from_millis(self.config.gateway.shutdown_timeout_ms);
        let outbox = self.outbox.clone();
        let phases = ShutdownPhases::default();
        let heartbeat = Arc::new(AtomicU64::new(0));
        let running = self.start(&shutdown, &phases, heartbeat.clone()).await?;

        // Everything is running: tell systemd (Type=notify), and feed its watchdog only while
        // the rules stage shows signs of life.
        crate::sdnotify::notify("READY=1");
        let watchdog = crate::sdnotify::watchdog_interval()
            .map(|every| tokio::spawn(feed_watchdog(every, heartbeat, shutdown.clone())));

        shutdown.cancelled().await;
        crate::sdnotify::notify("STOPPING=1");
        if let Some(w) = watchdog {
            w.abort();
        }
        tracing::info!("shutting down");
        let report = running.stop(&phases, deadline, &outbox).await;
        tracing::info!(outbox_remaining = report.outbox_remaining, stuck = ?report.stuck, "stopped");
        Ok(report)
    }

    /// Wires the stages (the graph in the module doc) and spawns each on its own task or
    /// thread.
    async fn start(
        self,
        shutdown: &CancellationToken,
        phases: &ShutdownPhases,
        heartbeat: Arc<AtomicU64>,
    ) -> Result<Running, StartError> {
        let Agent {
            config,
            metrics,
            outbox,
            plan,
            rule_store,
            rule_state,
            ..
        } = self;
        let (status_tx, status_rx) = watch::channel(StatusInfo {
            rules_version: rule_state.current.as_ref().map_or(0, |b| b.version),
            rules_hash: crate::rules_stage::remote::hash_hex(&plan),
        });
        let (bundles_tx, bundles_rx) = mpsc::channel(crate::rules_stage::remote::INBOUND_CAPACITY);
        let topics = CloudTopics::new(&config.cloud.topic_prefix, &config.gateway.id);
        let mut rule_topics = vec![topics.rules_set];
        if let Some(group) = &config.rules.group {
            rule_topics.push(format!(
                "{}/groups/{group}/rules/set",
                config.cloud.topic_prefix
            ));
        }
        let (cloud_cmds_tx, cloud_cmds_rx) = mpsc::channel(crate::commands::router::CLOUD_CAPACITY);
        let (rule_cmds_tx, rule_cmds_rx) = mpsc::channel(crate::commands::router::RULE_CAPACITY);
        let (device_tx, device_rx) = mpsc::channel(crate::commands::router::DEVICE_CAPACITY);
        // One entry per Modbus slave, bus by bus, for the health message.
        let slave_table = Arc::new(SlaveTable::new(config.modbus.iter().flat_map(|b| {
            b.slaves
                .iter()
                .map(|s| (b.endpoint(), s.unit, s.device.clone()))
        })));
        let mut uplink = Uplink::new(&config, outbox.clone(), metrics.clone(), status_rx)?
            .with_inbound(rule_topics, bundles_tx)
            .with_inbound(vec![topics.commands], cloud_cmds_tx);
        if !config.modbus.is_empty() {
            uplink = uplink.with_modbus_slaves(slave_table.clone());
        }
        // Capacity 1, full-policy block: a second bundle waits until the first is swapped in.
        let (plans_tx, plans_rx) = mpsc::channel(1);
        let remote_rules = RemoteRules::new(
            rule_store,
            rule_state,
            plans_tx,
            status_tx,
            outbox.clone(),
            metrics.clone(),
        );
        let remote_rules_task = tokio::spawn(
            remote_rules
                .run(bundles_rx)
                .instrument(tracing::info_span!("remote_rules")),
        );
        let metrics_endpoint = crate::telemetry::prometheus::start(
            &config.metrics,
            metrics.clone(),
            Some(outbox.clone()),
            shutdown.clone(),
        )
        .await
        .map_err(|source| StartError::MetricsEndpoint {
            port: config.metrics.port,
            source,
        })?;

        let (tx, rx) = mpsc::channel(SOURCE_CHANNEL_CAPACITY);
        // One thread and one sender clone per serial port; each drops its sender soon after
        // `stop_intake` (within `serial::READ_TIMEOUT`), like the MQTT source.
        let (routes, mut port_links) =
            DeviceRoutes::new(&config.serial, &config.modbus, &device_tx);
        let modbus_links = port_links.split_off(config.serial.len());
        let mut serial_threads = Vec::new();
        for (port, link) in config.serial.iter().zip(port_links) {
            let thread = SerialSource::new(port.clone())?.with_link(link).spawn(
                tx.clone(),
                metrics.clone(),
                phases.stop_intake.clone(),
            )?;
            serial_threads.push(thread);
        }
        // One task and one sender clone per Modbus bus; each drops its sender as soon as
        // `stop_intake` is cancelled (a request in flight is abandoned).
        let mut modbus_tasks = Vec::new();
        let mut first_slave = 0;
        for ((i, bus), link) in config.modbus.iter().enumerate().zip(modbus_links) {
            let source = ModbusSource::new(i, bus.clone())?
                .with_link(link)
                .with_slave_table(slave_table.clone(), first_slave);
            first_slave += bus.slaves.len();
            let span = tracing::info_span!("modbus", bus = %bus.endpoint());
            modbus_tasks.push(tokio::spawn(
                source
                    .run(tx.clone(), metrics.clone(), phases.stop_intake.clone())
                    .instrument(span),
            ));
        }
        let (acks_tx, acks_rx) = mpsc::channel(crate::source::reading::ACK_BATCHES);
        let source = LocalMqttSource::new(&config)
            .with_replies(device_tx)
            .with_acks(acks_rx);
        let local_span = tracing::info_span!("local_mqtt", broker = %format!("{}:{}", config.local.host, config.local.port));
        let uplink_span = tracing::info_span!("uplink", broker = %format!("{}:{}", config.cloud.host, config.cloud.port));
        let (local_client, local_events) = source.client_pair();
        let router = CommandRouter::new(
            config.commands.clone(),
            CommandStore::new(&config.gateway.data_dir),
            routes,
            Some(local_client.clone()),
            outbox.clone(),
            metrics.clone(),
        )
        .with_stopping(phases.stop_intake.clone());
        // Ends once the uplink, the rules stage and every source have dropped their senders.
        let router_task = tokio::spawn(
            router
                .run(RouterInputs {
                    cloud: cloud_cmds_rx,
                    rules: rule_cmds_rx,
                    devices: device_rx,
                })
                .instrument(tracing::info_span!("commands")),
        );
        let source_task = tokio::spawn(
            source
                .run(
                    local_client.clone(),
                    local_events,
                    tx,
                    metrics.clone(),
                    phases.stop_intake.clone(),
                    phases.release_sources.clone(),
                )
                .instrument(local_span),
        );
        let stage = RulesStage::new(
            Engine::new(plan),
            outbox.clone(),
            Some(acks_tx),
            metrics.clone(),
        )
        .with_plan_updates(plans_rx)
        .with_commands(RuleCommandIssuer::new(rule_cmds_tx, &config.commands))
        .with_heartbeat(heartbeat)
        .with_stopping(phases.stop_intake.clone())
        .with_commit_linger(Duration::from_millis(config.outbox.commit_linger_ms))
        .with_max_clock_skew_ms(config.rules.max_clock_skew_ms);
        let stage_task = tokio::spawn(stage.run(rx).instrument(tracing::info_span!("rules_stage")));
        let uplink_task = tokio::spawn(
            uplink
                .run(shutdown.clone(), phases.stages_done.clone())
                .instrument(uplink_span),
        );
        Ok(Running {
            stage: stage_task,
            local_source: source_task,
            serial_threads,
            modbus_tasks,
            uplink: uplink_task,
            router: router_task,
            remote_rules: remote_rules_task,
            _metrics_endpoint: metrics_endpoint,
        })
    }
}

/// The signals of the ordered shutdown (module doc), each given once, in this order.
#[derive(Debug, Default)]
struct ShutdownPhases {
    /// Sources stop forwarding and drop their senders, so the rules stage drains and ends.
    stop_intake: CancellationToken,
    /// The rules stage has acknowledged everything: sources send their last
    /// acknowledgements and disconnect.
    release_sources: CancellationToken,
    /// Nothing more will enter the outbox: the uplink drains it and disconnects.
    stages_done: CancellationToken,
}

/// The running stages, as [`Agent::start`] spawned them.
#[derive(Debug)]
struct Running {
    stage: JoinHandle<()>,
    local_source: JoinHandle<()>,
    serial_threads: Vec<std::thread::JoinHandle<()>>,
    modbus_tasks: Vec<JoinHandle<()>>,
    uplink: JoinHandle<()>,
    router: JoinHandle<()>,
    remote_rules: JoinHandle<()>,
    /// Serves until the agent's shutdown token is cancelled.
    _metrics_endpoint: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the stages in the module doc's order, each within its deadline; a stage that
    /// misses it is aborted and named in the report.
    async fn stop(
        mut self,
        phases: &ShutdownPhases,
        deadline: Duration,
        outbox: &Outbox,
    ) -> StopReport {
        let mut report = StopReport::default();
        phases.stop_intake.cancel();
        if tokio::time::timeout(deadline, &mut self.stage)
            .await
            .is_err()
        {
            tracing::error!("rules stage did not drain in time");
            report.stuck.push("rules stage");
            self.stage.abort();
        }
        phases.release_sources.cancel();
        phases.stages_done.cancel();
        if tokio::time::timeout(Duration::from_secs(2), self.local_source)
            .await
            .is_err()
        {
            report.stuck.push("local source");
        }
        if !self.serial_threads.is_empty() {
            let threads = std::mem::take(&mut self.serial_threads);
            let joined = tokio::task::spawn_blocking(move || {
                for t in threads {
                    if t.join().is_err() {
                        tracing::error!("a serial source thread panicked");
                    }
                }
            });
            if tokio::time::timeout(Duration::from_secs(2), joined)
                .await
                .is_err()
            {
                report.stuck.push("serial source");
            }
        }
        for task in std::mem::take(&mut self.modbus_tasks) {
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                report.stuck.push("modbus source");
            }
        }
        if tokio::time::timeout(deadline + Duration::from_secs(3), &mut self.uplink)
            .await
            .is_err()
        {
            tracing::error!("uplink did not stop in time");
            report.stuck.push("uplink");
            self.uplink.abort();
        }
        if let Err(e) = outbox.flush().await {
            tracing::error!(error = %e, "final outbox flush failed");
        }
        // Every sender of the router's inputs is gone now; it saves its table and ends.
        if tokio::time::timeout(Duration::from_secs(2), self.router)
            .await
            .is_err()
        {
            report.stuck.push("command router");
        }
        // The uplink held the bundle sender; with it gone the consumer finishes.
        if tokio::time::timeout(Duration::from_secs(1), self.remote_rules)
            .await
            .is_err()
        {
            report.stuck.push("remote rules");
        }
        report.outbox_remaining = outbox.depth();
        report
    }
}

/// Feeds systemd's watchdog every `every` while the rules stage beats (it does at least once
/// per [`TICK`], even idle), so that a wedged pipeline is restarted rather than left hanging.
async fn feed_watchdog(every: Duration, heartbeat: Arc<AtomicU64>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    let mut last_seen = heartbeat.load(Ordering::Relaxed);
    let mut stalled_for = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = heartbeat.load(Ordering::Relaxed);
        if now != last_seen {
            last_seen = now;
            stalled_for = Duration::ZERO;
        } else {
            stalled_for += every;
        }
        if stalled_for <= TICK * 3 {
            crate::sdnotify::notify("WATCHDOG=1");
        } else {
            tracing::error!(
                ?stalled_for,
                "rules stage shows no sign of life; no longer feeding the systemd watchdog"
            );
        }
    }
}
