//! What the local source and the uplink share when they bypass rumqttc's request channel:
//! both hand packets to rumqttc's state themselves and write a whole round at once.

use rumqttc::{EventLoop, Packet, StateError};

/// Sets `TCP_NODELAY` on the connections `eventloop` makes. The agent coalesces its own
/// writes (PUBACKs of a commit group, publishes of a turn); Nagle's algorithm would only hold
/// each write until the peer ACKs the one before, which delayed ACKs stretch to tens of ms.
pub fn set_nodelay(eventloop: &mut EventLoop) {
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
}

/// Writes `packets` to the event loop's connection with one flush at the end. The event loop
/// must not be polled meanwhile (callers run between its turns); without a connection, the
/// connection counts as aborted.
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
