//! A message from the cloud (a command or a rule bundle) and the token that acknowledges it
//! once its consumer has stored or refused it (manual acknowledgements: an unacknowledged
//! message is redelivered by the broker after a reconnect).

use rumqttc::AsyncClient;

/// A message from the cloud and the handle that acknowledges it.
#[derive(Debug)]
pub struct InboundMsg {
    pub publish: rumqttc::Publish,
    pub ack: InboundAck,
}

/// Acknowledges one cloud message on the connection it arrived on. If that connection is
/// gone, the acknowledgement is lost and the broker redelivers: handle duplicates.
#[derive(Debug)]
pub struct InboundAck {
    pub(crate) client: AsyncClient,
    pub(crate) publish: rumqttc::Publish,
}

impl InboundAck {
    pub fn ack(self) {
        if let Err(e) = self.client.try_ack(&self.publish) {
            tracing::debug!(error = %e, "cloud PUBACK not queued; the broker will redeliver");
        }
    }
}
