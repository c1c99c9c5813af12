//! Every size the protocol accepts, in one place.
//!
//! Nothing a device or a broker sends can make a decoder hold more than these
//! bounds: strings and lists are `heapless` containers of exactly these
//! capacities, and payloads longer than the byte limits are refused before
//! they are parsed. Changing a value here changes the wire contract and must
//! be reflected in `README.md`.

/// Longest device identifier, in bytes of UTF-8.
pub const MAX_DEVICE_LEN: usize = 48;
/// Longest metric name, in bytes of UTF-8.
pub const MAX_METRIC_LEN: usize = 48;
/// Longest gateway identifier, in bytes.
pub const MAX_GATEWAY_LEN: usize = 48;
/// Longest rule name (alerts and aggregates), in bytes.
pub const MAX_RULE_NAME_LEN: usize = 48;
/// Longest command identifier, in bytes.
pub const MAX_COMMAND_ID_LEN: usize = 48;
/// Longest command name, in bytes.
pub const MAX_COMMAND_NAME_LEN: usize = 32;
/// Most arguments one command may carry.
pub const MAX_COMMAND_ARGS: usize = 8;
/// Longest command argument name, in bytes.
pub const MAX_ARG_KEY_LEN: usize = 32;
/// Longest string command argument value, in bytes.
pub const MAX_ARG_STR_LEN: usize = 64;
/// Longest command outcome detail, in bytes.
pub const MAX_DETAIL_LEN: usize = 128;
/// Longest alert message, in bytes.
pub const MAX_ALERT_MESSAGE_LEN: usize = 128;
/// Most tags on one telemetry reading.
pub const MAX_TAGS: usize = 4;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 32;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 64;
/// Most readings in one serial [`ReadingBatch`](crate::types::ReadingBatch).
///
/// Chosen so that a batch of maximal readings still fits [`MAX_MESSAGE_LEN`].
pub const MAX_BATCH_READINGS: usize = 8;
/// Most readings in one cloud telemetry batch.
pub const MAX_TELEMETRY_BATCH: usize = 256;
/// Longest bundle hash (hex), in bytes: enough for SHA-256 or BLAKE3 in hex.
pub const MAX_HASH_LEN: usize = 64;
/// Longest bundle rejection reason, in bytes.
pub const MAX_REASON_LEN: usize = 128;
/// Most compile errors one bundle status reports.
pub const MAX_BUNDLE_ERRORS: usize = 16;
/// Longest message of one compile error, in bytes.
pub const MAX_BUNDLE_ERROR_MESSAGE_LEN: usize = 128;

/// Longest postcard-encoded [`DeviceMessage`](crate::types::DeviceMessage).
///
/// Every message the types above can express fits in this (a test builds the
/// largest of each and checks), so an encoder never fails on a valid message.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Longest decoded binary frame: version byte + message + CRC-32.
pub const MAX_FRAME_LEN: usize = 1 + MAX_MESSAGE_LEN + 4;
/// Longest COBS-encoded frame on the wire, excluding the `0x00` delimiter.
///
/// COBS adds one byte per started block of 254 bytes.
pub const MAX_ENCODED_FRAME_LEN: usize = MAX_FRAME_LEN + MAX_FRAME_LEN.div_ceil(254);

/// Longest text line from a serial sensor, excluding the line terminator.
pub const MAX_LINE_LEN: usize = 256;
/// Most values (metrics) one text line may carry.
pub const MAX_LINE_VALUES: usize = 16;
/// Most columns a CSV column map may describe.
pub const MAX_CSV_COLUMNS: usize = 16;

/// Longest MQTT payload of a local-broker reading, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// Longest JSON command payload, in bytes.
pub const MAX_COMMAND_JSON_LEN: usize = 2048;
/// Longest JSON command outcome payload, in bytes.
pub const MAX_OUTCOME_JSON_LEN: usize = 1024;
/// Longest JSON rule bundle payload, in bytes (this bounds the rule text).
pub const MAX_BUNDLE_JSON_LEN: usize = 256 * 1024;
/// Longest JSON payload of any other cloud message (telemetry batches,
/// alerts, aggregates, statuses), in bytes.
pub const MAX_CLOUD_JSON_LEN: usize = 256 * 1024;

/// The one JSON schema version this crate reads and writes (`"v": 1`).
pub const JSON_SCHEMA_VERSION: u64 = 1;
/// The one binary frame protocol version this crate reads and writes.
pub const FRAME_VERSION: u8 = 1;
