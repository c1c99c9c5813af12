//! The local MQTT source: subscribes to the sensors' broker and turns each publish on
//! `.../{device}/{metric}` into a [`Reading`].
//!
//! Delivery contract with the local broker (with automatic acknowledgements and a clean
//! session, a broker counts as delivered every reading the agent had received but not stored
//! when it crashed, and drops what arrives while it restarts):
//! - fixed client id and `clean_session = false`, so the broker keeps our subscription and
//!   queues readings while the agent is down or restarting;
//! - manual acknowledgements: a QoS 1 reading is PUBACKed only after what came of it is
//!   durable in the outbox, so a crash before that makes the broker redeliver it; the rules
//!   stage sends each group commit's acknowledgements here, and this task writes them in bulk
//!   ([`write_acks`]);
//! - every publish, accepted or rejected, is acknowledged in arrival order (MQTT 3.1.1 §4.6);
//! - device replies to commands (`devices/{device}/replies`) go to the command router, which
//!   acknowledges each once its outcome is stored; the agent's own commands
//!   (`devices/{device}/commands`), seen if a configured filter also matches them, are
//!   acknowledged and skipped;
//! - on shutdown the source stops forwarding at once but keeps its connection until the rules
//!   stage has acknowledged everything it was given; publishes that arrive meanwhile are not
//!   acknowledged, so the broker redelivers them on the next start.

use std::time::Duration;

use edgestream_protocol::types::{DeviceId, MetricName};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::reading::{now_ms, Ack, Reading, SourceMsg};
use crate::backoff::Backoff;
use crate::commands::routes::DeviceEvent;
use crate::config::Config;
use crate::conn_log::ConnLog;
use crate::deadletter::RejectSampler;
use crate::mqtt_link::{self, set_nodelay, write_flushed};
use crate::telemetry::metrics::Metrics;
use crate::uplink::topics::device_metric;
use crate::validation::valid_name;

/// Largest payload the agent takes from the local broker (a reading is at most the
/// protocol's 1 KiB, a command reply far less). A larger one is read whole (see
/// `mqtt_link::MAX_READ_PACKET`), acknowledged in order with the rest, counted
/// (`local_oversized`) and sampled to the dead-letter topic, never decoded.
pub const MAX_LOCAL_PAYLOAD: usize = 64 * 1024;
const SOURCE: &str = "local-mqtt";
/// Longest accepted device or metric name (the protocol's limits).
const MAX_NAME: usize = edgestream_protocol::limits::MAX_DEVICE_LEN;

/// Filter for device replies to commands (README, "Topics").
pub const REPLY_FILTER: &str = "devices/+/replies";

#[derive(Debug)]
pub struct LocalMqttSource {
    options: MqttOptions,
    topics: Vec<String>,
    qos: QoS,
    /// Where device replies go (`None`: they are not subscribed to).
    replies: Option<mpsc::Sender<DeviceEvent>>,
    /// Acknowledgement batches from the rules stage (`None`: nobody acknowledges here).
    acks: Option<mpsc::Receiver<Vec<Ack>>>,
}

/// What a local topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalTopic {
    Reading,
    Reply,
    OwnCommand,
}

fn classify(topic: &str) -> LocalTopic {
    let mut levels = topic.split('/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("devices"), Some(_), Some("replies"), None) => LocalTopic::Reply,
        (Some("devices"), Some(_), Some("commands"), None) => LocalTopic::OwnCommand,
        _ => LocalTopic::Reading,
    }
}

/// Why a local publish was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectReason {
    #[error("topic does not end in /{{device}}/{{metric}}")]
    Topic,
    #[error("device or metric name is empty, longer than {MAX_NAME} bytes, or not printable ASCII without spaces, '/', '+' and '#'")]
    Name,
    /// The payload broke the protocol's reading contract (protocol/README.md, section 3).
    #[error("{0}")]
    Payload(edgestream_protocol::json::PayloadError),
    /// A reply on `devices/{device}/replies` that is not a valid command outcome.
    #[error("command reply: {0}")]
    Reply(String),
}

/// What the rules stage needs to acknowledge a publish: its packet id and QoS, without the
/// topic and payload. The payload is a slice of rumqttc's read buffer; keeping thousands of
/// them queued for acknowledgement would keep those buffers alive (seen: ~90 MiB RSS when a
/// broker with no in-flight limit floods the agent).
fn ack_token(p: &rumqttc::Publish) -> Ack {
    Ack::Mqtt {
        pkid: p.pkid,
        qos: p.qos,
    }
}

/// Writes the PUBACKs of `batch`, and of any further batches already queued, in two socket
/// writes.
///
/// rumqttc's own path (`AsyncClient::ack`) takes one request per turn of its event loop and
/// writes each PUBACK with its own syscall; the rules stage acknowledges a whole group commit
/// at once (about a hundred readings under load), so this saves a write, a turn of the event
/// loop and a wake-up of the broker per reading. The event loop is not being polled here, so
/// its connection and state can be used directly.
///
/// The last PUBACK goes in a write of its own: rumqttd 0.20 (the in-process broker of `demo`
/// and `bench`) acts on the acknowledgements of one read only when the connection's next
/// packet arrives, so with all of them in one write the window it frees (a fixed 100
/// publishes) was refilled one commit late, and the bench fell from ~105,000 to ~14,000
/// readings/s. The lone PUBACK is that next packet.
///
/// Acknowledgements that cannot be written (no connection, or it failed) are dropped: the
/// broker redelivers those publishes (a duplicate in the outbox, never a loss).
async fn write_acks(
    eventloop: &mut rumqttc::EventLoop,
    mut acks: Vec<Ack>,
    more: &mut mpsc::Receiver<Vec<Ack>>,
) {
    while let Ok(next) = more.try_recv() {
        acks.extend(next);
    }
    if !mqtt_link::is_connected(eventloop) {
        return;
    }
    let result =
        match mqtt_link::ack_packets(eventloop, acks.into_iter().filter_map(Ack::to_request)) {
            Ok(packets) => {
                let write = write_last_alone(eventloop, packets);
                match tokio::time::timeout(ACK_WRITE_TIMEOUT, write).await {
                    Ok(r) => r,
                    Err(_) => Err(rumqttc::StateError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "writing acknowledgements timed out",
                    ))),
                }
            }
            Err(e) => Err(e),
        };
    if let Err(e) = result {
        // Drop the connection the way rumqttc does after an error, so that the next poll
        // reconnects (and reports it) instead of writing into a broken socket.
        tracing::warn!(error = %e, "cannot write acknowledgements; reconnecting");
        eventloop.clean();
    }
}

/// Writes `packets` with one flush, then the last of them with a flush of its own (see
/// [`write_acks`]).
async fn write_last_alone(
    eventloop: &mut rumqttc::EventLoop,
    mut packets: Vec<Packet>,
) -> Result<(), rumqttc::StateError> {
    let Some(last) = packets.pop() else {
        return Ok(());
    };
    if !packets.is_empty() {
        write_flushed(eventloop, packets).await?;
    }
    write_flushed(eventloop, [last]).await
}

/// How long writing one round of acknowledgements may take before the connection is dropped
/// (as rumqttc does for its own writes).
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Decodes a reply on `devices/{device}/replies`: a command outcome for that same device (a
/// device answers only for itself, so a reply naming another device is refused).
fn decode_reply(
    topic: &str,
    payload: &[u8],
) -> Result<edgestream_protocol::types::CommandOutcome, String> {
    let outcome = edgestream_protocol::json::decode_outcome(payload).map_err(|e| e.to_string())?;
    let on = topic.split('/').nth(1).unwrap_or_default();
    if outcome.device.as_str() != on {
        return Err(format!(
            "names device `{}` but came on the replies topic of `{on}`",
            outcome.device
        ));
    }
    Ok(outcome)
}

/// Turns one publish into a reading or a rejection reason.
pub fn decode(topic: &str, payload: &[u8]) -> Result<Reading, RejectReason> {
    let (device, metric) = device_metric(topic).ok_or(RejectReason::Topic)?;
    if !valid_name(device, MAX_NAME) || !valid_name(metric, MAX_NAME) {
        return Err(RejectReason::Name);
    }
    let r =
        edgestream_protocol::json::decode_local_reading(payload).map_err(RejectReason::Payload)?;
    // `valid_name` bounds both names to what the protocol's types hold.
    let device = DeviceId::try_from(device).map_err(|_| RejectReason::Name)?;
    let metric = MetricName::try_from(metric).map_err(|_| RejectReason::Name)?;
    Ok(Reading {
        device,
        metric,
        value: r.value,
        ts_ms: r.ts.unwrap_or_else(now_ms),
    })
}

impl LocalMqttSource {
    pub fn new(config: &Config) -> Self {
        let l = &config.local;
        let mut options = MqttOptions::new(config.local_client_id(), l.host.clone(), l.port);
        options
            .set_keep_alive(Duration::from_secs(l.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(mqtt_link::MAX_READ_PACKET, 64 * 1024)
            .set_request_channel_capacity(1024);
        if let (Some(u), Some(p)) = (&l.username, &l.password) {
            options.set_credentials(u.clone(), p.clone());
        }
        Self {
            options,
            topics: l.topics.clone(),
            qos: if l.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            replies: None,
            acks: None,
        }
    }

    /// Subscribes to device replies ([`REPLY_FILTER`], QoS 1) and hands them to `tx`.
    pub fn with_replies(mut self, tx: mpsc::Sender<DeviceEvent>) -> Self {
        self.replies = Some(tx);
        self
    }

    /// Writes the acknowledgements the rules stage sends on `rx` (see [`write_acks`]).
    pub fn with_acks(mut self, rx: mpsc::Receiver<Vec<Ack>>) -> Self {
        self.acks = Some(rx);
        self
    }

    /// The client and event loop for [`LocalMqttSource::run`]; the command router acknowledges
    /// device replies through a clone of the client (the rules stage through [`Self::with_acks`]).
    ///
    /// The connection sets `TCP_NODELAY`: the agent writes its PUBACKs in bulk itself
    /// ([`write_acks`]), and with Nagle's algorithm the second of two back-to-back small writes
    /// waits for the peer's ACK of the first, which delayed ACKs can hold for tens of ms.
    pub fn client_pair(&self) -> (AsyncClient, rumqttc::EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 1024);
        set_nodelay(&mut eventloop);
        (client, eventloop)
    }

    /// Runs until `stop_intake` and then `release` are cancelled (see the module doc).
    pub async fn run(
        mut self,
        client: AsyncClient,
        mut eventloop: rumqttc::EventLoop,
        out: mpsc::Sender<SourceMsg>,
        metrics: std::sync::Arc<Metrics>,
        stop_intake: CancellationToken,
        release: CancellationToken,
    ) {
        let mut out = Some(out);
        let mut acks = self.acks.take();
        let mut sampler = RejectSampler::new(SOURCE);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut connected = false;
        let mut reachability = ConnLog::new("local broker");
        loop {
            // Cancellation safety: `poll()` may be dropped mid-read; rumqttc keeps partial
            // packets in its buffers and resumes on the next call.
            let event = tokio::select! {
                biased;
                _ = release.cancelled() => break,
                _ = stop_intake.cancelled(), if out.is_some() => {
                    // Dropping our sender lets the rules stage drain and finish.
                    out = None;
                    continue;
                }
                batch = crate::select_loop::recv_or_pending(&mut acks) => {
                    match (batch, acks.as_mut()) {
                        (Some(batch), Some(rx)) => write_acks(&mut eventloop, batch, rx).await,
                        _ => acks = None,
                    }
                    continue;
                }
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    reachability.connected();
                    Metrics::inc(&metrics.local_connects);
                    Metrics::set(&metrics.local_online, 1);
                    if !connected {
                        tracing::info!(
                            session_present = ack.session_present,
                            "connected to local broker"
                        );
                    }
                    connected = true;
                    // Always (re)subscribe: harmless with a kept session, needed without one.
                    for t in &self.topics {
                        if let Err(e) = client.try_subscribe(t.clone(), self.qos) {
                            tracing::error!(topic = %t, error = %e, "cannot queue subscription");
                        }
                    }
                    if self.replies.is_some() {
                        if let Err(e) = client.try_subscribe(REPLY_FILTER, QoS::AtLeastOnce) {
                            tracing::error!(topic = REPLY_FILTER, error = %e, "cannot queue subscription");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        tracing::error!(refused, "local broker refused a subscription");
                    } else {
                        tracing::info!(topics = ?self.topics, "subscribed to local topics");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(tx) = &out else {
                        // Shutting down: not acknowledged, so the broker redelivers it later.
                        continue;
                    };
                    let ack = (p.qos != QoS::AtMostOnce).then_some(());
                    if p.payload.len() > MAX_LOCAL_PAYLOAD {
                        // A rejected publish like any other, and counted as oversized too.
                        Metrics::inc(&metrics.rejected_mqtt);
                        Metrics::inc(&metrics.local_oversized);
                        let why = format!(
                            "payload of {} bytes is over the local limit of {MAX_LOCAL_PAYLOAD} bytes",
                            p.payload.len()
                        );
                        let sample = sampler.reject(&p.topic, &why, &p.payload);
                        if sample.is_none() {
                            Metrics::inc(&metrics.deadletters_suppressed);
                        }
                        let msg = SourceMsg::Rejected(sample, ack.map(|_| ack_token(&p)));
                        tokio::select! {
                            biased;
                            _ = release.cancelled() => break,
                            r = tx.send(msg) => if r.is_err() { out = None; }
                        }
                        continue;
                    }
                    let kind = classify(&p.topic);
                    if kind == LocalTopic::Reply {
                        if let (Some(replies), Ok(outcome)) =
                            (&self.replies, decode_reply(&p.topic, &p.payload))
                        {
                            let reply = DeviceEvent::Reply {
                                outcome: Box::new(outcome),
                                ack: ack.map(|_| ack_token(&p)),
                            };
                            // Block (full-policy): replies are as rare as commands.
                            tokio::select! {
                                biased;
                                _ = release.cancelled() => break,
                                r = replies.send(reply) => if r.is_err() {
                                    tracing::warn!("command router has stopped; reply left unacknowledged");
                                }
                            }
                            continue;
                        }
                    }
                    let decoded = match kind {
                        LocalTopic::Reading => decode(&p.topic, &p.payload),
                        LocalTopic::Reply => Err(RejectReason::Reply(
                            decode_reply(&p.topic, &p.payload)
                                .err()
                                .unwrap_or_else(|| "no command router".to_string()),
                        )),
                        LocalTopic::OwnCommand => {
                            // Our own command echoed by a wide filter: only acknowledge it.
                            let msg = SourceMsg::Rejected(None, ack.map(|_| ack_token(&p)));
                            tokio::select! {
                                biased;
                                _ = release.cancelled() => break,
                                r = tx.send(msg) => if r.is_err() { out = None; }
                            }
                            continue;
                        }
                    };
                    let msg = match decoded {
                        Ok(reading) => {
                            Metrics::inc(&metrics.readings_in_mqtt);
                            SourceMsg::Reading(reading, ack.map(|_| ack_token(&p)))
                        }
                        Err(e) => {
                            Metrics::inc(&metrics.rejected_mqtt);
                            let sample = sampler.reject(&p.topic, &e.to_string(), &p.payload);
                            if sample.is_none() {
                                Metrics::inc(&metrics.deadletters_suppressed);
                            }
                            SourceMsg::Rejected(sample, ack.map(|_| ack_token(&p)))
                        }
                    };
                    // Block (full-policy): backpressure reaches the broker through TCP.
                    tokio::select! {
                        biased;
                        _ = release.cancelled() => break,
                        r = tx.send(msg) => if r.is_err() {
                            tracing::error!("rules stage has stopped; no longer taking readings");
                            out = None;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "lost local broker; reconnecting with backoff");
                    } else {
                        reachability.failed(&e.to_string());
                    }
                    Metrics::inc(&metrics.local_connect_failures);
                    Metrics::set(&metrics.local_online, 0);
                    connected = false;
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = release.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // The rules stage has finished: its last acknowledgements are queued by now.
        if let Some(rx) = acks.as_mut() {
            while let Ok(batch) = rx.try_recv() {
                write_acks(&mut eventloop, batch, rx).await;
            }
        }
        if connected {
            if let Err(e) = client.try_disconnect() {
                tracing::debug!(error = %e, "disconnect request not queued");
            }
            // Let the event loop send pending acks and the DISCONNECT.
            let _flush = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(ev) = eventloop.poll().await {
                    if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        tracing::info!("local source stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgestream_protocol::json::PayloadError;

    #[test]
    fn accepts_objects_and_bare_numbers() {
        let r = decode("sensors/b-1/temp", br#"{"value": 23.5, "ts": 17}"#).unwrap();
        assert_eq!(
            (r.device.as_str(), r.metric.as_str(), r.value, r.ts_ms),
            ("b-1", "temp", 23.5, 17)
        );
        assert_eq!(decode("sensors/b-1/temp", b"42").unwrap().value, 42.0);
    }

    #[test]
    fn rejects_with_a_reason() {
        assert!(matches!(
            decode("s/d/m", b"hot"),
            Err(RejectReason::Payload(PayloadError::NotJson { .. }))
        ));
        assert!(matches!(
            decode("s/d/m", &[b'1'; 5000]),
            Err(RejectReason::Payload(PayloadError::TooLarge { len: 5000 }))
        ));
        assert_eq!(
            decode("sensors/a b/t", b"1").unwrap_err(),
            RejectReason::Name
        );
        assert_eq!(decode("t", b"1").unwrap_err(), RejectReason::Topic);
    }
}
