//! MQTT JSON payloads (feature `alloc`).
//!
//! Every cloud payload carries `"v": 1`. Decoders check, in this order:
//!
//! 1. the payload length against its named limit (before parsing anything);
//! 2. that it is JSON;
//! 3. the schema version: a missing `v` or any `v` other than `1` is refused
//!    with [`JsonError::MissingVersion`] / [`JsonError::UnsupportedVersion`],
//!    whatever else the payload holds, so a newer sender gets a clear answer;
//! 4. the shape (field names, types, string and list limits);
//! 5. the content rules (`validate()` of the type).
//!
//! Unknown fields are ignored: version 1 may gain optional fields without a
//! version bump; anything that changes the meaning of an existing field must
//! bump `v`. Encoders validate first and never write a payload their own
//! decoder would refuse. Optional fields that are absent are left out, not
//! written as `null`.
//!
//! The one payload without `v` is the local-broker reading
//! ([`decode_local_reading`]), because it comes from third-party sensors.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::de::{self, DeserializeOwned, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::limits::*;
use crate::types::{
    check_name, AggregateRecord, AlertEvent, AlertState, BundleError, BundleStatus, Command,
    CommandOutcome, DeviceId, GatewayId, InvalidField, RuleName, Severity, TelemetryReading,
};

/// Why a JSON payload was refused (or could not be written).
#[derive(Debug, Clone, PartialEq)]
pub enum JsonError {
    /// The payload is longer than the limit for its kind.
    TooLarge {
        /// Payload bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON at all; `line` and `column` are 1-based.
    Syntax {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
    },
    /// The object has no `"v"` field.
    MissingVersion,
    /// `"v"` is not `1`; `found` is its JSON text.
    UnsupportedVersion {
        /// The `v` value found, as JSON text.
        found: String,
    },
    /// The JSON does not have the expected shape (missing field, wrong type,
    /// string or list too long); the message names the field and position.
    Schema(String),
    /// The shape is right but a content rule is broken.
    Invalid(InvalidField),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::TooLarge { len, max } => {
                write!(f, "payload is {len} bytes, the limit is {max}")
            }
            JsonError::Syntax { line, column } => {
                write!(f, "not JSON (error at line {line} column {column})")
            }
            JsonError::MissingVersion => write!(f, "missing schema version field `v`"),
            JsonError::UnsupportedVersion { found } => {
                write!(
                    f,
                    "unsupported schema version v={found}, this build speaks v=1"
                )
            }
            JsonError::Schema(msg) => write!(f, "wrong shape: {msg}"),
            JsonError::Invalid(e) => write!(f, "invalid: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for JsonError {}

impl From<InvalidField> for JsonError {
    fn from(e: InvalidField) -> Self {
        JsonError::Invalid(e)
    }
}

fn syntax_or_schema(e: serde_json::Error) -> JsonError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => JsonError::Schema(e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => JsonError::Syntax {
            line: e.line(),
            column: e.column(),
        },
    }
}

fn check_len(payload: &[u8], max: usize) -> Result<(), JsonError> {
    if payload.len() > max {
        Err(JsonError::TooLarge {
            len: payload.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// The `"v"` field of a JSON object, read without building the rest of it.
///
/// Only an object is accepted (a derived struct would also take an array
/// and read its first element as `v`), and a repeated `v` is refused rather
/// than letting the last one win.
struct VersionProbe(Option<serde_json::Value>);

impl<'de> Deserialize<'de> for VersionProbe {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VersionProbe;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<VersionProbe, A::Error> {
                let mut v = None;
                while let Some(key) = m.next_key::<alloc::borrow::Cow<'de, str>>()? {
                    if key == "v" {
                        if v.is_some() {
                            return Err(de::Error::duplicate_field("v"));
                        }
                        v = Some(m.next_value::<serde_json::Value>()?);
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(VersionProbe(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks the length and `"v": 1` before the shape is looked at.
fn check_envelope(payload: &[u8], max: usize) -> Result<(), JsonError> {
    check_len(payload, max)?;
    let probe: VersionProbe = serde_json::from_slice(payload).map_err(syntax_or_schema)?;
    match probe.0 {
        None => Err(JsonError::MissingVersion),
        Some(v) if v.as_u64() == Some(JSON_SCHEMA_VERSION) => Ok(()),
        Some(v) => Err(JsonError::UnsupportedVersion {
            found: v.to_string(),
        }),
    }
}

fn decode_versioned<T: DeserializeOwned>(payload: &[u8], max: usize) -> Result<T, JsonError> {
    check_envelope(payload, max)?;
    serde_json::from_slice(payload).map_err(syntax_or_schema)
}

fn decode_gateway(payload: &[u8]) -> Result<GatewayId, JsonError> {
    #[derive(Deserialize)]
    struct G {
        gateway: GatewayId,
    }
    let g: G = serde_json::from_slice(payload).map_err(syntax_or_schema)?;
    check_name("gateway", &g.gateway)?;
    Ok(g.gateway)
}

fn write_json<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), JsonError> {
    out.clear();
    let err = |e: serde_json::Error| JsonError::Schema(e.to_string());
    // With `std`, write into the caller's buffer (no allocation once it has
    // grown); serde_json offers writers only with `std`.
    #[cfg(feature = "std")]
    serde_json::to_writer(&mut *out, value).map_err(err)?;
    #[cfg(not(feature = "std"))]
    {
        *out = serde_json::to_vec(value).map_err(err)?;
    }
    Ok(())
}

/// `{"v":1, ...fields of T}`
#[derive(Serialize)]
struct V1<'a, T> {
    v: u64,
    #[serde(flatten)]
    body: &'a T,
}

/// `{"v":1,"gateway":..., ...fields of T}`
#[derive(Serialize)]
struct V1Gateway<'a, T> {
    v: u64,
    gateway: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

// ---------------------------------------------------------------- local reading

/// A reading payload from the local broker (`sensors/{device}/{metric}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalReading {
    /// The value (finite).
    pub value: f64,
    /// ms since the Unix epoch, if the sensor sent one.
    pub ts: Option<u64>,
    /// The sensor's sequence number, if sent.
    pub seq: Option<u32>,
    /// The sensor's quality indicator, if sent.
    pub quality: Option<u8>,
}

/// Why a local-broker reading payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    /// Longer than [`MAX_PAYLOAD_LEN`].
    TooLarge {
        /// Payload bytes.
        len: usize,
    },
    /// Not JSON (or trailing bytes after it); positions are 1-based.
    NotJson {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        column: usize,
    },
    /// JSON, but neither an object nor a number (found: `string`, `array`...).
    NotObjectOrNumber {
        /// The JSON type found.
        found: &'static str,
    },
    /// An object without `"value"`.
    MissingValue,
    /// A field has the wrong JSON type.
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// An integer field is negative or too large for its type.
    OutOfRange {
        /// The field.
        field: &'static str,
    },
    /// The value is too large to be a finite `f64` (e.g. `1e999`).
    NonFinite,
    /// A field appears twice.
    Duplicate {
        /// The field.
        field: &'static str,
    },
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::TooLarge { len } => {
                write!(f, "payload is {len} bytes, the limit is {MAX_PAYLOAD_LEN}")
            }
            PayloadError::NotJson { line, column } => {
                write!(f, "not JSON (error at line {line} column {column})")
            }
            PayloadError::NotObjectOrNumber { found } => {
                write!(f, "expected a JSON object or a bare number, found {found}")
            }
            PayloadError::MissingValue => write!(f, "object has no `value` field"),
            PayloadError::WrongType {
                field,
                expected,
                found,
            } => {
                write!(f, "`{field}` must be {expected}, found {found}")
            }
            PayloadError::OutOfRange { field } => write!(f, "`{field}` is out of range"),
            PayloadError::NonFinite => write!(f, "`value` is not a finite number"),
            PayloadError::Duplicate { field } => write!(f, "`{field}` appears twice"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PayloadError {}

/// A JSON value reduced to what a reading field may be.
#[derive(Clone, Copy)]
enum Scalar {
    Float(f64),
    Unsigned(u64),
    Signed(i64),
    Other(&'static str),
}

impl Scalar {
    fn type_name(self) -> &'static str {
        match self {
            Scalar::Float(_) | Scalar::Unsigned(_) | Scalar::Signed(_) => "number",
            Scalar::Other(t) => t,
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar::Other("bool"))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Signed(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Unsigned(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_str<E>(self, _: &str) -> Result<Scalar, E> {
        Ok(Scalar::Other("string"))
    }
    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Other("null"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Scalar, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Scalar, A::Error> {
        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other("object"))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ReadingKey {
    Value,
    Ts,
    Seq,
    Quality,
    #[serde(other)]
    Other,
}

const INTEGER_MS: &str = "an integer (ms since the Unix epoch)";

fn unsigned(field: &'static str, expected: &'static str, s: Scalar) -> Result<u64, PayloadError> {
    match s {
        Scalar::Unsigned(v) => Ok(v),
        Scalar::Signed(_) => Err(PayloadError::OutOfRange { field }),
        other => Err(PayloadError::WrongType {
            field,
            expected,
            found: other.type_name(),
        }),
    }
}

fn number(s: Scalar) -> Result<f64, PayloadError> {
    let v = match s {
        Scalar::Float(v) => v,
        Scalar::Unsigned(v) => v as f64,
        Scalar::Signed(v) => v as f64,
        Scalar::Other(found) => {
            return Err(PayloadError::WrongType {
                field: "value",
                expected: "a number",
                found,
            })
        }
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PayloadError::NonFinite)
    }
}

struct LocalVisitor;

impl<'de> Visitor<'de> for LocalVisitor {
    // Schema problems are returned as values so they keep their precise
    // kind; only syntax errors travel as `serde_json` errors.
    type Value = Result<LocalReading, PayloadError>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or a number")
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(number(Scalar::Float(v)).map(bare))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(number(Scalar::Unsigned(v)).map(bare))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(number(Scalar::Signed(v)).map(bare))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObjectOrNumber { found: "bool" }))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObjectOrNumber { found: "string" }))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObjectOrNumber { found: "null" }))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(PayloadError::NotObjectOrNumber { found: "array" }))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut value = None;
        let mut ts = None;
        let mut seq = None;
        let mut quality = None;
        let mut failure = None;
        while let Some(key) = m.next_key::<ReadingKey>()? {
            if matches!(key, ReadingKey::Other) {
                // Sensors add their own fields (`unit`, `battery`...): ignore them.
                m.next_value::<IgnoredAny>()?;
                continue;
            }
            let s = m.next_value::<Scalar>()?;
            if failure.is_some() {
                continue;
            }
            let result = match key {
                ReadingKey::Value => number(s).and_then(|v| set("value", &mut value, v)),
                ReadingKey::Ts => unsigned("ts", INTEGER_MS, s).and_then(|v| set("ts", &mut ts, v)),
                ReadingKey::Seq => unsigned("seq", "an integer", s)
                    .and_then(|v| {
                        u32::try_from(v).map_err(|_| PayloadError::OutOfRange { field: "seq" })
                    })
                    .and_then(|v| set("seq", &mut seq, v)),
                ReadingKey::Quality => unsigned("quality", "an integer", s)
                    .and_then(|v| {
                        u8::try_from(v).map_err(|_| PayloadError::OutOfRange { field: "quality" })
                    })
                    .and_then(|v| set("quality", &mut quality, v)),
                ReadingKey::Other => Ok(()),
            };
            failure = result.err();
        }
        Ok(match (failure, value) {
            (Some(e), _) => Err(e),
            (None, None) => Err(PayloadError::MissingValue),
            (None, Some(value)) => Ok(LocalReading {
                value,
                ts,
                seq,
                quality,
            }),
        })
    }
}

fn bare(value: f64) -> LocalReading {
    LocalReading {
        value,
        ts: None,
        seq: None,
        quality: None,
    }
}

fn set<T>(field: &'static str, slot: &mut Option<T>, v: T) -> Result<(), PayloadError> {
    if slot.is_some() {
        return Err(PayloadError::Duplicate { field });
    }
    *slot = Some(v);
    Ok(())
}

/// Decodes a local-broker reading payload: `{"value":23.5,"ts":1700000000123}`
/// (optional `ts`, `seq`, `quality`; other fields ignored) or a bare number
/// `23.5`.
pub fn decode_local_reading(payload: &[u8]) -> Result<LocalReading, PayloadError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(PayloadError::TooLarge { len: payload.len() });
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let not_json = |e: serde_json::Error| {
        // serde_json refuses numbers beyond f64 range as a syntax error;
        // that is a non-finite value, not a malformed payload.
        if e.to_string().starts_with("number out of range") {
            PayloadError::NonFinite
        } else {
            PayloadError::NotJson {
                line: e.line(),
                column: e.column(),
            }
        }
    };
    let result = (&mut de).deserialize_any(LocalVisitor).map_err(not_json)?;
    de.end().map_err(not_json)?;
    result
}

// ---------------------------------------------------------------- telemetry

/// A decoded telemetry batch (what the cloud receives).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryBatch {
    /// The gateway that sent it.
    pub gateway: GatewayId,
    /// At most [`MAX_TELEMETRY_BATCH`] readings.
    pub readings: Vec<TelemetryReading>,
}

/// Writes `{"v":1,"gateway":..,"readings":[..]}` into `out` (cleared first).
pub fn encode_telemetry_batch(
    gateway: &str,
    readings: &[TelemetryReading],
    out: &mut Vec<u8>,
) -> Result<(), JsonError> {
    #[derive(Serialize)]
    struct Batch<'a> {
        v: u64,
        gateway: &'a str,
        readings: &'a [TelemetryReading],
    }
    check_gateway(gateway)?;
    if readings.is_empty() || readings.len() > MAX_TELEMETRY_BATCH {
        return Err(InvalidField {
            field: "readings",
            reason: "must hold 1 to MAX_TELEMETRY_BATCH readings",
        }
        .into());
    }
    readings.iter().try_for_each(TelemetryReading::validate)?;
    write_json(
        &Batch {
            v: JSON_SCHEMA_VERSION,
            gateway,
            readings,
        },
        out,
    )
}

/// Reads a telemetry batch (the cloud side; used by the simulator and tests).
pub fn decode_telemetry_batch(payload: &[u8]) -> Result<TelemetryBatch, JsonError> {
    #[derive(Deserialize)]
    struct Batch {
        gateway: GatewayId,
        readings: Vec<TelemetryReading>,
    }
    let b: Batch = decode_versioned(payload, MAX_CLOUD_JSON_LEN)?;
    check_name("gateway", &b.gateway)?;
    if b.readings.is_empty() || b.readings.len() > MAX_TELEMETRY_BATCH {
        return Err(InvalidField {
            field: "readings",
            reason: "must hold 1 to MAX_TELEMETRY_BATCH readings",
        }
        .into());
    }
    b.readings.iter().try_for_each(TelemetryReading::validate)?;
    Ok(TelemetryBatch {
        gateway: b.gateway,
        readings: b.readings,
    })
}

fn check_gateway(gateway: &str) -> Result<(), JsonError> {
    if gateway.len() > MAX_GATEWAY_LEN {
        return Err(InvalidField {
            field: "gateway",
            reason: "is too long",
        }
        .into());
    }
    Ok(check_name("gateway", gateway)?)
}

// ---------------------------------------------------------------- alerts, aggregates

/// An alert's JSON fields, written. `value` is left out when the alert has none (NaN in
/// [`AlertEvent`]).
#[derive(Serialize)]
struct AlertOut<'a> {
    seq: u64,
    rule: &'a str,
    device: &'a str,
    severity: Severity,
    state: AlertState,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    ts: u64,
    message: &'a str,
}

/// An alert's JSON fields, read. A missing or `null` value is none.
#[derive(Deserialize)]
struct AlertIn {
    seq: u64,
    rule: RuleName,
    device: DeviceId,
    severity: Severity,
    state: AlertState,
    #[serde(default)]
    value: Option<f64>,
    ts: u64,
    message: heapless::String<MAX_ALERT_MESSAGE_LEN>,
}

/// Writes `{"v":1,"gateway":..,"seq":..,"rule":..,...}` into `out`. An alert without a value
/// (NaN) is written without the `value` field.
pub fn encode_alert(gateway: &str, alert: &AlertEvent, out: &mut Vec<u8>) -> Result<(), JsonError> {
    check_gateway(gateway)?;
    alert.validate()?;
    write_json(
        &V1Gateway {
            v: JSON_SCHEMA_VERSION,
            gateway,
            body: &AlertOut {
                seq: alert.seq,
                rule: &alert.rule,
                device: &alert.device,
                severity: alert.severity,
                state: alert.state,
                value: (!alert.value.is_nan()).then_some(alert.value),
                ts: alert.ts,
                message: &alert.message,
            },
        },
        out,
    )
}

/// Reads an alert; returns the gateway id and the alert. A missing or `null` `value` reads
/// as NaN (the alert has none).
pub fn decode_alert(payload: &[u8]) -> Result<(GatewayId, AlertEvent), JsonError> {
    let a: AlertIn = decode_versioned(payload, MAX_CLOUD_JSON_LEN)?;
    let alert = AlertEvent {
        seq: a.seq,
        rule: a.rule,
        device: a.device,
        severity: a.severity,
        state: a.state,
        value: a.value.unwrap_or(f64::NAN),
        ts: a.ts,
        message: a.message,
    };
    alert.validate()?;
    Ok((decode_gateway(payload)?, alert))
}

/// Writes `{"v":1,"gateway":..,"seq":..,"rule":..,"device":..,"metric":..,...}`.
pub fn encode_aggregate(
    gateway: &str,
    aggregate: &AggregateRecord,
    out: &mut Vec<u8>,
) -> Result<(), JsonError> {
    check_gateway(gateway)?;
    aggregate.validate()?;
    write_json(
        &V1Gateway {
            v: JSON_SCHEMA_VERSION,
            gateway,
            body: aggregate,
        },
        out,
    )
}

/// Reads an aggregate; returns the gateway id and the aggregate.
pub fn decode_aggregate(payload: &[u8]) -> Result<(GatewayId, AggregateRecord), JsonError> {
    let agg: AggregateRecord = decode_versioned(payload, MAX_CLOUD_JSON_LEN)?;
    agg.validate()?;
    Ok((decode_gateway(payload)?, agg))
}

// ---------------------------------------------------------------- commands

/// Reads a command (cloud -> gateway, or gateway -> MQTT device).
pub fn decode_command(payload: &[u8]) -> Result<Command, JsonError> {
    let cmd: Command = decode_versioned(payload, MAX_COMMAND_JSON_LEN)?;
    cmd.validate()?;
    Ok(cmd)
}

/// Writes `{"v":1,"id":..,"device":..,"name":..,"args":{..},"issued_at":..,"expires_at":..}`.
pub fn encode_command(cmd: &Command, out: &mut Vec<u8>) -> Result<(), JsonError> {
    cmd.validate()?;
    write_json(
        &V1 {
            v: JSON_SCHEMA_VERSION,
            body: cmd,
        },
        out,
    )
}

/// Reads a command outcome (a device's reply on `devices/{device}/replies`).
pub fn decode_outcome(payload: &[u8]) -> Result<CommandOutcome, JsonError> {
    let o: CommandOutcome = decode_versioned(payload, MAX_OUTCOME_JSON_LEN)?;
    o.validate()?;
    Ok(o)
}

/// Writes `{"v":1,"id":..,"device":..,"state":..,"detail":..,"ts":..}` (`ts`
/// left out when unknown).
pub fn encode_outcome(outcome: &CommandOutcome, out: &mut Vec<u8>) -> Result<(), JsonError> {
    outcome.validate()?;
    write_json(
        &V1 {
            v: JSON_SCHEMA_VERSION,
            body: outcome,
        },
        out,
    )
}

// ---------------------------------------------------------------- rule bundles

/// A rule bundle from the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleBundle {
    /// Monotonic bundle version chosen by the cloud (at least 1).
    pub version: u64,
    /// The rule text (bounded by [`MAX_BUNDLE_JSON_LEN`]).
    #[serde(default)]
    pub rules: String,
    /// `true` asks the gateway to go back to its previous bundle; `rules`
    /// may then be empty.
    #[serde(default)]
    pub rollback: bool,
    /// Free-form metadata for people and tools; the gateway does not read it.
    #[serde(default)]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Reads a rule bundle.
pub fn decode_bundle(payload: &[u8]) -> Result<RuleBundle, JsonError> {
    let b: RuleBundle = decode_versioned(payload, MAX_BUNDLE_JSON_LEN)?;
    if b.version == 0 {
        return Err(InvalidField {
            field: "version",
            reason: "must be at least 1",
        }
        .into());
    }
    if !b.rollback && b.rules.trim().is_empty() {
        return Err(InvalidField {
            field: "rules",
            reason: "must not be empty unless rollback is true",
        }
        .into());
    }
    Ok(b)
}

/// Writes `{"v":1,"version":..,"rules":..,"rollback":..,"meta":{..}}`.
pub fn encode_bundle(bundle: &RuleBundle, out: &mut Vec<u8>) -> Result<(), JsonError> {
    write_json(
        &V1 {
            v: JSON_SCHEMA_VERSION,
            body: bundle,
        },
        out,
    )?;
    check_len(out, MAX_BUNDLE_JSON_LEN)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusState {
    Applied,
    Rejected,
}

/// The JSON shape of [`BundleStatus`]: one flat object whose `state` says
/// which of the optional fields are present.
#[derive(Serialize, Deserialize)]
struct StatusJson {
    #[serde(default)]
    v: u64,
    version: u64,
    state: StatusState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<heapless::String<MAX_HASH_LEN>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rule_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<heapless::String<MAX_REASON_LEN>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    errors: Option<heapless::Vec<BundleError, MAX_BUNDLE_ERRORS>>,
}

/// Writes `{"v":1,"version":7,"state":"applied","hash":..,"rule_count":..,"memory_bytes":..}`
/// or `{"v":1,"version":7,"state":"rejected","reason":..,"errors":[{"line":..,"column":..,"message":..}]}`.
pub fn encode_bundle_status(status: &BundleStatus, out: &mut Vec<u8>) -> Result<(), JsonError> {
    status.validate()?;
    let json = match status.clone() {
        BundleStatus::Applied {
            version,
            hash,
            rule_count,
            memory_bytes,
        } => StatusJson {
            v: JSON_SCHEMA_VERSION,
            version,
            state: StatusState::Applied,
            hash: Some(hash),
            rule_count: Some(rule_count),
            memory_bytes: Some(memory_bytes),
            reason: None,
            errors: None,
        },
        BundleStatus::Rejected {
            version,
            reason,
            errors,
        } => StatusJson {
            v: JSON_SCHEMA_VERSION,
            version,
            state: StatusState::Rejected,
            hash: None,
            rule_count: None,
            memory_bytes: None,
            reason: Some(reason),
            errors: Some(errors),
        },
    };
    write_json(&json, out)
}

/// Reads a bundle status (the cloud side; used by the simulator and tests).
pub fn decode_bundle_status(payload: &[u8]) -> Result<BundleStatus, JsonError> {
    let j: StatusJson = decode_versioned(payload, MAX_CLOUD_JSON_LEN)?;
    let missing = |what: &str| JsonError::Schema(alloc::format!("{what} status needs {what}"));
    let status = match j.state {
        StatusState::Applied => BundleStatus::Applied {
            version: j.version,
            hash: j.hash.ok_or_else(|| missing("hash"))?,
            rule_count: j.rule_count.ok_or_else(|| missing("rule_count"))?,
            memory_bytes: j.memory_bytes.ok_or_else(|| missing("memory_bytes"))?,
        },
        StatusState::Rejected => BundleStatus::Rejected {
            version: j.version,
            reason: j.reason.ok_or_else(|| missing("reason"))?,
            errors: j.errors.unwrap_or_default(),
        },
    };
    status.validate()?;
    Ok(status)
}

// ---------------------------------------------------------------- gateway status, dead letters

/// Whether the gateway is connected (the `offline` form is its MQTT last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    /// Running and connected.
    Online,
    /// Stopped or disconnected.
    Offline,
}

/// Writes `{"v":1,"gateway":"gw-1","state":"online","rules_version":7}`
/// (`rules_version` left out when no bundle is applied).
pub fn encode_status(
    gateway: &str,
    state: GatewayState,
    rules_version: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), JsonError> {
    #[derive(Serialize)]
    struct Status<'a> {
        v: u64,
        gateway: &'a str,
        state: GatewayState,
        #[serde(skip_serializing_if = "Option::is_none")]
        rules_version: Option<u64>,
    }
    check_gateway(gateway)?;
    write_json(
        &Status {
            v: JSON_SCHEMA_VERSION,
            gateway,
            state,
            rules_version,
        },
        out,
    )
}

/// Longest payload excerpt a dead letter carries, in bytes.
pub const MAX_DEAD_LETTER_PAYLOAD_LEN: usize = 1024;

/// Writes `{"v":1,"gateway":..,"source":..,"where":..,"reason":..,"payload":..}`.
///
/// `payload` is cut to [`MAX_DEAD_LETTER_PAYLOAD_LEN`] bytes (at a character
/// boundary) so one bad input cannot make a huge dead letter; bytes that are
/// not UTF-8 are replaced with U+FFFD.
pub fn encode_dead_letter(
    gateway: &str,
    source: &str,
    where_: &str,
    reason: &str,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), JsonError> {
    #[derive(Serialize)]
    struct DeadLetter<'a> {
        v: u64,
        gateway: &'a str,
        source: &'a str,
        #[serde(rename = "where")]
        where_: &'a str,
        reason: &'a str,
        payload: &'a str,
    }
    check_gateway(gateway)?;
    let cut = &payload[..payload.len().min(MAX_DEAD_LETTER_PAYLOAD_LEN)];
    let text = String::from_utf8_lossy(cut);
    let mut text: String = text.into_owned();
    while text.len() > MAX_DEAD_LETTER_PAYLOAD_LEN {
        text.pop();
    }
    let dl = DeadLetter {
        v: JSON_SCHEMA_VERSION,
        gateway,
        source,
        where_,
        reason,
        payload: &text,
    };
    write_json(&dl, out)
}
