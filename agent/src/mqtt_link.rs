//! The one place where the agent goes past rumqttc's request channel. Everything here uses
//! items rumqttc 0.25 exports (`EventLoop::state`, `EventLoop::network`,
//! `MqttState::handle_outgoing_packet`, `MqttState::events`, `MqttState::collision`), but as
//! the event loop itself uses them, not as its documented API: an upgrade may change them
//! without notice, so every behaviour relied on is written down here and pinned by the tests
//! at the bottom of this file, which fail if it changes.
//!
//! What the agent needs that the request channel cannot give:
//! 1. **Many packets, one flush.** A turn of rumqttc's event loop writes one request and
//!    flushes. The local source acknowledges a whole commit group (hundreds of PUBACKs) and the
//!    uplink sends a turn's publishes; one write each, instead of one per packet, is most of
//!    the agent's CPU per reading at 10,000 readings/s. [`write_flushed`] writes through the
//!    event loop's own connection between two of its turns.
//! 2. **The packet id of a publish as it is sent.** The uplink removes a record from the
//!    outbox only on the PUBACK for that record's packet id. [`stage_publish`] registers a
//!    publish with rumqttc's state (which assigns the id and tracks the PUBACK, exactly as for
//!    its own requests) and says which id it got, or that the id was still in flight
//!    (a collision: rumqttc holds the publish and sends it when the id frees up).
//! 3. **Acknowledgements registered with the state.** [`ack_packets`] turns manual
//!    acknowledgements into packets the way rumqttc would (QoS 2 needs the state to know), and
//!    drops the `Outgoing` events that nobody reads.
//!
//! Callers must not poll the event loop while one of these runs: they run between its turns.

use std::time::Duration;

use rumqttc::{Event, EventLoop, Outgoing, Packet, Publish, Request, StateError};

/// Largest packet rumqttc reads on either connection: the largest an MQTT 3.1.1 broker can
/// send (a remaining length of 268,435,455 bytes, plus the fixed header). rumqttc fails a
/// connection on a packet over its limit, and a persistent session then redelivers that
/// packet on every reconnect: with the limit at the protocol's maximum no packet can do that,
/// and the agent refuses oversized messages itself, by its own (much smaller) limits, after
/// reading them. The price is memory: rumqttc buffers a packet whole, so a broker that
/// forwards huge messages makes the agent hold one briefly. Cap that at the broker
/// (mosquitto's `message_size_limit`, docs/configuration.md).
pub const MAX_READ_PACKET: usize = 268_435_455 + 5;

/// Sets `TCP_NODELAY` on the connections `eventloop` makes. The agent coalesces its own
/// writes (PUBACKs of a commit group, publishes of a turn); Nagle's algorithm would only hold
/// each write until the peer ACKs the one before, which delayed ACKs stretch to tens of ms.
pub fn set_nodelay(eventloop: &mut EventLoop) {
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
}

/// Whether the event loop holds a connection now.
pub fn is_connected(eventloop: &EventLoop) -> bool {
    eventloop.network.is_some()
}

/// Whether rumqttc has events buffered that its next `poll` returns without reading the
/// socket (a read that brought many PUBACKs).
pub fn has_buffered_events(eventloop: &EventLoop) -> bool {
    !eventloop.state.events.is_empty()
}

/// Whether rumqttc holds a publish whose packet id was still in flight; until it has gone
/// out, no other publish may be staged (rumqttc keeps one such publish at most).
pub fn collision_pending(eventloop: &EventLoop) -> bool {
    eventloop.state.collision.is_some()
}

/// How long one write may take before the connection counts as lost (rumqttc's own limit).
pub fn write_timeout(eventloop: &EventLoop) -> Duration {
    Duration::from_secs(eventloop.network_options().connection_timeout())
}

/// What became of a publish handed to rumqttc's state.
#[derive(Debug)]
pub enum Staged {
    /// Registered under `pkid` (0 for QoS 0); `packet` is to be written.
    Sent { pkid: u16, packet: Option<Packet> },
    /// Its packet id was still in flight: rumqttc holds it and reports
    /// `Outgoing::Publish(pkid)` from a later `poll` when it goes out.
    Collided,
}

/// Registers `publish` with rumqttc's state (see the module doc, point 2).
pub fn stage_publish(eventloop: &mut EventLoop, publish: Publish) -> Result<Staged, String> {
    let packet = eventloop
        .state
        .handle_outgoing_packet(Request::Publish(publish))
        .map_err(|e| format!("cannot send a publish: {e}"))?;
    // The event rumqttc queued for this publish is answered here, not by a later turn.
    match eventloop.state.events.pop_back() {
        Some(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Staged::Sent { pkid, packet }),
        Some(Event::Outgoing(Outgoing::AwaitAck(_))) => Ok(Staged::Collided),
        other => Err(format!(
            "unexpected event after a publish: {other:?}; reconnecting"
        )),
    }
}

/// The packets that carry `requests` (acknowledgements), registered with rumqttc's state
/// (see the module doc, point 3).
pub fn ack_packets(
    eventloop: &mut EventLoop,
    requests: impl IntoIterator<Item = Request>,
) -> Result<Vec<Packet>, StateError> {
    let state = &mut eventloop.state;
    let packets = requests
        .into_iter()
        .filter_map(|request| state.handle_outgoing_packet(request).transpose())
        .collect();
    // Each acknowledgement left an `Outgoing` event that nobody reads: drop them rather than
    // spend a turn of the event loop on each.
    while matches!(
        state.events.back(),
        Some(Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_)))
    ) {
        state.events.pop_back();
    }
    packets
}

/// Writes `packets` to the event loop's connection with one flush at the end. Without a
/// connection, the connection counts as aborted.
pub async fn write_flushed(
    eventloop: &mut EventLoop,
    packets: impl IntoIterator<Item = Packet>,
) -> Result<(), StateError> {
    let Some(network) = eventloop.network.as_mut() else {
        return Err(StateError::ConnectionAborted);
    };
    for packet in packets {
        network.write(packet).await?;
    }
    network.flush().await
}

#[cfg(test)]
mod tests {
    //! These pin the rumqttc behaviour the module doc lists, against a real broker. If one
    //! fails after an upgrade, the agent's use of that behaviour must be revisited before the
    //! upgrade lands.

    use super::*;
    use rumqttc::{AsyncClient, MqttOptions, QoS};

    async fn connected(port: u16, id: &str) -> (AsyncClient, EventLoop) {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_inflight(2);
        let (client, mut events) = AsyncClient::new(o, 10);
        set_nodelay(&mut events);
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        (client, events)
    }

    #[tokio::test]
    async fn staged_publishes_get_packet_ids_and_their_pubacks_arrive_on_poll() {
        let broker = edgestream_sim::InProcessBroker::start().await.unwrap();
        let (_client, mut events) = connected(broker.port(), "pin-ids").await;
        assert!(is_connected(&events));
        assert!(!has_buffered_events(&events));
        let mut packets = Vec::new();
        let mut ids = Vec::new();
        for i in 0..2u8 {
            let p = Publish::new("pin/ids", QoS::AtLeastOnce, vec![i]);
            match stage_publish(&mut events, p).unwrap() {
                Staged::Sent { pkid, packet } => {
                    ids.push(pkid);
                    packets.extend(packet);
                }
                Staged::Collided => panic!("no collision expected with a free window"),
            }
        }
        assert_eq!(ids, vec![1, 2], "rumqttc assigns ids from 1, in order");
        assert_eq!(
            packets.len(),
            2,
            "each staged publish yields its packet to write"
        );
        // A third publish with an in-flight window of 2: id 1 is still awaiting its PUBACK,
        // so rumqttc holds it as a collision.
        let third = Publish::new("pin/ids", QoS::AtLeastOnce, vec![3]);
        assert!(matches!(
            stage_publish(&mut events, third).unwrap(),
            Staged::Collided
        ));
        assert!(collision_pending(&events));
        write_flushed(&mut events, packets).await.unwrap();
        let mut acked = Vec::new();
        let mut resent = None;
        while acked.len() < 2 || resent.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), events.poll())
                .await
                .expect("the broker answers within 5 s")
                .unwrap()
            {
                Event::Incoming(Packet::PubAck(a)) => acked.push(a.pkid),
                Event::Outgoing(Outgoing::Publish(pkid)) => resent = Some(pkid),
                _ => {}
            }
        }
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 2], "PUBACKs come back under the staged ids");
        assert_eq!(
            resent,
            Some(1),
            "the collided publish goes out under the freed id"
        );
        assert!(!collision_pending(&events));
    }

    #[tokio::test]
    async fn acknowledgements_become_packets_and_leave_no_events() {
        let broker = edgestream_sim::InProcessBroker::start().await.unwrap();
        let (_client, mut events) = connected(broker.port(), "pin-acks").await;
        let requests = (1..=3).map(|pkid| Request::PubAck(rumqttc::PubAck::new(pkid)));
        let packets = ack_packets(&mut events, requests).unwrap();
        assert_eq!(packets.len(), 3);
        assert!(packets.iter().all(|p| matches!(p, Packet::PubAck(_))));
        assert!(
            !has_buffered_events(&events),
            "the Outgoing::PubAck events are dropped"
        );
    }

    #[tokio::test]
    async fn writing_without_a_connection_is_an_aborted_connection() {
        let o = MqttOptions::new("pin-none", "127.0.0.1", 9);
        let (_client, mut events) = AsyncClient::new(o, 10);
        assert!(!is_connected(&events));
        let err = write_flushed(&mut events, []).await.unwrap_err();
        assert!(matches!(err, StateError::ConnectionAborted));
    }
}
