//! edgestream-protocol: the contract between edgestream, its devices and the cloud.
//!
//! - [`types`]: the wire types (readings, commands, outcomes, alerts,
//!   aggregates, bundle statuses, [`types::DeviceMessage`]), bounded by
//!   [`limits`].
//! - [`frame`]: binary serial framing (postcard in CRC-32 COBS frames) and
//!   [`frame::FrameAccumulator`], which resynchronises after garbage.
//! - [`text`]: text serial framing ([`text::LineAccumulator`]) and parsers for
//!   JSON, `key=value` and CSV lines.
//! - `json` (feature `alloc`): the MQTT JSON payloads, each with `"v": 1`.
//!
//! Without default features the crate is `#![no_std]` and needs no allocator
//! (`alloc` adds the JSON codecs). It does no I/O: bytes in, values out.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod frame;
#[cfg(feature = "alloc")]
pub mod json;
pub mod limits;
pub mod text;
pub mod types;
