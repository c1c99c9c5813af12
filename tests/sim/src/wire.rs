//! A minimal MQTT 3.1.1 client connection, as a small sensor's firmware has.
//!
//! Simulated devices need one thing rumqttc's event loop does not give: the
//! exact reading behind every PUBACK. rumqttc reports only packet ids and
//! silently discards queued publishes on a clean reconnect, so mapping ids
//! back to readings from outside is guesswork. Here the device assigns packet
//! ids itself and sees every packet, so "acknowledged by the broker" is a fact.
//!
//! Only what a device uses is implemented: CONNECT/CONNACK, PUBLISH (QoS 0
//! and 1) both ways, PUBACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT.
//! Every packet is bounded by [`MAX_PACKET`]; a larger one is a protocol error
//! that closes the connection.

use std::time::Duration;

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

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Encodes CONNECT.
pub fn connect(client_id: &str, clean_session: bool, keep_alive: Duration) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(4);
    body.push(if clean_session { 0x02 } else { 0x00 });
    let ka = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
    body.extend_from_slice(&ka.to_be_bytes());
    put_str(&mut body, client_id);
    frame(0x10, &body)
}

/// Encodes PUBLISH (QoS 0 needs `pkid` 0).
pub fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut body, topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1) | u8::from(retain), &body)
}

/// Encodes PUBACK.
pub fn puback(pkid: u16) -> Vec<u8> {
    frame(0x40, &pkid.to_be_bytes())
}

/// Encodes SUBSCRIBE for one filter.
pub fn subscribe(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&pkid.to_be_bytes());
    put_str(&mut body, filter);
    body.push(qos);
    frame(0x82, &body)
}

/// Encodes PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0]
}

/// Encodes DISCONNECT.
pub fn disconnect() -> Vec<u8> {
    vec![0xE0, 0]
}

/// Reads packets from the broker side of a connection.
#[derive(Debug)]
pub struct PacketReader {
    read: OwnedReadHalf,
    buf: Vec<u8>,
}

impl PacketReader {
    /// Reads the next packet. Cancel-safe: bytes read so far stay in the
    /// buffer for the next call.
    pub async fn next(&mut self) -> Result<Incoming, WireError> {
        loop {
            if let Some((packet, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
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

/// Parses one packet from the front of `buf`: `None` if incomplete.
fn parse(buf: &[u8]) -> Result<Option<(Incoming, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len += usize::from(b & 0x7F) * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if i > 4 {
            return Err(WireError::Protocol("remaining length over 4 bytes".into()));
        }
    }
    if len > MAX_PACKET {
        return Err(WireError::Protocol(format!(
            "packet of {len} bytes exceeds MAX_PACKET"
        )));
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    let body = &buf[i..i + len];
    let u16_at = |at: usize| -> Result<u16, WireError> {
        body.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| WireError::Protocol(format!("short packet 0x{first:02x}")))
    };
    let packet = match first >> 4 {
        2 => Incoming::ConnAck {
            session_present: body.first().is_some_and(|b| b & 1 == 1),
            code: *body
                .get(1)
                .ok_or_else(|| WireError::Protocol("short CONNACK".into()))?,
        },
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = usize::from(u16_at(0)?);
            let topic = body
                .get(2..2 + tlen)
                .ok_or_else(|| WireError::Protocol("short PUBLISH topic".into()))?;
            let topic = String::from_utf8(topic.to_vec())
                .map_err(|_| WireError::Protocol("topic is not UTF-8".into()))?;
            let mut at = 2 + tlen;
            let pkid = if qos > 0 {
                let p = u16_at(at)?;
                at += 2;
                p
            } else {
                0
            };
            Incoming::Publish {
                topic,
                payload: body[at..].to_vec(),
                qos,
                pkid,
                retain: first & 1 == 1,
            }
        }
        4 => Incoming::PubAck(u16_at(0)?),
        9 => Incoming::SubAck(u16_at(0)?, body.get(2..).unwrap_or_default().to_vec()),
        13 => Incoming::PingResp,
        other => Incoming::Other(other),
    };
    Ok(Some((packet, i + len)))
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
        let mut reader = PacketReader {
            read,
            buf: Vec::new(),
        };
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
        let (p, used) = parse(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
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
        assert!(parse(&bytes[..bytes.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn long_remaining_length() {
        let payload = vec![b'x'; 300];
        let bytes = publish("t", &payload, 0, 0, true);
        let (p, _) = parse(&bytes).unwrap().unwrap();
        match p {
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
}
