//! What the outbox stores: one [`Record`] per reading, alert, aggregate or dead letter. The
//! segment log (`log.rs`) stores a record's postcard body in a CRC-framed frame.
//!
//! The rest of this module is the value forms of the sled store of earlier releases, read
//! only to migrate its backlog (`legacy.rs`); the first byte tells them apart:
//!
//! - **Single record** (version 1, [`FORMAT_VERSION`]): `[1][crc32 of body: u32 LE][body:
//!   postcard]`. Written by releases before segments, and for alerts and control messages by
//!   releases before those were packed too; still read, acknowledged and dropped alike.
//! - **Segment** (version 2, [`SEGMENT_VERSION`]; the records of one priority in one append,
//!   packed so that the key and sled's per-entry overhead are paid once per segment, not per
//!   record):
//!   `[2][crc32 of the rest: u32 LE][appended at: varint unix secs]` then per record
//!   `[seq delta: varint][body length: varint][body: postcard]`. The first delta is from the
//!   sequence number in the segment's key, each next one from the previous record's.
//!
//! The CRC (CRC-32/ISO-HDLC) catches torn or bit-rotted values that sled's own checks let
//! through; a value that fails it is skipped and counted, never delivered half-right (for a
//! segment, all its records). Changing [`Record`] in a way postcard cannot read back needs a new
//! version and a reader for the old one.

use edgestream_protocol::types::{DeviceId, MetricName, RuleName};
use serde::{Deserialize, Serialize};

/// Version byte of the on-disk single-record form.
pub const FORMAT_VERSION: u8 = 1;
/// Version byte of the on-disk segment form (several telemetry records in one value).
pub const SEGMENT_VERSION: u8 = 2;
/// Bytes a record would take as a single value besides its postcard body (version + CRC).
pub const SINGLE_OVERHEAD: usize = HEADER_LEN;
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
    /// Inline, like the reading's: decoding a stored reading allocates nothing for its names
    /// (the on-disk form is the same as a `String`'s).
    pub device: DeviceId,
    pub metric: MetricName,
    pub value: f64,
    pub ts_ms: u64,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Names inline, like a reading's (the rules compiler bounds rule names to the same 48
    /// bytes); the on-disk form is a string either way. The message stays a `String`: it may
    /// be 128 bytes, and every record in a group would pay for that room.
    pub rule: RuleName,
    pub device: DeviceId,
    /// `info`, `warning` or `critical`.
    pub severity: heapless::String<16>,
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

    /// Appends the postcard body of `self` (the part a segment stores) to `out`.
    pub fn encode_body_into(&self, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
        *out = postcard::to_extend(self, std::mem::take(out))?;
        Ok(())
    }

    /// Decodes a postcard body whose integrity was already checked (by its segment's CRC).
    pub fn decode_body(body: &[u8]) -> Result<Record, DecodeError> {
        postcard::from_bytes(body).map_err(|e| DecodeError::Body(e.to_string()))
    }

    /// Appends the on-disk form of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
        let start = out.len();
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&[0; 4]);
        let body = postcard::to_extend(self, std::mem::take(out))?;
        *out = body;
        let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
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
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        postcard::from_bytes(body).map_err(|e| DecodeError::Body(e.to_string()))
    }
}

/// One record inside a [`Segment`]: its sequence number and where its body lies in the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    pub seq: u64,
    pub body: std::ops::Range<usize>,
}

/// A parsed segment value; bodies are ranges into the value it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// When the segment was appended (unix seconds), for the age limit.
    pub appended_at: u64,
    pub entries: Vec<SegmentEntry>,
}

/// Builds a segment value; see the module doc for the layout.
#[derive(Debug)]
pub struct SegmentWriter {
    buf: Vec<u8>,
    prev: u64,
    records: usize,
}

impl SegmentWriter {
    /// A segment whose key carries `base_seq`; every record added must have a sequence number
    /// at or above it, increasing.
    pub fn new(base_seq: u64, appended_at: u64) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.push(SEGMENT_VERSION);
        buf.extend_from_slice(&[0; 4]);
        put_varint(&mut buf, appended_at);
        Self {
            buf,
            prev: base_seq,
            records: 0,
        }
    }

    pub fn push(&mut self, seq: u64, body: &[u8]) {
        put_varint(&mut self.buf, seq.saturating_sub(self.prev));
        self.prev = seq;
        put_varint(&mut self.buf, body.len() as u64);
        self.buf.extend_from_slice(body);
        self.records += 1;
    }

    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes of the value so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.buf[HEADER_LEN..]);
        self.buf[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

impl Segment {
    /// Parses a segment value stored under `base_seq`. `verify` checks the CRC; counting
    /// records (hot in the uplink's polling) skips it, reading them never does.
    pub fn parse(base_seq: u64, v: &[u8], verify: bool) -> Result<Segment, DecodeError> {
        if v.len() < HEADER_LEN {
            return Err(DecodeError::Truncated(v.len()));
        }
        if v[0] != SEGMENT_VERSION {
            return Err(DecodeError::UnknownVersion(v[0]));
        }
        if verify {
            let stored = u32::from_le_bytes([v[1], v[2], v[3], v[4]]);
            let computed = crc32fast::hash(&v[HEADER_LEN..]);
            if stored != computed {
                return Err(DecodeError::Checksum { stored, computed });
            }
        }
        let bad = || DecodeError::Body("segment framing".into());
        let mut at = HEADER_LEN;
        let appended_at = get_varint(v, &mut at).ok_or_else(bad)?;
        let mut entries = Vec::new();
        let mut seq = base_seq;
        while at < v.len() {
            let delta = get_varint(v, &mut at).ok_or_else(bad)?;
            seq = seq.checked_add(delta).ok_or_else(bad)?;
            let len =
                usize::try_from(get_varint(v, &mut at).ok_or_else(bad)?).map_err(|_| bad())?;
            let end = at
                .checked_add(len)
                .filter(|e| *e <= v.len())
                .ok_or_else(bad)?;
            entries.push(SegmentEntry { seq, body: at..end });
            at = end;
        }
        Ok(Segment {
            appended_at,
            entries,
        })
    }
}

/// Counted size of a record whose body is `body_len` bytes: what it would occupy as a single
/// value, key included. The cap is counted in these units whatever the packing, so packing
/// never lets more records in than the cap says (segments are smaller than their count).
pub fn counted_size(body_len: usize, key_len: usize) -> u64 {
    (body_len + SINGLE_OVERHEAD + key_len) as u64
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7F).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Unix time in whole seconds: records are stamped with it when appended (their age is what
/// `outbox.max_age_secs` limits).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc32_iso_hdlc_as_stores_already_hold() {
        // The catalogue's check value of CRC-32/ISO-HDLC: stores written by releases that
        // computed it with another implementation stay readable.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    fn reading() -> Record {
        Record::Reading(ReadingRecord {
            device: "boiler-1".try_into().unwrap(),
            metric: "temperature".try_into().unwrap(),
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

    #[test]
    fn segments_round_trip_and_detect_damage() {
        let bodies: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                let mut b = Vec::new();
                reading().encode_body_into(&mut b).unwrap();
                b.push(i); // bodies differ
                b
            })
            .collect();
        let seqs = [10u64, 11, 13, 300, 301];
        let mut w = SegmentWriter::new(10, 1_700_000_000);
        for (s, b) in seqs.iter().zip(&bodies) {
            w.push(*s, b);
        }
        let v = w.finish();
        let seg = Segment::parse(10, &v, true).unwrap();
        assert_eq!(seg.appended_at, 1_700_000_000);
        let got: Vec<(u64, &[u8])> = seg
            .entries
            .iter()
            .map(|e| (e.seq, &v[e.body.clone()]))
            .collect();
        let want: Vec<(u64, &[u8])> = seqs
            .iter()
            .copied()
            .zip(bodies.iter().map(|b| &b[..]))
            .collect();
        assert_eq!(got, want);
        for i in 0..v.len() * 8 {
            let mut b = v.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                Segment::parse(10, &b, true).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
        for n in 0..v.len() {
            // A cut segment fails its CRC (or its header), never yields fewer records silently.
            assert!(
                Segment::parse(10, &v[..n], true).is_err(),
                "cut at {n} went unnoticed"
            );
        }
    }
}
