//! Uses the firmware-facing API of edgestream-protocol from a `#![no_std]`
//! crate. See Cargo.toml for why this proves the crate needs no `std`.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

use edgestream_protocol::frame::{encode_frame, FeedResult, FrameAccumulator};
use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
use edgestream_protocol::text::{parse_kv_line, CsvMap, LineAccumulator, LineFeed};
use edgestream_protocol::types::{DeviceMessage, Reading};

/// What a device does: frame a reading, and read frames back.
pub fn round_trip(value: f64) -> bool {
    let msg = DeviceMessage::Reading(Reading {
        device: heapless::String::try_from("d").unwrap_or_default(),
        metric: heapless::String::try_from("t").unwrap_or_default(),
        value,
        ts: None,
        seq: None,
        quality: None,
    });
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    let Ok(frame) = encode_frame(&msg, &mut buf) else { return false };
    let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
    matches!(acc.feed(frame), FeedResult::Frame { message, .. } if message == msg)
}

/// What a text-sensor reader does.
pub fn parse_text(bytes: &[u8]) -> usize {
    let mut acc = LineAccumulator::<128>::new();
    let csv = CsvMap::new(["ts", "t"], ',');
    let mut n = 0;
    let mut input = bytes;
    loop {
        match acc.feed(input) {
            LineFeed::Consumed => return n,
            LineFeed::Line { line, remaining } => {
                n += usize::from(parse_kv_line(line).is_ok());
                if let Ok(map) = &csv {
                    n += usize::from(map.parse(line).is_ok());
                }
                input = remaining;
            }
            LineFeed::Error { remaining, .. } => input = remaining,
        }
    }
}

/// The JSON codecs need only `alloc`.
#[cfg(feature = "alloc")]
pub fn local_value(payload: &[u8]) -> Option<f64> {
    edgestream_protocol::json::decode_local_reading(payload).ok().map(|r| r.value)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
