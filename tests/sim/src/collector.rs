//! The cloud side of a test: records what the gateway published.
//!
//! A [`CloudCollector`] subscribes to `{prefix}/{gateway}/#` (QoS 1) on a
//! broker and records every message as a [`CloudMessage`] in arrival order.
//! Payloads are parsed as `serde_json::Value` only, so the simulator does not
//! depend on the agent's types: a payload that is not JSON is recorded as a
//! JSON string holding its (lossy UTF-8) text.
//!
//! The collector uses a persistent session (fixed client id, clean session
//! off), so messages published while it is reconnecting, for example across
//! a broker restart, are delivered when it is back rather than lost: what it
//! misses is the gateway's fault, not the collector's. It resubscribes after
//! any reconnect that did not keep the session.
//!
//! It can also publish to the gateway (`commands`, `rules/set`) with
//! [`CloudCollector::publish`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest packet the collector sends (rule bundles go up to 256 KiB; leave
/// room).
pub const COLLECTOR_MAX_PACKET: usize = 1024 * 1024;
/// Largest packet the collector reads: anything MQTT can carry, so that an
/// oversized message a test sends under the gateway's topics (which the
/// collector also receives) cannot make it reconnect forever.
pub const COLLECTOR_MAX_READ: usize = 268_435_455 + 5;
/// Messages kept; past this the oldest are not dropped, new ones are counted
/// in [`CloudCollector::overflowed`] instead, so a test sees the problem.
pub const MAX_COLLECTED: usize = 2_000_000;
/// Requests the collector's client can queue for its event loop.
const REQUEST_CAPACITY: usize = 64;
/// Pause after an event loop error before polling again (rumqttc reconnects
/// in a tight loop otherwise).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// One message received from the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudMessage {
    /// Full topic.
    pub topic: String,
    /// Parsed payload.
    pub payload: Value,
    /// Whether the broker delivered it as a retained message.
    pub retained: bool,
}

#[derive(Debug, Default)]
struct Store {
    messages: Vec<CloudMessage>,
    overflowed: u64,
    connected: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct CloudCollector {
    base: String,
    client: AsyncClient,
    store: Arc<Mutex<Store>>,
    count: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl CloudCollector {
    /// Connects to `host:port` and subscribes to `{prefix}/{gateway}/#`.
    /// Returns once the subscription is acknowledged (or after 10 s, with an
    /// error).
    pub async fn connect(
        host: &str,
        port: u16,
        prefix: &str,
        gateway: &str,
    ) -> anyhow::Result<Self> {
        let base = format!("{prefix}/{gateway}");
        let filter = format!("{base}/#");
        // Unique per collector: two collectors on one broker with one id
        // would disconnect each other forever.
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let client_id = format!(
            "sim-collector-{gateway}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(COLLECTOR_MAX_READ, COLLECTOR_MAX_PACKET);
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let store = Arc::new(Mutex::new(Store::default()));
        let (count_tx, count) = watch::channel(0usize);
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let task = {
            let store = Arc::clone(&store);
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            lock(&store).connected = true;
                            if !ack.session_present {
                                // try_: the event loop is this task; awaiting
                                // a full request channel here would deadlock.
                                if let Err(e) =
                                    client.try_subscribe(filter.clone(), QoS::AtLeastOnce)
                                {
                                    tracing::warn!(error = %e, "collector could not subscribe");
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed_tx.send_replace(true);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let payload = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                                Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                            });
                            let n = {
                                let mut s = lock(&store);
                                if s.messages.len() < MAX_COLLECTED {
                                    s.messages.push(CloudMessage {
                                        topic: p.topic,
                                        payload,
                                        retained: p.retain,
                                    });
                                } else {
                                    s.overflowed += 1;
                                }
                                s.messages.len()
                            };
                            count_tx.send_replace(n);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            lock(&store).connected = false;
                            tracing::debug!(error = %e, "collector connection error");
                            tokio::time::sleep(RECONNECT_BACKOFF).await;
                        }
                    }
                }
            })
        };
        let ok = tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s)).await;
        if !matches!(ok, Ok(Ok(_))) {
            task.abort();
            anyhow::bail!("collector could not subscribe to {base}/# on {host}:{port}");
        }
        Ok(CloudCollector {
            base,
            client,
            store,
            count,
            task,
        })
    }

    /// `{prefix}/{gateway}`.
    pub fn base_topic(&self) -> &str {
        &self.base
    }

    /// Every message so far, in arrival order.
    pub fn messages(&self) -> Vec<CloudMessage> {
        lock(&self.store).messages.clone()
    }

    /// Number of messages so far.
    pub fn len(&self) -> usize {
        lock(&self.store).messages.len()
    }

    /// Whether nothing arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages not recorded because [`MAX_COLLECTED`] was reached.
    pub fn overflowed(&self) -> u64 {
        lock(&self.store).overflowed
    }

    /// Whether the collector is connected right now.
    pub fn is_connected(&self) -> bool {
        lock(&self.store).connected
    }

    /// Payloads (with retain flags) of messages on `{base}/{suffix}`.
    pub fn messages_on(&self, suffix: &str) -> Vec<CloudMessage> {
        let topic = format!("{}/{suffix}", self.base);
        lock(&self.store)
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }

    /// The readings of every `telemetry` batch, flattened, in arrival order.
    pub fn telemetry_readings(&self) -> Vec<Value> {
        flatten_readings(&self.messages_on("telemetry"))
    }

    /// Payloads on `alerts`.
    pub fn alerts(&self) -> Vec<Value> {
        self.payloads_on("alerts")
    }

    /// Payloads on `commands/outcomes`.
    pub fn outcomes(&self) -> Vec<Value> {
        self.payloads_on("commands/outcomes")
    }

    /// Payloads on `{base}/{suffix}`.
    pub fn payloads_on(&self, suffix: &str) -> Vec<Value> {
        self.messages_on(suffix)
            .into_iter()
            .map(|m| m.payload)
            .collect()
    }

    /// Waits until `pred` holds for the messages so far, re-checking after
    /// every new message; false after `timeout`.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[CloudMessage]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut count = self.count.clone();
        loop {
            if pred(&lock(&self.store).messages) {
                return true;
            }
            match tokio::time::timeout_at(deadline, count.changed()).await {
                Ok(Ok(())) => {}
                // Sender gone means the task ended: nothing more will come.
                Ok(Err(_)) | Err(_) => return pred(&lock(&self.store).messages),
            }
        }
    }

    /// Waits until at least `n` telemetry readings arrived.
    pub async fn wait_for_readings(&self, n: usize, timeout: Duration) -> bool {
        let topic = format!("{}/telemetry", self.base);
        self.wait_for(
            |msgs| {
                msgs.iter()
                    .filter(|m| m.topic == topic)
                    .map(|m| {
                        m.payload
                            .get("readings")
                            .and_then(Value::as_array)
                            .map_or(0, Vec::len)
                    })
                    .sum::<usize>()
                    >= n
            },
            timeout,
        )
        .await
    }

    /// Publishes `payload` to `{base}/{suffix}` with QoS 1. Returns once the
    /// request is queued for the collector's connection (not delivered).
    pub async fn publish(&self, suffix: &str, payload: &Value, retain: bool) -> anyhow::Result<()> {
        let topic = format!("{}/{suffix}", self.base);
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
            .await?;
        Ok(())
    }
}

impl Drop for CloudCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Flattens the `readings` arrays of telemetry batch messages.
pub fn flatten_readings(batches: &[CloudMessage]) -> Vec<Value> {
    batches
        .iter()
        .filter_map(|m| m.payload.get("readings").and_then(Value::as_array))
        .flatten()
        .cloned()
        .collect()
}
