//! The cloud uplink: drains the outbox to the cloud broker.
//!
//! An explicit mode machine, driven by one task that owns the MQTT event loop:
//!
//! ```text
//!   Connecting --ConnAck--> Draining --outbox empty--> Online
//!                              |                          |
//!                              +---- error / wedged ------+--> Offline --backoff--> Connecting
//!        \                    |                                     
//!         \---shutdown-->  ShuttingDown (drain until empty or deadline, then offline status)
//! ```
//!
//! Guarantees:
//! - **A record leaves the outbox only on its own PUBACK.** Each publish is remembered with the
//!   outbox keys it carries under the packet id rumqttc's state assigned it (at once for the
//!   outbox's publishes, which the uplink hands to that state itself and writes in bulk; from
//!   `Outgoing::Publish(pkid)`, in order, for those sent through rumqttc's request channel),
//!   and the keys are removed when `Incoming::PubAck(pkid)` arrives.
//! - **Everything unacknowledged is resent after every reconnect, whatever the broker says
//!   about its session.** Each connection gets a fresh client and event loop (so nothing stale
//!   is replayed by rumqttc itself) and starts reading the outbox from its beginning.
//! - **Order.** Alerts go first, then telemetry in sequence order; a reconnect resends from the
//!   oldest unacknowledged record, so per device the cloud sees readings in order (duplicates,
//!   identifiable by `seq`, only from publishes in flight when a connection died).
//! - **No tight reconnect loop**: jittered exponential backoff between attempts.
//! - **Watchdog**: a connection with publishes in flight and no packet from the broker for
//!   [`WEDGED_AFTER`] is dropped and rebuilt.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::conn_log::ConnLog;
use crate::deadletter::RejectSampler;
use crate::mqtt_link::{self, Staged};
use crate::outbox::record::{Priority, Record};
use crate::outbox::store::{Key, Outbox, Stored};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::modbus_slaves::SlaveTable;
use crate::uplink::config::CloudConfig;
use crate::uplink::inbound::{AckToken, InboundAck, InboundMsg};
use crate::uplink::topics::CloudTopics;
use crate::uplink::wire;

/// Largest cloud message handed to its consumer. Rule bundles are limited to 256 KiB and
/// commands to about 1 KiB by the protocol; a message between those limits and this one is
/// refused by its consumer, on its own status or outcome topic. A larger one is read whole
/// (see `mqtt_link::MAX_READ_PACKET`), acknowledged at once, counted (`cloud_oversized`) and
/// sampled to the dead-letter topic.
pub const MAX_INBOUND_PAYLOAD: usize = 1 << 20;
/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with publishes in flight and no packet from the broker for this long is wedged.
pub const WEDGED_AFTER: Duration = Duration::from_secs(45);
/// A connection that lasted this long resets the reconnect backoff; one the broker drops
/// sooner (bad credentials accepted then kicked, a proxy that closes at once) keeps backing off
/// instead of reconnecting at the minimum delay forever.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Acknowledged records are removed from the outbox together, at most this long after the
/// first PUBACK of a group: one removal (and at most one rewrite per segment) for a burst of
/// PUBACKs instead of one per publish. Removal is not flushed by itself anyway (the next group
/// commit makes it durable), so this adds no new window: a crash may resend what was
/// acknowledged in the last few milliseconds, as it could before.
pub const ACK_LINGER: Duration = Duration::from_millis(5);
/// ... or as soon as this many acknowledged records wait.
pub const ACK_GROUP_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Connecting,
    /// Connected with a backlog older than this connection: sending it, oldest first, while
    /// new records queue behind it.
    Draining,
    Online,
    Offline,
    ShuttingDown,
}

/// Where messages from the cloud (commands, rule bundles) go.
#[derive(Debug)]
struct Inbound {
    topics: Vec<String>,
    tx: mpsc::Sender<InboundMsg>,
}

/// What the status message says besides online/offline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusInfo {
    pub rules_version: u64,
    pub rules_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// TLS settings could not be loaded; fix the config (files, PEM contents).
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

pub struct Uplink {
    cloud: CloudConfig,
    gateway: String,
    client_id: String,
    topics: CloudTopics,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    status: watch::Receiver<StatusInfo>,
    /// Routes for cloud messages, matched by topic filter in order.
    inbound: Vec<Inbound>,
    health_every: Duration,
    shutdown_timeout: Duration,
    started: Instant,
    transport: Transport,
    /// Acknowledgements of cloud messages, from their consumers (see [`InboundAck`]).
    acks_tx: mpsc::UnboundedSender<AckToken>,
    acks_rx: mpsc::UnboundedReceiver<AckToken>,
    /// Connections made so far; numbers each one for [`AckToken`].
    connections: u64,
    /// Oversized cloud messages, sampled to the dead-letter topic.
    sampler: RejectSampler,
    /// The Modbus slaves' figures, listed in the health message when there are any.
    modbus_slaves: Option<Arc<SlaveTable>>,
}

impl std::fmt::Debug for Uplink {
    // rumqttc's Transport has no Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("gateway", &self.gateway)
            .field("broker", &(&self.cloud.host, self.cloud.port))
            .field("tls", &self.cloud.tls)
            .finish_non_exhaustive()
    }
}

enum Exit {
    Done,
    Lost(String),
}

/// State of one connection; thrown away when it ends.
struct Session {
    client: AsyncClient,
    /// This connection's number (see [`Uplink::connections`]).
    connection: u64,
    /// Publishes handed to rumqttc's request channel (status and health) whose packet id is
    /// not known yet, in order.
    queued: VecDeque<Vec<Key>>,
    /// Outbox publishes built by [`Uplink::fill_window`] and not yet handed to rumqttc's state;
    /// [`send_staged`] writes them, all in one flush.
    staged: VecDeque<(rumqttc::Publish, Vec<Key>)>,
    /// The keys of a staged publish whose packet id was still in flight (a collision, after
    /// out-of-order PUBACKs): rumqttc holds it and sends it when that id is acknowledged,
    /// reporting `Outgoing::Publish`, and takes no other publish meanwhile.
    collided: Option<Vec<Key>>,
    inflight: HashMap<u16, Vec<Key>>,
    high_after: Option<u64>,
    low_after: Option<u64>,
    partial_since: Option<Instant>,
    /// Last packet from the broker, or when the window last went from idle to busy.
    last_progress: Instant,
    /// Set while a backlog found at connect time is being sent: (since, records then).
    draining: Option<(Instant, u64)>,
    /// Records may have been appended since the outbox was last found to hold no alert and
    /// less than a batch of telemetry. While false, [`Uplink::fill_window`] does not scan the
    /// outbox again (measured: counting the partial batch on every PUBACK took ~10% of the
    /// agent's CPU flat out).
    unseen_appends: bool,
    /// The next telemetry batch, read so far (at most `batch_size`, after `low_after`): each
    /// record is read from the outbox once, not counted again at every append until the batch
    /// is full.
    low_pending: Vec<Stored>,
    /// Keys of acknowledged publishes not yet removed from the outbox (see [`ACK_LINGER`]),
    /// and when the first of them arrived. Always removed before the session ends, so that a
    /// reconnect never reads them again.
    acked: Vec<Key>,
    acked_since: Option<Instant>,
}

impl Session {
    /// A session that starts reading the outbox from its beginning; `backlog` is the outbox's
    /// depth at connect time.
    fn new(client: AsyncClient, connection: u64, backlog: u64, batch_size: usize) -> Session {
        Session {
            client,
            connection,
            queued: VecDeque::new(),
            staged: VecDeque::new(),
            collided: None,
            inflight: HashMap::new(),
            high_after: None,
            low_after: None,
            partial_since: None,
            last_progress: Instant::now(),
            draining: (backlog > 0).then(|| (Instant::now(), backlog)),
            unseen_appends: true,
            low_pending: Vec::with_capacity(batch_size),
            acked: Vec::new(),
            acked_since: None,
        }
    }

    /// The broker acknowledged `pkid`: its records wait in `acked` for removal.
    fn on_puback(&mut self, pkid: u16) {
        self.last_progress = Instant::now();
        if let Some(keys) = self.inflight.remove(&pkid) {
            self.acked.extend_from_slice(&keys);
            self.acked_since.get_or_insert_with(Instant::now);
        }
    }

    /// Publishes taking a place in the in-flight window: queued with rumqttc or awaiting
    /// their PUBACK.
    fn in_window(&self) -> usize {
        self.queued.len()
            + self.staged.len()
            + usize::from(self.collided.is_some())
            + self.inflight.len()
    }

    /// rumqttc wrote a publish that went through its request channel, or one it held after a
    /// collision: it now awaits the PUBACK for `pkid` (0 for QoS 0, which awaits none).
    fn on_outgoing_publish(&mut self, pkid: u16) {
        // While a collided publish is held, rumqttc takes no request from its channel, so the
        // next publish it reports is that one.
        let Some(keys) = self.collided.take().or_else(|| self.queued.pop_front()) else {
            return;
        };
        if pkid != 0 {
            self.await_ack(pkid, keys);
        }
    }

    fn await_ack(&mut self, pkid: u16, keys: Vec<Key>) {
        if self.inflight.is_empty() {
            // The watchdog measures silence while waiting, not idle time before: start its
            // clock now.
            self.last_progress = Instant::now();
        }
        self.inflight.insert(pkid, keys);
    }
}

impl Uplink {
    pub fn new(
        config: &Config,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        status: watch::Receiver<StatusInfo>,
    ) -> Result<Self, UplinkError> {
        let cloud = config.cloud.clone();
        let transport = build_transport(&cloud)?;
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        Ok(Self {
            acks_tx,
            acks_rx,
            connections: 0,
            sampler: RejectSampler::new("cloud-mqtt"),
            topics: CloudTopics::new(&cloud.topic_prefix, &config.gateway.id),
            client_id: config.cloud_client_id(),
            gateway: config.gateway.id.clone(),
            cloud,
            outbox,
            metrics,
            status,
            health_every: Duration::from_secs(config.health.interval_secs),
            shutdown_timeout: Duration::from_millis(config.gateway.shutdown_timeout_ms),
            started: Instant::now(),
            transport,
            inbound: Vec::new(),
            modbus_slaves: None,
        })
    }

    /// Lists the Modbus slaves' figures in every health message (`modbus_slaves`).
    pub fn with_modbus_slaves(mut self, table: Arc<SlaveTable>) -> Self {
        self.modbus_slaves = Some(table);
        self
    }

    /// Subscribes to `topics` on the cloud broker (QoS 1) on every connection and hands each
    /// message to `tx` with the handle that acknowledges it. Full-policy **block**: the
    /// uplink waits for the consumer (rule bundles and commands are rare and quick to check),
    /// and a message is PUBACKed only when the consumer says so, after it persisted or
    /// rejected it; a crash before that makes the broker redeliver it (persistent session).
    /// Call once per consumer; a message goes to the first route whose filters match it.
    pub fn with_inbound(mut self, topics: Vec<String>, tx: mpsc::Sender<InboundMsg>) -> Self {
        self.inbound.push(Inbound { topics, tx });
        self
    }

    fn options(&self) -> MqttOptions {
        let c = &self.cloud;
        let mut o = MqttOptions::new(self.client_id.clone(), c.host.clone(), c.port);
        o.set_keep_alive(Duration::from_secs(c.keep_alive_secs))
            // The outbox, not the broker's session, is the source of truth for what we send;
            // the session is kept only so that commands and rule bundles sent while we were
            // away, or not yet acknowledged, are delivered again. A fresh client per
            // connection means rumqttc itself never replays stale publishes.
            .set_clean_session(false)
            .set_manual_acks(true)
            // Inbound messages larger than our own limits must still be read (and refused):
            // a packet over rumqttc's limit drops the connection, and the persistent session
            // would redeliver it forever.
            .set_max_packet_size(mqtt_link::MAX_READ_PACKET, c.max_packet_bytes)
            .set_inflight(c.max_inflight.saturating_add(8))
            .set_request_channel_capacity(c.max_inflight as usize * 2 + 16)
            .set_last_will(LastWill::new(
                self.topics.status.clone(),
                self.status_payload("offline"),
                QoS::AtLeastOnce,
                true,
            ))
            .set_transport(self.transport.clone());
        if let (Some(u), Some(p)) = (&c.username, &c.password) {
            o.set_credentials(u.clone(), p.clone());
        }
        o
    }

    fn status_payload(&self, state: &str) -> Vec<u8> {
        let s = self.status.borrow();
        let mut v = serde_json::json!({
            "v": 1, "gateway": self.gateway, "state": state,
            "rules_version": s.rules_version, "rules_hash": s.rules_hash,
            "agent_version": env!("CARGO_PKG_VERSION"),
        });
        // Part of every (retained) status for the life of this process: whoever looks at the
        // gateway later still sees that its old backlog was set aside at start, and where.
        if let Some((path, error)) = &self.outbox.open_report().moved_aside {
            v["outbox_recovered"] = serde_json::json!({
                "moved_to": path.display().to_string(), "error": error,
            });
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Runs until `shutdown` is cancelled and either the outbox is drained (after `stages_done`
    /// says nothing more will be appended) or the shutdown deadline passes.
    pub async fn run(mut self, shutdown: CancellationToken, stages_done: CancellationToken) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cloud.backoff_min_ms),
            Duration::from_millis(self.cloud.backoff_max_ms),
        );
        let mut reachability = ConnLog::new("cloud broker");
        loop {
            if shutdown.is_cancelled() {
                tracing::warn!(
                    records = self.outbox.depth(),
                    "shutting down while offline; the outbox keeps the backlog for the next start"
                );
                break;
            }
            tracing::debug!(mode = ?Mode::Connecting);
            let (client, mut events) =
                AsyncClient::new(self.options(), self.cloud.max_inflight as usize * 2 + 16);
            // The uplink coalesces its publishes itself (`send_staged`).
            mqtt_link::set_nodelay(&mut events);
            let connected = tokio::select! {
                _ = shutdown.cancelled() => continue,
                r = tokio::time::timeout(CONNECT_TIMEOUT, wait_connack(&mut events)) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("timed out waiting for CONNACK".to_string()),
                },
            };
            match connected {
                Ok(()) => {
                    let connected_at = Instant::now();
                    Metrics::inc(&self.metrics.uplink_connects);
                    Metrics::set(&self.metrics.uplink_online, 1);
                    let backlog = self.outbox.depth();
                    let mode = if backlog > 0 {
                        Mode::Draining
                    } else {
                        Mode::Online
                    };
                    reachability.connected();
                    tracing::info!(?mode, backlog, "connected to cloud broker");
                    self.connections += 1;
                    let session =
                        Session::new(client, self.connections, backlog, self.cloud.batch_size);
                    let exit = self
                        .online(session, &mut events, &shutdown, &stages_done)
                        .await;
                    if connected_at.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    Metrics::set(&self.metrics.uplink_online, 0);
                    match exit {
                        Exit::Done => break,
                        Exit::Lost(why) => {
                            Metrics::inc(&self.metrics.uplink_connect_failures);
                            tracing::warn!(mode = ?Mode::Offline, reason = %why, backlog = self.outbox.depth(), "lost cloud broker; backlog stays in the outbox");
                        }
                    }
                }
                Err(why) => {
                    Metrics::inc(&self.metrics.uplink_connect_failures);
                    reachability.failed(&why);
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tracing::info!(remaining = self.outbox.depth(), "uplink stopped");
    }

    async fn online(
        &mut self,
        mut s: Session,
        events: &mut rumqttc::EventLoop,
        shutdown: &CancellationToken,
        stages_done: &CancellationToken,
    ) -> Exit {
        // Subscribe before saying "online": the broker handles one connection's packets in
        // order, so once the cloud sees the status, commands and bundles sent to us are
        // routed to our session (a fresh session would otherwise miss them).
        for inbound in &self.inbound {
            for t in &inbound.topics {
                if let Err(e) = s.client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                    tracing::error!(topic = %t, error = %e, "cannot queue cloud subscription");
                }
            }
        }
        self.publish_status(&mut s, "online");
        let mut health = tokio::time::interval(self.health_every);
        health.reset(); // first health message one interval after connecting
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        let mut deadline: Option<Instant> = shutdown
            .is_cancelled()
            .then(|| Instant::now() + self.shutdown_timeout);
        let mut buf = Vec::with_capacity(self.cloud.batch_size);
        let mut acks_linger_ends = crate::select_loop::Deadline::new();
        let mut batch_linger_ends = crate::select_loop::Deadline::new();
        let exit = loop {
            if s.acked.len() >= ACK_GROUP_MAX
                || s.acked_since.is_some_and(|t| t.elapsed() >= ACK_LINGER)
                || deadline.is_some()
            {
                self.remove_acked(&mut s);
            }
            // Acknowledgements of cloud messages go out every turn, whatever else is busy.
            if let Ok(first) = self.acks_rx.try_recv() {
                if let Err(e) = self.write_inbound_acks(&s, events, first).await {
                    break Exit::Lost(e);
                }
            }
            // Events rumqttc has buffered (a read brings many PUBACKs) are taken first: the
            // window they free is then filled with one write, not one write per PUBACK.
            if !mqtt_link::has_buffered_events(events) {
                if let Err(e) = self.fill_window(&mut s, &mut buf, deadline.is_some()) {
                    tracing::error!(error = %e, "cannot read the outbox");
                }
                if let Err(e) = send_staged(&mut s, events).await {
                    break Exit::Lost(e);
                }
            }
            if let Some(d) = deadline {
                let drained = stages_done.is_cancelled()
                    && self.outbox.depth() == 0
                    && s.inflight.is_empty()
                    && s.queued.is_empty();
                if drained || Instant::now() >= d {
                    if !drained {
                        tracing::warn!(remaining = self.outbox.depth(), "shutdown deadline reached before the outbox drained; the rest is sent on next start");
                    }
                    self.goodbye(&mut s, events).await;
                    break Exit::Done;
                }
            }
            // A lingering partial batch matters only while the window has room: with the
            // window full, a passed linger would wake this loop on every turn until a PUBACK.
            let room = s.in_window() < self.cloud.max_inflight as usize;
            batch_linger_ends.set(
                s.partial_since
                    .filter(|_| room)
                    .map(|t| t + Duration::from_millis(self.cloud.linger_ms)),
            );
            acks_linger_ends.set(s.acked_since.map(|t| t + ACK_LINGER));
            // Cancellation safety of each branch: `poll()` keeps partial reads in rumqttc's
            // buffers; `appended()` and the timers lose nothing when dropped.
            tokio::select! {
                biased;
                ev = events.poll() => match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => s.on_outgoing_publish(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => s.on_puback(ack.pkid),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        s.last_progress = Instant::now();
                        self.deliver_inbound(&s, p).await;
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {}
                    Ok(Event::Incoming(_)) => s.last_progress = Instant::now(),
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => break Exit::Lost(e.to_string()),
                },
                _ = self.outbox.appended() => s.unseen_appends = true,
                Some(first) = self.acks_rx.recv() => {
                    if let Err(e) = self.write_inbound_acks(&s, events, first).await {
                        break Exit::Lost(e);
                    }
                }
                _ = acks_linger_ends.elapsed() => {}
                _ = batch_linger_ends.elapsed() => {}
                _ = self.status.changed() => self.publish_status(&mut s, "online"),
                _ = health.tick() => self.publish_health(&mut s),
                _ = watchdog.tick() => {
                    if !s.inflight.is_empty() && s.last_progress.elapsed() > WEDGED_AFTER {
                        break Exit::Lost(format!("no packet from the broker for {WEDGED_AFTER:?} with {} publishes in flight", s.inflight.len()));
                    }
                }
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    tracing::info!(mode = ?Mode::ShuttingDown, backlog = self.outbox.depth(), "draining the outbox before exit");
                    deadline = Some(Instant::now() + self.shutdown_timeout);
                }
            }
        };
        // Whatever ended the session, what the broker acknowledged leaves the outbox now, so
        // that the next connection does not send it again.
        self.remove_acked(&mut s);
        exit
    }

    /// Removes the acknowledged records waiting in `s.acked` from the outbox.
    fn remove_acked(&self, s: &mut Session) {
        s.acked_since = None;
        if s.acked.is_empty() {
            return;
        }
        match self.outbox.remove(&s.acked) {
            Ok(n) => Metrics::add(&self.metrics.outbox_acked, n as u64),
            Err(e) => {
                tracing::error!(error = %e, "cannot remove acknowledged records; they will be sent again")
            }
        }
        s.acked.clear();
        if let Some((since, records)) = s.draining {
            if self.outbox.depth() == 0 {
                let secs = since.elapsed().as_secs_f64();
                tracing::info!(
                    mode = ?Mode::Online, records, secs,
                    per_sec = (records as f64 / secs.max(1e-3)) as u64,
                    "backlog drained"
                );
                s.draining = None;
            }
        }
    }

    async fn deliver_inbound(&mut self, s: &Session, p: rumqttc::Publish) {
        if p.payload.len() > MAX_INBOUND_PAYLOAD {
            Metrics::inc(&self.metrics.cloud_oversized);
            let why = format!(
                "payload of {} bytes is over the cloud limit of {MAX_INBOUND_PAYLOAD} bytes",
                p.payload.len()
            );
            match self.sampler.reject(&p.topic, &why, &p.payload) {
                Some(sample) => {
                    Metrics::inc(&self.metrics.deadletters_sent);
                    if let Err(e) = self.outbox.append(&[Record::DeadLetter(sample)]) {
                        tracing::error!(error = %e, "dead-letter sample not stored");
                    }
                }
                None => Metrics::inc(&self.metrics.deadletters_suppressed),
            }
            self.inbound_ack(s, &p).ack();
            return;
        }
        let route = self
            .inbound
            .iter()
            .find(|r| r.topics.iter().any(|f| rumqttc::matches(&p.topic, f)));
        let Some(inbound) = route else {
            // Not one of our subscriptions (a stale one from an earlier configuration, kept by
            // the persistent session): acknowledge so that the broker forgets it.
            tracing::debug!(topic = %p.topic, "cloud message on no route; acknowledged and ignored");
            self.inbound_ack(s, &p).ack();
            return;
        };
        let msg = InboundMsg {
            ack: self.inbound_ack(s, &p),
            publish: p,
        };
        if inbound.tx.send(msg).await.is_err() {
            tracing::warn!(
                "inbound consumer has stopped; message left unacknowledged for redelivery"
            );
        }
    }

    /// The handle that acknowledges `p`, a message that arrived on `s`'s connection.
    fn inbound_ack(&self, s: &Session, p: &rumqttc::Publish) -> InboundAck {
        InboundAck {
            tx: self.acks_tx.clone(),
            token: (p.qos != QoS::AtMostOnce).then_some(AckToken {
                connection: s.connection,
                pkid: p.pkid,
            }),
        }
    }

    /// Writes the PUBACKs of `first` and of every other acknowledgement waiting, with one
    /// flush. Those for an earlier connection are dropped: the broker redelivers their messages.
    ///
    /// Not rumqttc's own path (`AsyncClient::try_ack`): that goes through its request
    /// channel, which the event loop drains one request per turn and only when it has no
    /// buffered events. A burst of commands fills it, and a PUBACK that finds it full is lost:
    /// the broker keeps that message in flight (its window closes, the burst stalls) and
    /// delivers it again on the next connection.
    async fn write_inbound_acks(
        &mut self,
        s: &Session,
        events: &mut rumqttc::EventLoop,
        first: AckToken,
    ) -> Result<(), String> {
        let mut tokens = vec![first];
        while let Ok(t) = self.acks_rx.try_recv() {
            tokens.push(t);
        }
        let requests = tokens
            .into_iter()
            .filter(|t| t.connection == s.connection)
            .map(|t| rumqttc::Request::PubAck(rumqttc::PubAck::new(t.pkid)));
        let packets = mqtt_link::ack_packets(events, requests)
            .map_err(|e| format!("cannot acknowledge cloud messages: {e}"))?;
        if packets.is_empty() || !mqtt_link::is_connected(events) {
            return Ok(());
        }
        let timeout = mqtt_link::write_timeout(events);
        match tokio::time::timeout(timeout, mqtt_link::write_flushed(events, packets)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot write acknowledgements: {e}")),
            Err(_) => Err(format!("writing acknowledgements took over {timeout:?}")),
        }
    }

    /// Publishes from the outbox while the in-flight window has room.
    fn fill_window(
        &mut self,
        s: &mut Session,
        buf: &mut Vec<Stored>,
        shutting_down: bool,
    ) -> Result<(), crate::outbox::store::OutboxError> {
        let window = self.cloud.max_inflight as usize;
        let batch = self.cloud.batch_size;
        let linger = Duration::from_millis(self.cloud.linger_ms);
        let mut payload = Vec::new();
        while s.in_window() < window {
            // Nothing appended since the outbox was found with no alert and a partial batch
            // (or none): only the end of a linger can change what to send.
            let lingering = s
                .partial_since
                .is_some_and(|t| !shutting_down && t.elapsed() < linger);
            let full = s.low_pending.len() >= batch;
            if !s.unseen_appends && !full && (s.partial_since.is_none() || lingering) {
                break;
            }
            buf.clear();
            let room = window - s.in_window();
            self.outbox
                .read_after(Priority::High, s.high_after, room, buf)?;
            if !buf.is_empty() {
                for st in buf.iter() {
                    s.high_after = Some(st.seq);
                    self.publish_single(s, st, &mut payload);
                }
                continue;
            }
            if s.unseen_appends && !full {
                let after = s.low_pending.last().map(|st| st.seq).or(s.low_after);
                self.outbox
                    .read_after(Priority::Low, after, batch, &mut s.low_pending)?;
            }
            if s.low_pending.is_empty() {
                s.partial_since = None;
                s.unseen_appends = false;
                break;
            }
            if s.low_pending.len() < batch && !shutting_down {
                let since = *s.partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() < linger {
                    s.unseen_appends = false;
                    break;
                }
            }
            s.partial_since = None;
            // The batch goes out; `buf` (empty) becomes the next one's buffer.
            std::mem::swap(buf, &mut s.low_pending);
            let Some(last) = buf.last() else { break };
            s.low_after = Some(last.seq);
            let (readings, others): (Vec<&Stored>, Vec<&Stored>) = buf
                .iter()
                .partition(|st| matches!(st.record, Record::Reading(_)));
            self.publish_readings(s, &readings, &mut payload);
            for st in others {
                self.publish_single(s, st, &mut payload);
            }
        }
        Ok(())
    }

    fn publish_readings(&self, s: &mut Session, readings: &[&Stored], payload: &mut Vec<u8>) {
        let mut rest = readings;
        while !rest.is_empty() {
            // Halve the batch until it fits the broker's packet limit.
            let mut n = rest.len();
            loop {
                if wire::telemetry_batch(&self.gateway, &rest[..n], payload).is_err() {
                    tracing::error!("telemetry batch could not be encoded");
                    return;
                }
                if payload.len() + 256 <= self.cloud.max_packet_bytes || n == 1 {
                    break;
                }
                n = n.div_ceil(2);
            }
            let keys = rest[..n].iter().map(|st| st.key).collect();
            self.publish(s, &self.topics.telemetry, payload, keys, n as u64);
            rest = &rest[n..];
        }
    }

    fn publish_single(&self, s: &mut Session, st: &Stored, payload: &mut Vec<u8>) {
        let control_topic;
        let topic = match &st.record {
            Record::Alert(_) => &self.topics.alerts,
            Record::Aggregate(_) => &self.topics.aggregates,
            Record::DeadLetter(_) => &self.topics.deadletter,
            Record::Reading(_) => &self.topics.telemetry,
            Record::Control(c) => {
                control_topic = self.topics.under(&c.topic_suffix);
                &control_topic
            }
        };
        if wire::single(&self.gateway, st, payload).is_err() {
            tracing::error!(seq = st.seq, "record could not be encoded");
            return;
        }
        self.publish(s, topic, payload, vec![st.key], 1);
    }

    /// Stages one publish of outbox records for [`send_staged`].
    fn publish(&self, s: &mut Session, topic: &str, payload: &[u8], keys: Vec<Key>, records: u64) {
        if !rumqttc::valid_topic(topic) {
            // Cannot happen with a validated topic prefix; the records stay in the outbox.
            tracing::error!(topic, "not a valid topic to publish on; records kept");
            return;
        }
        let publish = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        s.staged.push_back((publish, keys));
        Metrics::inc(&self.metrics.uplink_publishes);
        Metrics::add(&self.metrics.uplink_records_sent, records);
        Metrics::add(&self.metrics.uplink_bytes, payload.len() as u64);
    }

    fn publish_status(&self, s: &mut Session, state: &str) {
        let payload = self.status_payload(state);
        if s.client
            .try_publish(&self.topics.status, QoS::AtLeastOnce, true, payload)
            .is_ok()
        {
            s.queued.push_back(Vec::new());
        }
    }

    fn publish_health(&self, s: &mut Session) {
        let mut payload = crate::telemetry::health::message(
            &self.gateway,
            self.started.elapsed().as_secs(),
            &self.metrics.snapshot(),
            self.outbox.size_on_disk(),
            self.outbox.open_report(),
            &self.outbox.storage_status(),
        );
        if let Some(t) = &self.modbus_slaves {
            payload["modbus_slaves"] = t.to_json();
        }
        if let Ok(bytes) = serde_json::to_vec(&payload) {
            if s.client
                .try_publish(&self.topics.health, QoS::AtMostOnce, false, bytes)
                .is_ok()
            {
                s.queued.push_back(Vec::new());
            }
        }
    }

    /// Publishes the offline status (a graceful exit does not fire the last will) and
    /// disconnects, giving the broker a moment to acknowledge.
    async fn goodbye(&self, s: &mut Session, events: &mut rumqttc::EventLoop) {
        self.publish_status(s, "offline");
        let _bounded = tokio::time::timeout(Duration::from_secs(2), async {
            let mut sent_disconnect = false;
            loop {
                if !sent_disconnect && s.queued.is_empty() && s.inflight.is_empty() {
                    sent_disconnect = s.client.try_disconnect().is_ok();
                }
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => s.on_outgoing_publish(pkid),
                    // Removed with the rest when the session ends.
                    Ok(Event::Incoming(Packet::PubAck(a))) => s.on_puback(a.pkid),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Hands the staged publishes to rumqttc's state and writes them with one flush.
///
/// A turn of rumqttc's event loop writes one request per flush. A commit group's alerts, each
/// a publish of its own, went out as that many socket writes and turns; they now go in one.
/// Packet ids come from rumqttc's state, as for its own requests, and each publish awaits its
/// PUBACK under that id at once. A publish whose id is still in flight (a collision) is held by
/// rumqttc ([`Session::collided`]); the rest wait in `staged` until it has gone out.
async fn send_staged(s: &mut Session, events: &mut rumqttc::EventLoop) -> Result<(), String> {
    if s.staged.is_empty() || !mqtt_link::is_connected(events) {
        return Ok(());
    }
    let mut packets = Vec::with_capacity(s.staged.len());
    while s.collided.is_none() && !mqtt_link::collision_pending(events) {
        let Some((publish, keys)) = s.staged.pop_front() else {
            break;
        };
        match mqtt_link::stage_publish(events, publish)? {
            Staged::Sent { pkid, packet } => {
                s.await_ack(pkid, keys);
                packets.extend(packet);
            }
            Staged::Collided => s.collided = Some(keys),
        }
    }
    let timeout = mqtt_link::write_timeout(events);
    match tokio::time::timeout(timeout, mqtt_link::write_flushed(events, packets)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot write publishes: {e}")),
        Err(_) => Err(format!("writing publishes took over {timeout:?}")),
    }
}

async fn wait_connack(events: &mut rumqttc::EventLoop) -> Result<(), String> {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn build_transport(c: &CloudConfig) -> Result<Transport, UplinkError> {
    if !c.tls {
        return Ok(Transport::Tcp);
    }
    // ring, not aws-lc-rs: aws-lc-rs has failed to build for ARMv6/ARMv7 boards.
    // Installing fails only if a provider is already installed, which is what we want anyway.
    let _already = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let ca_path = c
        .ca_file
        .clone()
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let ca = std::fs::read(&ca_path)
        .map_err(|e| UplinkError::Tls(format!("cannot read CA file {}: {e}", ca_path.display())))?;
    let client_auth = match (&c.client_cert_file, &c.client_key_file) {
        (Some(cert), Some(key)) => Some((
            std::fs::read(cert)
                .map_err(|e| UplinkError::Tls(format!("cannot read {}: {e}", cert.display())))?,
            std::fs::read(key)
                .map_err(|e| UplinkError::Tls(format!("cannot read {}: {e}", key.display())))?,
        )),
        _ => None,
    };
    let alpn = (!c.alpn.is_empty()).then(|| c.alpn.iter().map(|p| p.as_bytes().to_vec()).collect());
    Ok(Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca,
        alpn,
        client_auth,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three publishes staged at once with room for two packet ids: the third collides with
    /// the first, rumqttc holds it until the first is acknowledged, and every record must
    /// still be acknowledged under its own publish.
    #[tokio::test]
    async fn staged_publishes_keep_their_records_through_a_packet_id_collision() {
        let broker = edgestream_sim::InProcessBroker::start().await.unwrap();
        let mut o = MqttOptions::new("collision-test", "127.0.0.1", broker.port());
        o.set_inflight(2);
        let (client, mut events) = AsyncClient::new(o, 10);
        wait_connack(&mut events).await.unwrap();
        let mut s = Session::new(client, 1, 0, 10);
        let keys: Vec<Key> = (1..=3u8).map(|i| [i; 9]).collect();
        for k in &keys {
            let p = rumqttc::Publish::new("t/collision", QoS::AtLeastOnce, k.to_vec());
            s.staged.push_back((p, vec![*k]));
        }
        send_staged(&mut s, &mut events).await.unwrap();
        assert_eq!(s.inflight.len(), 2, "two publishes fit the two packet ids");
        assert_eq!(s.collided, Some(vec![keys[2]]), "the third waits for an id");
        assert_eq!(s.in_window(), 3);
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            while s.acked.len() < 3 {
                match events.poll().await.unwrap() {
                    Event::Outgoing(Outgoing::Publish(pkid)) => s.on_outgoing_publish(pkid),
                    Event::Incoming(Packet::PubAck(a)) => s.on_puback(a.pkid),
                    _ => {}
                }
            }
        })
        .await;
        assert!(done.is_ok(), "not all acknowledged: {:?}", s.acked);
        assert_eq!(s.acked, keys, "each record acknowledged once, in order");
        assert!(s.inflight.is_empty() && s.collided.is_none() && s.queued.is_empty());
    }
}
