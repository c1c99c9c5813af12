//! Sources turn outside input into [`SourceMsg`]s for the rules stage.
//!
//! Each source owns its transport and hands every input, accepted or rejected, to the rules
//! stage over one bounded channel ([`SOURCE_CHANNEL_CAPACITY`], full-policy **block**: a slow
//! disk slows the sources, which slows the brokers and devices, and nothing is dropped). A
//! source also carries the token that acknowledges its input (an MQTT PUBACK) so that the rules
//! stage can acknowledge only after the outbox holds the result.

use edgestream_protocol::types::{DeviceId, MetricName};

use crate::outbox::record::DeadLetterRecord;

/// Capacity of the channel from all sources to the rules stage (readings).
///
/// Half a group (`rules_stage::stage::MAX_GROUP`) is enough to keep the stage busy: it takes
/// what is queued while the previous group's flush runs, and a broker holds the rest. Every
/// queued reading is live memory (about 140 bytes, its names inline) that, under a flood, also
/// fragments the allocator: flat out, peak RSS was lowest at 512 (about 18 MiB against 20-24 at
/// 4096), with the same throughput.
pub const SOURCE_CHANNEL_CAPACITY: usize = 512;

/// A reading as it arrives, before rules. Its names are bounded by the protocol and kept
/// inline, so the reading itself allocates nothing between a source and the outbox (as two
/// `String`s they were a fifth of the agent's calls to `malloc` flat out).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: DeviceId,
    pub metric: MetricName,
    pub value: f64,
    pub ts_ms: u64,
}

/// Capacity, in batches, of the channel that carries the rules stage's acknowledgements to the
/// local source, which writes each batch's PUBACKs with one socket write. Full-policy: the stage
/// keeps them, in order, and offers them again (never awaits: see `RulesStage::unacked`).
pub const ACK_BATCHES: usize = 64;

/// Acknowledges an input once the outbox holds what came of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// A QoS 1 publish from the local broker: its packet id and QoS are all its PUBACK needs.
    /// Four bytes, because the rules stage may hold a great many of them while a broker with
    /// no in-flight limit keeps sending (seen: 68-81 MiB peak RSS against mosquitto with a
    /// whole, empty `rumqttc::Publish` per queued acknowledgement).
    Mqtt { pkid: u16, qos: rumqttc::QoS },
}

impl Ack {
    /// What rumqttc's `try_ack` takes for this acknowledgement; an empty `Publish` allocates
    /// nothing.
    pub fn to_publish(self) -> rumqttc::Publish {
        let Ack::Mqtt { pkid, qos } = self;
        let mut p = rumqttc::Publish::new("", qos, Vec::new());
        p.pkid = pkid;
        p
    }

    /// The packet that acknowledges it: PUBACK for QoS 1, PUBREC for QoS 2, none for QoS 0.
    pub fn to_request(self) -> Option<rumqttc::Request> {
        let Ack::Mqtt { pkid, qos } = self;
        match qos {
            rumqttc::QoS::AtMostOnce => None,
            rumqttc::QoS::AtLeastOnce => Some(rumqttc::Request::PubAck(rumqttc::PubAck::new(pkid))),
            rumqttc::QoS::ExactlyOnce => Some(rumqttc::Request::PubRec(rumqttc::PubRec::new(pkid))),
        }
    }
}

#[derive(Debug)]
pub enum SourceMsg {
    Reading(Reading, Option<Ack>),
    /// Malformed input; a sample of it goes upstream as a dead letter.
    Rejected(Option<DeadLetterRecord>, Option<Ack>),
}

/// Milliseconds since the Unix epoch, for readings that carry no timestamp.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
