//! The compact record the gateway keeps in its on-disk outbox.
//!
//! A record is `version (1 byte) | postcard(OutboxRecord) | CRC-32 (4 bytes,
//! little-endian)`, the same layout and CRC as a serial frame body (see
//! [`crate::frame`]) but without COBS: the store keeps record boundaries
//! itself. The CRC lets the outbox detect a record damaged on disk and skip
//! it instead of sending garbage; the version byte lets a future build read
//! (or knowingly refuse) records written by this one after an upgrade.

use crate::frame::{EncodeError, FrameError, FRAME_CRC};
use crate::types::{
    AggregateRecord, AlertEvent, BundleStatus, CommandOutcome, InvalidField, TelemetryReading,
};

/// Version byte of outbox records written by this build.
pub const OUTBOX_RECORD_VERSION: u8 = 1;

/// Longest encoded outbox record; a buffer this size always suffices.
///
/// The largest record is a rejected bundle status with every error at full
/// length (about 2.5 KiB); a test checks it fits.
pub const MAX_OUTBOX_RECORD_LEN: usize = 4096;

/// Everything the gateway stores before it is sent to the cloud.
///
/// Postcard variant indices: 0 = `Reading`, 1 = `Alert`, 2 = `Aggregate`,
/// 3 = `Outcome`, 4 = `BundleStatus`. Append new variants at the end only.
// Boxing would need an allocator; these values live in fixed memory on purpose.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OutboxRecord {
    /// A reading to forward as telemetry.
    Reading(TelemetryReading),
    /// An alert raised or cleared by a rule.
    Alert(AlertEvent),
    /// A windowed aggregate computed by a rule.
    Aggregate(AggregateRecord),
    /// A command outcome to report.
    Outcome(CommandOutcome),
    /// A rule bundle status to report.
    BundleStatus(BundleStatus),
}

impl OutboxRecord {
    /// Checks the content rules of the record inside.
    pub fn validate(&self) -> Result<(), InvalidField> {
        match self {
            OutboxRecord::Reading(r) => r.validate(),
            OutboxRecord::Alert(a) => a.validate(),
            OutboxRecord::Aggregate(a) => a.validate(),
            OutboxRecord::Outcome(o) => o.validate(),
            OutboxRecord::BundleStatus(s) => s.validate(),
        }
    }
}

/// Encodes `record` into `buf` and returns the filled part.
pub fn encode_record<'b>(
    record: &OutboxRecord,
    buf: &'b mut [u8],
) -> Result<&'b [u8], EncodeError> {
    record.validate().map_err(EncodeError::Invalid)?;
    let (first, rest) = buf.split_first_mut().ok_or(EncodeError::BufferTooSmall)?;
    *first = OUTBOX_RECORD_VERSION;
    let len = postcard::to_slice(record, rest)
        .map_err(|_| EncodeError::BufferTooSmall)?
        .len();
    let crc = FRAME_CRC.checksum(&buf[..1 + len]);
    buf.get_mut(1 + len..1 + len + 4)
        .ok_or(EncodeError::BufferTooSmall)?
        .copy_from_slice(&crc.to_le_bytes());
    Ok(&buf[..1 + len + 4])
}

/// Decodes a record written by [`encode_record`]: checks length, CRC,
/// version, postcard and content, in that order.
pub fn decode_record(bytes: &[u8]) -> Result<OutboxRecord, FrameError> {
    if bytes.len() > MAX_OUTBOX_RECORD_LEN {
        return Err(FrameError::TooLong);
    }
    if bytes.len() < 5 {
        return Err(FrameError::TooShort);
    }
    let (covered, crc) = bytes.split_at(bytes.len() - 4);
    let received = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = FRAME_CRC.checksum(covered);
    if received != computed {
        return Err(FrameError::BadCrc { received, computed });
    }
    if covered[0] != OUTBOX_RECORD_VERSION {
        return Err(FrameError::UnknownVersion(covered[0]));
    }
    let (record, rest) = postcard::take_from_bytes::<OutboxRecord>(&covered[1..])
        .map_err(|_| FrameError::BadEncoding)?;
    if !rest.is_empty() {
        return Err(FrameError::BadEncoding);
    }
    record.validate().map_err(FrameError::Invalid)?;
    Ok(record)
}
