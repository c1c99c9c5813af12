//! A minimal MQTT 3.1.1 client connection, as a small sensor's firmware has.
//!
//! Simulated devices need one thing rumqttc's event loop does not give: the
//! exact reading behind every PUBACK. rumqttc reports only packet ids and
//! silently discards queued publishes on a clean reconnect, so mapping ids
//! back to readings from outside is guesswork. Here the device assigns packet
//! ids itself and sees every packet, so "acknowledged by the broker" is a fact.
//!
//! The packets themselves are encoded and decoded by rumqttc's public
//! `mqttbytes` (v4): this module only frames a connection around them, and it is
//! the one MQTT encoder of the tools (devices, the bench's load generator).
//! Every packet is bounded by [`MAX_PACKET`]; a larger one is a protocol error
//! that closes the connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{self, QoS};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest packet a device sends or accepts (commands are small; this leaves
/// room for a long `args` object).
pub const MAX_PACKET: usize = 256 * 1024;

/// Errors of a device connection; all of them mean "reconnect".
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket error or EOF.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The broker sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker refused the connection with this CONNACK return code.
    #[error("connection refused, return code {0}")]
    Refused(u8),
    /// No CONNACK or SUBACK in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// A packet received from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK: session present flag and return code.
    ConnAck {
        /// Whether the broker kept a session.
        session_present: bool,
        /// 0 = accepted.
        code: u8,
    },
    /// PUBLISH from the broker.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload bytes.
        payload: Vec<u8>,
        /// QoS 0..=2.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Retain flag.
        retain: bool,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck(u16),
    /// SUBACK with the granted QoS per filter.
    SubAck(u16, Vec<u8>),
    /// PINGRESP.
    PingResp,
    /// Anything else (ignored by devices).
    Other(u8),
}

/// Appends one packet, encoded by rumqttc's own `mqttbytes`, to `buf`. Every packet the
/// tools write is small and well-formed (topics and client ids are ours), so an encoding
/// error is a bug in the caller.
fn put(buf: &mut BytesMut, packet: &Packet) {
    if let Err(e) = packet.write(buf, MAX_PACKET) {
        panic!("cannot encode {packet:?}: {e}");
    }
}

fn encode(packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    put(&mut buf, packet);
    buf.to_vec()
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Encodes CONNECT (MQTT 3.1.1, no credentials, no will).
pub fn connect(client_id: &str, clean_session: bool, keep_alive: Duration) -> Vec<u8> {
    let mut c = Connect::new(client_id);
    c.clean_session = clean_session;
    c.keep_alive = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
    encode(&Packet::Connect(c))
}

/// Appends PUBLISH to `buf` (QoS 0 needs `pkid` 0): the load generator batches many
/// publishes into one socket write.
pub fn put_publish(
    buf: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos_level: u8,
    pkid: u16,
    retain: bool,
) {
    let mut p = Publish::from_bytes(topic, qos(qos_level), Bytes::copy_from_slice(payload));
    p.pkid = pkid;
    p.retain = retain;
    put(buf, &Packet::Publish(p));
}

/// Encodes PUBLISH (QoS 0 needs `pkid` 0).
pub fn publish(topic: &str, payload: &[u8], qos_level: u8, pkid: u16, retain: bool) -> Vec<u8> {
    let mut buf = BytesMut::new();
    put_publish(&mut buf, topic, payload, qos_level, pkid, retain);
    buf.to_vec()
}

/// Encodes PUBACK.
pub fn puback(pkid: u16) -> Vec<u8> {
    encode(&Packet::PubAck(PubAck::new(pkid)))
}

/// Encodes SUBSCRIBE for one filter.
pub fn subscribe(pkid: u16, filter: &str, qos_level: u8) -> Vec<u8> {
    let mut s = Subscribe::new(filter, qos(qos_level));
    s.pkid = pkid;
    encode(&Packet::Subscribe(s))
}

/// Encodes PINGREQ.
pub fn pingreq() -> Vec<u8> {
    encode(&Packet::PingReq)
}

/// Encodes DISCONNECT.
pub fn disconnect() -> Vec<u8> {
    encode(&Packet::Disconnect)
}

/// Reads packets from the broker side of a connection.
#[derive(Debug)]
pub struct PacketReader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl PacketReader {
    /// Reads from `read`, a connection already past CONNECT (or one that gets no CONNACK).
    pub fn new(read: OwnedReadHalf) -> PacketReader {
        PacketReader {
            read,
            buf: BytesMut::new(),
        }
    }

    /// Reads the next packet. Cancel-safe: bytes read so far stay in the
    /// buffer for the next call.
    pub async fn next(&mut self) -> Result<Incoming, WireError> {
        loop {
            if let Some(packet) = parse(&mut self.buf)? {
                return Ok(packet);
            }
            let mut chunk = [0u8; 4096];
            let n = self.read.read(&mut chunk).await?;
            if n == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Takes one packet off the front of `buf`: `None` if it is not complete yet.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
    let packet = match Packet::read(buf, MAX_PACKET) {
        Ok(p) => p,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(WireError::Protocol(e.to_string())),
    };
    Ok(Some(match packet {
        Packet::ConnAck(a) => Incoming::ConnAck {
            session_present: a.session_present,
            code: a.code as u8,
        },
        Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload.to_vec(),
            qos: p.qos as u8,
            pkid: p.pkid,
            retain: p.retain,
        },
        Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        Packet::SubAck(a) => Incoming::SubAck(
            a.pkid,
            a.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => *q as u8,
                    SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        ),
        Packet::PingResp => Incoming::PingResp,
        other => Incoming::Other(packet_type(&other)),
    }))
}

/// The MQTT control packet type (the fixed header's high nibble) of a packet devices ignore.
fn packet_type(p: &Packet) -> u8 {
    match p {
        Packet::Connect(_) => 1,
        Packet::ConnAck(_) => 2,
        Packet::Publish(_) => 3,
        Packet::PubAck(_) => 4,
        Packet::PubRec(_) => 5,
        Packet::PubRel(_) => 6,
        Packet::PubComp(_) => 7,
        Packet::Subscribe(_) => 8,
        Packet::SubAck(_) => 9,
        Packet::Unsubscribe(_) => 10,
        Packet::UnsubAck(_) => 11,
        Packet::PingReq => 12,
        Packet::PingResp => 13,
        Packet::Disconnect => 14,
    }
}

/// Connects, sends CONNECT and waits for an accepting CONNACK.
pub async fn open(
    addr: (&str, u16),
    client_id: &str,
    clean_session: bool,
    keep_alive: Duration,
    timeout: Duration,
) -> Result<(PacketReader, OwnedWriteHalf, bool), WireError> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(&connect(client_id, clean_session, keep_alive))
            .await?;
        let mut reader = PacketReader::new(read);
        match reader.next().await? {
            Incoming::ConnAck {
                session_present,
                code: 0,
            } => Ok((reader, write, session_present)),
            Incoming::ConnAck { code, .. } => Err(WireError::Refused(code)),
            other => Err(WireError::Protocol(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| WireError::Timeout("CONNACK"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_roundtrips_through_parse() {
        let bytes = publish("sensors/a/b", b"{\"value\":1}", 1, 7, false);
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(parse(&mut buf).unwrap().is_none());
        let mut buf = BytesMut::from(&bytes[..]);
        let p = parse(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(
            p,
            Incoming::Publish {
                topic: "sensors/a/b".into(),
                payload: b"{\"value\":1}".to_vec(),
                qos: 1,
                pkid: 7,
                retain: false
            }
        );
    }

    #[test]
    fn long_remaining_length() {
        let payload = vec![b'x'; 300];
        let mut buf = BytesMut::from(&publish("t", &payload, 0, 0, true)[..]);
        match parse(&mut buf).unwrap().unwrap() {
            Incoming::Publish {
                payload: got,
                retain,
                ..
            } => {
                assert_eq!(got, payload);
                assert!(retain);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn acks_and_pings_parse() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&puback(9));
        buf.extend_from_slice(&[0xD0, 0x00]); // PINGRESP
        buf.extend_from_slice(&[0x90, 0x03, 0x00, 0x01, 0x80]); // SUBACK, refused
        assert_eq!(parse(&mut buf).unwrap(), Some(Incoming::PubAck(9)));
        assert_eq!(parse(&mut buf).unwrap(), Some(Incoming::PingResp));
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Incoming::SubAck(1, vec![0x80]))
        );
        assert_eq!(parse(&mut buf).unwrap(), None);
    }
}
