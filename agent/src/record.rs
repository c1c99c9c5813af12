//! What the outbox stores: one [`Record`] per reading, alert, aggregate or dead letter, and its
//! on-disk form.
//!
//! On disk a record is `[format version: u8][crc32 of body: u32 LE][body: postcard]`. The CRC
//! (CRC-32/ISO-HDLC) catches torn or bit-rotted values that sled's own checks let through; a
//! record that fails it is skipped and counted, never delivered half-right. Changing [`Record`]
//! in a way postcard cannot read back needs a new [`FORMAT_VERSION`] and a reader for the old one.

use serde::{Deserialize, Serialize};

/// Version byte of the on-disk record form.
pub const FORMAT_VERSION: u8 = 1;
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
const HEADER_LEN: usize = 5;

/// Which queue a record waits in. High-priority records are sent first and dropped last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Alerts and command outcomes.
    High = 0,
    /// Bulk telemetry, aggregates and dead letters.
    Low = 1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Reading(ReadingRecord),
    Alert(AlertRecord),
    Aggregate(AggregateRecord),
    DeadLetter(DeadLetterRecord),
    /// A control-plane message published as-is (rule bundle status; later command outcomes).
    Control(ControlRecord),
}

/// A ready-made JSON payload for `{prefix}/{gateway}/{topic_suffix}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRecord {
    pub topic_suffix: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadingRecord {
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub ts_ms: u64,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub rule: String,
    pub device: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// `true` for raised, `false` for cleared.
    pub raised: bool,
    pub value: f64,
    pub ts_ms: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateRecord {
    pub rule: String,
    pub device: String,
    pub metric: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub count: u32,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

/// A rejected input kept for inspection upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// Which source rejected it, e.g. `local-mqtt`.
    pub source: String,
    /// Where inside the source: a topic, a port and line number.
    pub location: String,
    pub reason: String,
    /// The first bytes of the input (see `deadletter::MAX_SAMPLE_BYTES`).
    pub payload: Vec<u8>,
    pub ts_ms: u64,
}

/// Why stored bytes could not be turned back into a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header: a torn write. Skip the record.
    #[error("record is {0} bytes, shorter than its header")]
    Truncated(usize),
    /// Written by a newer agent (or garbage). Skip it; a downgrade cannot read it.
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    /// Damaged on disk. Skip it.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    /// The checksum matched but the body does not decode: a bug or a format change.
    #[error("body does not decode: {0}")]
    Body(String),
}

impl Record {
    pub fn priority(&self) -> Priority {
        match self {
            Record::Alert(_) | Record::Control(_) => Priority::High,
            Record::Reading(_) | Record::Aggregate(_) | Record::DeadLetter(_) => Priority::Low,
        }
    }

    /// Appends the on-disk form of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
        let start = out.len();
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&[0; 4]);
        let body = postcard::to_extend(self, std::mem::take(out))?;
        *out = body;
        let crc = CRC32.checksum(&out[start + HEADER_LEN..]);
        out[start + 1..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut v = Vec::with_capacity(64);
        self.encode_into(&mut v)?;
        Ok(v)
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        if bytes[0] != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(bytes[0]));
        }
        let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let body = &bytes[HEADER_LEN..];
        let computed = CRC32.checksum(body);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        postcard::from_bytes(body).map_err(|e| DecodeError::Body(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Record {
        Record::Reading(ReadingRecord {
            device: "boiler-1".into(),
            metric: "temperature".into(),
            value: 21.5,
            ts_ms: 1_700_000_000_123,
            tags: vec![("site".into(), "plant-3".into())],
        })
    }

    #[test]
    fn round_trips() {
        let r = reading();
        assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = reading().encode().unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                Record::decode(&b).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_is_detected() {
        let bytes = reading().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                Record::decode(&bytes[..n]).is_err(),
                "truncation to {n} went unnoticed"
            );
        }
    }
}
