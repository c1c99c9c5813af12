//! Wire types shared by the gateway, its devices and the cloud.
//!
//! Every string and list is a `heapless` container whose capacity is a named
//! limit in [`crate::limits`], so a decoded value can never be larger than the
//! contract allows and no type needs an allocator.
//!
//! The derived (or hand-written) serde impls of these types are the compact
//! **postcard** form used on serial links: fields in declaration order, enums
//! by variant index. Do not reorder fields or variants: that changes the wire
//! format (the golden tests will fail).
//! The cloud JSON shapes are produced and read by [`crate::json`], which adds
//! the `"v"` schema version and the gateway id around these types.
//!
//! Decoding a type only guarantees its sizes. Its *content* rules (names that
//! are safe inside MQTT topics, finite numbers, `expires_at >= issued_at`) are
//! checked by `validate()`, which every decoder and encoder of this crate
//! calls, so a value that came through a codec of this crate is valid.

use core::fmt;

use heapless::{String, Vec};
use serde::de::{self, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::*;

/// A device identifier (`boiler-1`).
pub type DeviceId = String<MAX_DEVICE_LEN>;
/// A metric name (`temperature`).
pub type MetricName = String<MAX_METRIC_LEN>;
/// A gateway identifier (`gw-1`).
pub type GatewayId = String<MAX_GATEWAY_LEN>;
/// A rule name (`overheat`).
pub type RuleName = String<MAX_RULE_NAME_LEN>;
/// A command identifier (`c-123`), chosen by whoever issued the command.
pub type CommandId = String<MAX_COMMAND_ID_LEN>;
/// Command arguments: name -> number, bool or string.
pub type CommandArgs = BoundedMap<String<MAX_ARG_KEY_LEN>, ArgValue, MAX_COMMAND_ARGS>;
/// Telemetry tags: key -> string.
pub type Tags = BoundedMap<String<MAX_TAG_KEY_LEN>, String<MAX_TAG_VALUE_LEN>, MAX_TAGS>;

/// Why a decoded value breaks a content rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidField {
    /// The field at fault (`"device"`, `"value"`, ...).
    pub field: &'static str,
    /// What is wrong with it, in words.
    pub reason: &'static str,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` {}", self.field, self.reason)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for InvalidField {}

/// Reason given when a name contains a byte outside the allowed set.
pub const NAME_CHARSET_REASON: &str =
    "must be printable ASCII without spaces, `/`, `+` or `#` (it becomes part of MQTT topics)";

/// Checks a name that ends up in MQTT topics or rule references.
///
/// Names are non-empty printable ASCII (`0x21..=0x7E`) without `/`, `+` and
/// `#`, so a device id can never add topic levels or wildcards to
/// `devices/{device}/commands`.
pub fn check_name(field: &'static str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() {
        return Err(InvalidField {
            field,
            reason: "must not be empty",
        });
    }
    if name.bytes().all(is_name_byte) {
        Ok(())
    } else {
        Err(InvalidField {
            field,
            reason: NAME_CHARSET_REASON,
        })
    }
}

/// Whether `b` may appear in a name (see [`check_name`]).
pub fn is_name_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'/' && b != b'+' && b != b'#'
}

fn check_finite(field: &'static str, v: f64) -> Result<(), InvalidField> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(InvalidField {
            field,
            reason: "must be a finite number",
        })
    }
}

/// One measurement from a device, as it arrives at the gateway.
///
/// `ts` is optional because many microcontrollers have no wall clock: the
/// gateway stamps readings without one on receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The device that measured.
    pub device: DeviceId,
    /// What was measured.
    pub metric: MetricName,
    /// The measured value; must be finite (report faults through `quality`).
    pub value: f64,
    /// Milliseconds since the Unix epoch, if the device knows the time.
    pub ts: Option<u64>,
    /// The device's own sequence number, to detect gaps and duplicates.
    pub seq: Option<u32>,
    /// Device-defined quality indicator (e.g. 0 = bad .. 100 = good).
    pub quality: Option<u8>,
}

impl Reading {
    /// Checks the content rules (names, finite value).
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("device", &self.device)?;
        check_name("metric", &self.metric)?;
        check_finite("value", self.value)
    }
}

/// Several readings sent in one serial frame.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReadingBatch {
    /// At most [`MAX_BATCH_READINGS`] readings.
    pub readings: Vec<Reading, MAX_BATCH_READINGS>,
}

impl ReadingBatch {
    /// Checks every reading; an empty batch is invalid (it carries nothing).
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.readings.is_empty() {
            return Err(InvalidField {
                field: "readings",
                reason: "must not be empty",
            });
        }
        self.readings.iter().try_for_each(Reading::validate)
    }
}

/// A small map kept as an ordered list of at most `N` entries.
///
/// Serialized as a map in every format (a JSON object; a postcard length
/// followed by key/value pairs). Decoding rejects duplicate keys rather than
/// letting the last one win silently, and rejects more than `N` entries.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundedMap<K, V, const N: usize>(pub Vec<(K, V), N>);

impl<K, V, const N: usize> Default for BoundedMap<K, V, N> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<const K: usize, V, const N: usize> BoundedMap<String<K>, V, N> {
    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    /// Inserts or replaces `key`; hands the entry back if the map is full or
    /// the key is longer than `K`.
    pub fn insert(&mut self, key: &str, value: V) -> Result<(), (String<K>, V)> {
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| k.as_str() == key) {
            slot.1 = value;
            return Ok(());
        }
        match String::try_from(key) {
            Ok(k) => self.0.push((k, value)),
            Err(_) => Err((String::new(), value)),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl<K: Serialize, V: Serialize, const N: usize> Serialize for BoundedMap<K, V, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, K, V, const N: usize> Deserialize<'de> for BoundedMap<K, V, N>
where
    K: Deserialize<'de> + PartialEq,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V, const N: usize>(core::marker::PhantomData<(K, V)>);
        impl<'de, K, V, const N: usize> Visitor<'de> for MapVisitor<K, V, N>
        where
            K: Deserialize<'de> + PartialEq,
            V: Deserialize<'de>,
        {
            type Value = BoundedMap<K, V, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a map with at most {N} entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = access.next_entry::<K, V>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(de::Error::custom("duplicate key in map"));
                    }
                    if out.push((k, v)).is_err() {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                }
                Ok(BoundedMap(out))
            }
        }
        d.deserialize_map(MapVisitor(core::marker::PhantomData))
    }
}

/// One command argument value.
///
/// In JSON this is a bare number, bool or string (integers stay integers, so
/// `{"percent":40}` is re-encoded as `40`, not `40.0`). In postcard it is a
/// tagged enum: variant index 0 = `Int` (zigzag varint), 1 = `Float` (f64
/// little-endian), 2 = `Bool`, 3 = `Str`.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    /// A whole number.
    Int(i64),
    /// A number with a fraction (finite).
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A short string.
    Str(String<MAX_ARG_STR_LEN>),
}

/// The postcard form of [`ArgValue`].
#[derive(Serialize, Deserialize)]
#[serde(rename = "ArgValue")]
enum TaggedArgValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String<MAX_ARG_STR_LEN>),
}

impl Serialize for ArgValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match self {
                ArgValue::Int(v) => s.serialize_i64(*v),
                ArgValue::Float(v) => s.serialize_f64(*v),
                ArgValue::Bool(v) => s.serialize_bool(*v),
                ArgValue::Str(v) => s.serialize_str(v),
            }
        } else {
            match self {
                ArgValue::Int(v) => s.serialize_newtype_variant("ArgValue", 0, "Int", v),
                ArgValue::Float(v) => s.serialize_newtype_variant("ArgValue", 1, "Float", v),
                ArgValue::Bool(v) => s.serialize_newtype_variant("ArgValue", 2, "Bool", v),
                ArgValue::Str(v) => s.serialize_newtype_variant("ArgValue", 3, "Str", v),
            }
        }
    }
}

impl<'de> Deserialize<'de> for ArgValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return Ok(match TaggedArgValue::deserialize(d)? {
                TaggedArgValue::Int(v) => ArgValue::Int(v),
                TaggedArgValue::Float(v) => ArgValue::Float(v),
                TaggedArgValue::Bool(v) => ArgValue::Bool(v),
                TaggedArgValue::Str(v) => ArgValue::Str(v),
            });
        }
        struct AnyVisitor;
        impl Visitor<'_> for AnyVisitor {
            type Value = ArgValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a number, a bool or a string of at most {MAX_ARG_STR_LEN} bytes"
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ArgValue, E> {
                Ok(ArgValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ArgValue, E> {
                Ok(match i64::try_from(v) {
                    Ok(i) => ArgValue::Int(i),
                    Err(_) => ArgValue::Float(v as f64),
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ArgValue, E> {
                Ok(ArgValue::Float(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ArgValue, E> {
                Ok(ArgValue::Bool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ArgValue, E> {
                String::try_from(v)
                    .map(ArgValue::Str)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_any(AnyVisitor)
    }
}

/// A command for a device, from the cloud (JSON) or to a device (JSON over
/// MQTT, or postcard over serial).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Identifier chosen by the issuer; outcomes refer to it.
    pub id: CommandId,
    /// The device that must act.
    pub device: DeviceId,
    /// What to do (`set_position`).
    pub name: String<MAX_COMMAND_NAME_LEN>,
    /// Named arguments.
    #[serde(default)]
    pub args: CommandArgs,
    /// When the command was issued, ms since the Unix epoch.
    pub issued_at: u64,
    /// After this instant (ms since the Unix epoch) the command must not be
    /// executed; the gateway reports `timed_out` instead.
    pub expires_at: u64,
}

impl Command {
    /// Checks names and that the command does not expire before it is issued.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("id", &self.id)?;
        check_name("device", &self.device)?;
        check_name("name", &self.name)?;
        for (key, value) in self.args.iter() {
            check_name("args", key)?;
            if let ArgValue::Float(v) = value {
                check_finite("args", *v)?;
            }
        }
        if self.expires_at < self.issued_at {
            return Err(InvalidField {
                field: "expires_at",
                reason: "must not be before issued_at",
            });
        }
        Ok(())
    }
}

/// What became of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    /// The device took the command and will act on it.
    Accepted,
    /// The device (or gateway) refused it; `detail` says why.
    Rejected,
    /// The device carried it out.
    Succeeded,
    /// The device tried and failed; `detail` says why.
    Failed,
    /// No final answer arrived before `expires_at`.
    TimedOut,
}

impl OutcomeState {
    /// Whether no further outcome will follow for this command.
    pub fn is_final(self) -> bool {
        !matches!(self, OutcomeState::Accepted)
    }

    /// The JSON spelling (`"timed_out"`).
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeState::Accepted => "accepted",
            OutcomeState::Rejected => "rejected",
            OutcomeState::Succeeded => "succeeded",
            OutcomeState::Failed => "failed",
            OutcomeState::TimedOut => "timed_out",
        }
    }
}

/// A report on a command, from the device or the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CommandOutcome {
    /// The command's `id`.
    pub id: CommandId,
    /// The device the command was for.
    pub device: DeviceId,
    /// What happened.
    pub state: OutcomeState,
    /// Free text for people; may be empty.
    #[serde(default)]
    pub detail: String<MAX_DETAIL_LEN>,
    /// When it happened, ms since the Unix epoch; devices without a clock
    /// leave it out and the gateway stamps it.
    #[serde(default)]
    pub ts: Option<u64>,
}

impl Serialize for CommandOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // JSON leaves out an unknown `ts` instead of writing `null`; postcard
        // is positional and must always write every field.
        let human = s.is_human_readable();
        let mut st = s.serialize_struct("CommandOutcome", 5)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("device", &self.device)?;
        st.serialize_field("state", &self.state)?;
        st.serialize_field("detail", &self.detail)?;
        match (human, self.ts) {
            (true, None) => st.skip_field("ts")?,
            (true, Some(ts)) => st.serialize_field("ts", &ts)?,
            (false, ts) => st.serialize_field("ts", &ts)?,
        }
        st.end()
    }
}

impl CommandOutcome {
    /// Checks names.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("id", &self.id)?;
        check_name("device", &self.device)
    }
}

/// Every message that travels over a binary serial link.
///
/// Postcard encodes the variant as its index (a one-byte varint): 0 =
/// `Reading`, 1 = `Batch`, 2 = `Outcome` (device -> gateway), 3 = `Command`
/// (gateway -> device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceMessage {
    /// One measurement (device -> gateway).
    Reading(Reading),
    /// Several measurements (device -> gateway).
    Batch(ReadingBatch),
    /// A reply to a command (device -> gateway).
    Outcome(CommandOutcome),
    /// Something to do (gateway -> device).
    Command(Command),
}

impl DeviceMessage {
    /// Checks the content rules of the message inside.
    pub fn validate(&self) -> Result<(), InvalidField> {
        match self {
            DeviceMessage::Reading(r) => r.validate(),
            DeviceMessage::Batch(b) => b.validate(),
            DeviceMessage::Outcome(o) => o.validate(),
            DeviceMessage::Command(c) => c.validate(),
        }
    }
}

/// A reading as the gateway forwards it to the cloud: always timestamped and
/// numbered with the gateway's outbox sequence.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TelemetryReading {
    /// The device that measured.
    pub device: DeviceId,
    /// What was measured.
    pub metric: MetricName,
    /// The value (finite).
    pub value: f64,
    /// ms since the Unix epoch (device time, or gateway receipt time).
    pub ts: u64,
    /// The gateway's outbox sequence number.
    pub seq: u64,
    /// The device's quality indicator, if it gave one.
    #[serde(default)]
    pub quality: Option<u8>,
    /// Static tags from the gateway's configuration.
    #[serde(default)]
    pub tags: Tags,
}

impl Serialize for TelemetryReading {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // JSON omits absent optional fields (the contract says "optional",
        // not "null"); postcard is positional and writes every field.
        let human = s.is_human_readable();
        let mut st = s.serialize_struct("TelemetryReading", 7)?;
        st.serialize_field("device", &self.device)?;
        st.serialize_field("metric", &self.metric)?;
        st.serialize_field("value", &self.value)?;
        st.serialize_field("ts", &self.ts)?;
        st.serialize_field("seq", &self.seq)?;
        match (human, self.quality) {
            (true, None) => st.skip_field("quality")?,
            (true, Some(q)) => st.serialize_field("quality", &q)?,
            (false, q) => st.serialize_field("quality", &q)?,
        }
        if human && self.tags.is_empty() {
            st.skip_field("tags")?;
        } else {
            st.serialize_field("tags", &self.tags)?;
        }
        st.end()
    }
}

impl TelemetryReading {
    /// Checks names and the value.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("device", &self.device)?;
        check_name("metric", &self.metric)?;
        check_finite("value", self.value)?;
        for (key, _) in self.tags.iter() {
            check_name("tags", key)?;
        }
        Ok(())
    }
}

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Worth looking at.
    Warning,
    /// Worth acting on now.
    Critical,
}

/// Whether an alert begins or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition became true.
    Raised,
    /// The condition is no longer true.
    Cleared,
}

/// A rule's alert, as sent to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// The gateway's outbox sequence number.
    pub seq: u64,
    /// The rule that fired.
    pub rule: RuleName,
    /// The device the reading came from.
    pub device: DeviceId,
    /// How bad it is.
    pub severity: Severity,
    /// Raised or cleared.
    pub state: AlertState,
    /// The latest value of the rule's first metric when the alert changed state. NaN when
    /// that metric has no reading yet (say `missing(vibration, 30s)` on a device that never
    /// sent `vibration`): JSON leaves the field out then. Never infinite.
    pub value: f64,
    /// When, ms since the Unix epoch.
    pub ts: u64,
    /// Text for people.
    pub message: String<MAX_ALERT_MESSAGE_LEN>,
}

impl AlertEvent {
    /// Checks names and the value (finite, or NaN for none).
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("rule", &self.rule)?;
        check_name("device", &self.device)?;
        if self.value.is_infinite() {
            return Err(InvalidField {
                field: "value",
                reason: "must be a finite number, or NaN for none",
            });
        }
        Ok(())
    }
}

/// A windowed aggregate a rule computed, as sent to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateRecord {
    /// The gateway's outbox sequence number.
    pub seq: u64,
    /// The rule that computed it.
    pub rule: RuleName,
    /// The device the readings came from.
    pub device: DeviceId,
    /// The metric aggregated.
    pub metric: MetricName,
    /// Window start, ms since the Unix epoch (inclusive).
    pub start: u64,
    /// Window end, ms since the Unix epoch (exclusive).
    pub end: u64,
    /// Readings in the window (at least one).
    pub count: u32,
    /// Mean of the readings.
    pub avg: f64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
}

impl AggregateRecord {
    /// Checks names, that the window is not empty or reversed, and finite numbers.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_name("rule", &self.rule)?;
        check_name("device", &self.device)?;
        check_name("metric", &self.metric)?;
        if self.end < self.start {
            return Err(InvalidField {
                field: "end",
                reason: "must not be before start",
            });
        }
        if self.count == 0 {
            return Err(InvalidField {
                field: "count",
                reason: "must be at least 1",
            });
        }
        check_finite("avg", self.avg)?;
        check_finite("min", self.min)?;
        check_finite("max", self.max)
    }
}

/// One compile error in a rejected rule bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleError {
    /// 1-based line in the rule text.
    pub line: u32,
    /// 1-based column in the rule text.
    pub column: u32,
    /// What is wrong.
    pub message: String<MAX_BUNDLE_ERROR_MESSAGE_LEN>,
}

/// The gateway's answer to a rule bundle.
// Boxing would need an allocator; these values live in fixed memory on purpose.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BundleStatus {
    /// The bundle compiled and is now running.
    Applied {
        /// The bundle's version.
        version: u64,
        /// Hex digest of the rule text that is running.
        hash: String<MAX_HASH_LEN>,
        /// Number of rules compiled.
        rule_count: u32,
        /// Memory the compiled plan reserved, in bytes.
        memory_bytes: u64,
    },
    /// The bundle was refused; the previous rules keep running.
    Rejected {
        /// The bundle's version (0 if it could not be read at all).
        version: u64,
        /// Why, in one line.
        reason: String<MAX_REASON_LEN>,
        /// Compile errors with positions; may be empty.
        errors: Vec<BundleError, MAX_BUNDLE_ERRORS>,
    },
}

impl BundleStatus {
    /// The bundle version this status is about.
    pub fn version(&self) -> u64 {
        match self {
            BundleStatus::Applied { version, .. } | BundleStatus::Rejected { version, .. } => {
                *version
            }
        }
    }

    /// Checks the hash is lowercase hex.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let BundleStatus::Applied { hash, .. } = self {
            if hash.is_empty()
                || !hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(InvalidField {
                    field: "hash",
                    reason: "must be lowercase hex",
                });
            }
        }
        Ok(())
    }
}

/// Copies `s` into a bounded string, or says which field was too long.
pub fn bounded<const N: usize>(field: &'static str, s: &str) -> Result<String<N>, InvalidField> {
    String::try_from(s).map_err(|_| InvalidField {
        field,
        reason: "is too long",
    })
}
