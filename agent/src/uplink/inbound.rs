//! A message from the cloud (a command or a rule bundle) and the token that acknowledges it
//! once its consumer has stored or refused it (manual acknowledgements: an unacknowledged
//! message is redelivered by the broker after a reconnect).

use tokio::sync::mpsc;

/// A message from the cloud and the handle that acknowledges it.
#[derive(Debug)]
pub struct InboundMsg {
    pub publish: rumqttc::Publish,
    pub ack: InboundAck,
}

/// What the uplink needs to write one PUBACK: the packet id, and which connection the message
/// came on (a packet id means nothing on another connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckToken {
    pub connection: u64,
    pub pkid: u16,
}

/// Acknowledges one cloud message on the connection it arrived on. The uplink writes the
/// PUBACK itself, with any others waiting, as soon as it gets the token: nothing is dropped for
/// lack of room (the tokens are as many as the messages the broker has in flight to us). If
/// that connection is gone, the acknowledgement is void and the broker redelivers: handle
/// duplicates.
#[derive(Debug)]
pub struct InboundAck {
    pub(crate) tx: mpsc::UnboundedSender<AckToken>,
    /// `None` for a QoS 0 message, which is not acknowledged.
    pub(crate) token: Option<AckToken>,
}

impl InboundAck {
    pub fn ack(self) {
        if let Some(token) = self.token {
            if self.tx.send(token).is_err() {
                tracing::debug!("uplink stopped; the broker will redeliver");
            }
        }
    }
}
