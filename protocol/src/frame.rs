//! Binary serial framing: postcard messages in CRC-checked COBS frames.
//!
//! # Layout
//!
//! ```text
//! wire:    COBS(body) 0x00
//! body:    version (1 byte, = FRAME_VERSION)
//!          message (postcard DeviceMessage, at most MAX_MESSAGE_LEN bytes)
//!          crc     (CRC-32/ISO-HDLC of version + message, 4 bytes little-endian)
//! ```
//!
//! COBS removes every `0x00` from the body, so `0x00` only ever means "end of
//! frame" and a receiver that joins a stream half-way, or loses bytes, is back
//! in step at the next `0x00`. Empty frames (two delimiters in a row) are
//! ignored, so a sender may start with a `0x00` to flush a receiver's partial
//! frame.
//!
//! COBS comes from the `cobs` crate (the one postcard uses), the CRC from
//! `crc32fast`; this module adds the framing, the checks and the accumulator.
//!
//! # Guarantees of [`FrameAccumulator`]
//!
//! - Memory is fixed: `N` bytes of buffer, no allocation.
//! - It takes input in chunks of any size, including one byte at a time, and
//!   yields exactly the same results however the stream is cut.
//! - Every complete frame yields exactly one result: the message, or a
//!   [`FrameError`] saying why it was refused (too long, not COBS, too short,
//!   bad CRC, unknown version, bad postcard, invalid content). A bad frame
//!   never affects the frames around it.
//! - It never panics, whatever the input.
//!
//! Checks run in this order: length, COBS, CRC, version, postcard, content. A
//! bad CRC is reported before the version because a frame that fails its CRC
//! has no trustworthy version byte.

use core::fmt;

use crate::limits::{FRAME_VERSION, MAX_ENCODED_FRAME_LEN, MAX_FRAME_LEN, MAX_MESSAGE_LEN};
use crate::types::{DeviceMessage, InvalidField};

/// The frame checksum of `bytes`: CRC-32/ISO-HDLC (the zlib/Ethernet CRC:
/// polynomial `0x04C11DB7` reflected, init `0xFFFFFFFF`, xorout `0xFFFFFFFF`;
/// check value of `"123456789"` is `0xCBF43926`).
pub fn frame_crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Bytes of the CRC trailer.
const CRC_LEN: usize = 4;

/// Why a received frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The frame did not fit the accumulator; its bytes up to the next
    /// delimiter were discarded.
    TooLong,
    /// The bytes are not valid COBS (a block length runs past the frame, or
    /// the frame holds a `0x00`).
    Cobs,
    /// The decoded body is shorter than a version byte and a CRC.
    TooShort,
    /// The CRC does not match: the frame was damaged in transit.
    BadCrc {
        /// The CRC carried by the frame.
        received: u32,
        /// The CRC computed over the frame.
        computed: u32,
    },
    /// The CRC is right but the frame speaks a protocol version this build
    /// does not know.
    UnknownVersion(u8),
    /// The message is not a postcard `DeviceMessage` (or has trailing bytes).
    BadEncoding,
    /// The message decoded but breaks a content rule.
    Invalid(InvalidField),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong => write!(f, "frame too long, discarded up to the next delimiter"),
            FrameError::Cobs => write!(f, "frame is not valid COBS"),
            FrameError::TooShort => write!(f, "frame shorter than version byte and CRC"),
            FrameError::BadCrc { received, computed } => {
                write!(
                    f,
                    "bad CRC: frame says {received:#010x}, computed {computed:#010x}"
                )
            }
            FrameError::UnknownVersion(v) => {
                write!(
                    f,
                    "unknown frame version {v} (this build speaks {FRAME_VERSION})"
                )
            }
            FrameError::BadEncoding => write!(f, "frame body is not a valid postcard message"),
            FrameError::Invalid(e) => write!(f, "invalid message: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Why a message could not be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is too small; [`MAX_ENCODED_FRAME_LEN`] + 1 always suffices.
    BufferTooSmall,
    /// The message encodes to more than [`MAX_MESSAGE_LEN`] bytes.
    MessageTooLarge,
    /// The message breaks a content rule and is not sent.
    Invalid(InvalidField),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall => write!(f, "output buffer too small"),
            EncodeError::MessageTooLarge => {
                write!(f, "message longer than {MAX_MESSAGE_LEN} bytes")
            }
            EncodeError::Invalid(e) => write!(f, "invalid message: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}

/// Encodes `msg` as one complete frame, delimiter included, into `buf`, and
/// returns the filled part. The message is validated first.
///
/// A buffer of `MAX_ENCODED_FRAME_LEN + 1` bytes always suffices.
pub fn encode_frame<'b>(msg: &DeviceMessage, buf: &'b mut [u8]) -> Result<&'b [u8], EncodeError> {
    msg.validate().map_err(EncodeError::Invalid)?;
    let mut body = [0u8; MAX_FRAME_LEN];
    body[0] = FRAME_VERSION;
    let len = postcard::to_slice(msg, &mut body[1..1 + MAX_MESSAGE_LEN])
        .map_err(|_| EncodeError::MessageTooLarge)?
        .len();
    let crc = frame_crc(&body[..1 + len]);
    body[1 + len..1 + len + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let body_len = 1 + len + CRC_LEN;
    let n = cobs::try_encode(&body[..body_len], buf).map_err(|_| EncodeError::BufferTooSmall)?;
    // `try_encode` (cobs 0.3) can return a length past `buf` when the last
    // code byte did not fit; the delimiter at `buf[n]` refuses that case too.
    *buf.get_mut(n).ok_or(EncodeError::BufferTooSmall)? = 0;
    Ok(&buf[..n + 1])
}

/// Decodes one frame body that has already been COBS-decoded: checks length,
/// CRC, version, postcard and content, in that order.
pub fn decode_body(body: &[u8]) -> Result<DeviceMessage, FrameError> {
    if body.len() < 1 + CRC_LEN {
        return Err(FrameError::TooShort);
    }
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong);
    }
    let (covered, crc_bytes) = body.split_at(body.len() - CRC_LEN);
    let received = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = frame_crc(covered);
    if received != computed {
        return Err(FrameError::BadCrc { received, computed });
    }
    if covered[0] != FRAME_VERSION {
        return Err(FrameError::UnknownVersion(covered[0]));
    }
    let (msg, rest) = postcard::take_from_bytes::<DeviceMessage>(&covered[1..])
        .map_err(|_| FrameError::BadEncoding)?;
    if !rest.is_empty() {
        return Err(FrameError::BadEncoding);
    }
    msg.validate().map_err(FrameError::Invalid)?;
    Ok(msg)
}

/// Decodes one COBS-encoded frame (without its delimiter) in place.
pub fn decode_frame(frame: &mut [u8]) -> Result<DeviceMessage, FrameError> {
    let decoded = match cobs::decode_in_place_report(frame) {
        // No bytes, so no version byte or CRC either.
        Err(cobs::DecodeError::EmptyFrame) => return Err(FrameError::TooShort),
        // `src_used` stops at the first 0x00: a frame with one inside is not COBS.
        Ok(r) if r.src_used == frame.len() => r.dst_used,
        _ => return Err(FrameError::Cobs),
    };
    decode_body(&frame[..decoded])
}

/// What one call to [`FrameAccumulator::feed`] found.
// Boxing would need an allocator; these values live in fixed memory on purpose.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum FeedResult<'a> {
    /// All input was taken; no frame is complete yet. Read more.
    Consumed,
    /// A frame was complete and valid. Feed `remaining` next.
    Frame {
        /// The decoded message.
        message: DeviceMessage,
        /// Input after the frame's delimiter.
        remaining: &'a [u8],
    },
    /// A frame was complete but refused. Count it, then feed `remaining`.
    Error {
        /// Why the frame was refused.
        error: FrameError,
        /// Input after the frame's delimiter.
        remaining: &'a [u8],
    },
}

/// Collects serial bytes into frames and decodes them.
///
/// `N` is the largest encoded frame it accepts (without the delimiter); use
/// [`DefaultFrameAccumulator`] to accept every valid message. A device that
/// only receives small commands may choose a smaller `N`; longer frames are
/// then reported as [`FrameError::TooLong`].
///
/// ```
/// use edgestream_protocol::frame::{FeedResult, FrameAccumulator};
/// let mut acc = FrameAccumulator::<1100>::new();
/// let mut input: &[u8] = &[0x01, 0x00, 0xAA]; // an empty-body frame, then a partial one
/// loop {
///     match acc.feed(input) {
///         FeedResult::Consumed => break,
///         FeedResult::Frame { message, remaining } => { let _ = message; input = remaining; }
///         FeedResult::Error { error, remaining } => { let _ = error; input = remaining; }
///     }
/// }
/// ```
#[derive(Debug)]
pub struct FrameAccumulator<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Set when the current frame overflowed: bytes are dropped until the
    /// next delimiter, which then reports [`FrameError::TooLong`].
    overflowed: bool,
}

/// An accumulator large enough for every valid frame.
pub type DefaultFrameAccumulator = FrameAccumulator<MAX_ENCODED_FRAME_LEN>;

impl<const N: usize> Default for FrameAccumulator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameAccumulator<N> {
    /// An empty accumulator.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// Forgets any partial frame (e.g. after the port was reopened).
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflowed = false;
    }

    /// Bytes of the current partial frame held.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Takes bytes until one frame is complete or the input runs out.
    ///
    /// Call again with `remaining` until it returns [`FeedResult::Consumed`].
    pub fn feed<'a>(&mut self, mut input: &'a [u8]) -> FeedResult<'a> {
        // A loop, not recursion: a stream of delimiters (empty frames) must
        // not grow the stack.
        loop {
            let Some(pos) = input.iter().position(|&b| b == 0) else {
                self.take(input);
                return FeedResult::Consumed;
            };
            let (chunk, rest) = (&input[..pos], &input[pos + 1..]);
            self.take(chunk);
            if self.overflowed {
                self.reset();
                return FeedResult::Error {
                    error: FrameError::TooLong,
                    remaining: rest,
                };
            }
            if self.len == 0 {
                // An empty frame: a flush marker, or two delimiters in a row.
                input = rest;
                continue;
            }
            let len = self.len;
            self.len = 0;
            return match decode_frame(&mut self.buf[..len]) {
                Ok(message) => FeedResult::Frame {
                    message,
                    remaining: rest,
                },
                Err(error) => FeedResult::Error {
                    error,
                    remaining: rest,
                },
            };
        }
    }

    fn take(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        match self.buf.get_mut(self.len..self.len + chunk.len()) {
            Some(dst) => {
                dst.copy_from_slice(chunk);
                self.len += chunk.len();
            }
            None => {
                self.overflowed = true;
                self.len = 0;
            }
        }
    }
}
