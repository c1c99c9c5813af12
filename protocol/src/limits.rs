//! Every size the protocol accepts, in one place.

/// Longest device identifier, in bytes of UTF-8.
pub const MAX_DEVICE_LEN: usize = 48;
/// Longest metric name, in bytes of UTF-8.
pub const MAX_METRIC_LEN: usize = 48;
