//! Text serial framing for the sensors people actually have.
//!
//! Many sensors print one line per sample. [`LineAccumulator`] cuts a byte
//! stream into lines; a parser then turns a line into a [`TextRecord`]: one
//! or more metric values sharing an optional device, timestamp, sequence
//! number and quality. Three line formats are understood:
//!
//! | format | example |
//! |---|---|
//! | JSON object ([`parse_json_line`], feature `alloc`) | `{"temperature":23.5,"humidity":41,"ts":1700000000123}` |
//! | `key=value` pairs ([`parse_kv_line`]) | `temperature=23.5 humidity=41 ts=1700000000123` |
//! | CSV with a configured column map ([`CsvMap::parse`]) | `1700000000123,23.5,41` with columns `ts,temperature,humidity` |
//!
//! In the JSON and `key=value` forms the keys `device`, `ts`, `seq` and
//! `quality` are reserved; every other key is a metric whose value must be a
//! finite number. `key=value` pairs are separated by spaces, tabs, commas or
//! semicolons.
//!
//! # Guarantees
//!
//! - A line is at most `N` bytes (the accumulator's size, default
//!   [`MAX_LINE_LEN`] plus room for a `\r`). A longer line is discarded up to
//!   its newline and reported once as [`LineError::TooLong`]; the next line is
//!   read normally.
//! - Lines end at `\n`; one trailing `\r` is removed. Blank lines are skipped.
//! - Every malformed line gives one [`TextError`] naming the 1-based field
//!   (pair, column or JSON key) at fault and what is wrong with it.
//! - Nothing allocates (except [`parse_json_line`], which needs `alloc` only
//!   because `serde_json` does) and nothing panics, whatever the input.

use core::fmt;
use core::str::FromStr;

use heapless::Vec;

use crate::limits::{MAX_CSV_COLUMNS, MAX_LINE_LEN, MAX_LINE_VALUES, MAX_METRIC_LEN};
use crate::types::{check_name, DeviceId, MetricName, Reading};

/// Why a line could not be cut from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// The line was longer than the accumulator; `len` bytes were discarded
    /// (up to and including its newline).
    TooLong {
        /// Bytes discarded.
        len: usize,
    },
    /// The line is not UTF-8.
    NotUtf8,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::TooLong { len } => write!(f, "line too long ({len} bytes), discarded"),
            LineError::NotUtf8 => write!(f, "line is not UTF-8"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for LineError {}

/// What one call to [`LineAccumulator::feed`] found.
#[derive(Debug)]
pub enum LineFeed<'s, 'a> {
    /// All input was taken; no line is complete yet. Read more.
    Consumed,
    /// A complete, non-blank line (terminator removed). Feed `remaining` next.
    Line {
        /// The line, borrowed from the accumulator.
        line: &'s str,
        /// Input after the line's newline.
        remaining: &'a [u8],
    },
    /// A line was refused. Count it, then feed `remaining`.
    Error {
        /// Why.
        error: LineError,
        /// Input after the line's newline.
        remaining: &'a [u8],
    },
}

/// Cuts a byte stream into lines of at most `N` bytes, in fixed memory.
#[derive(Debug)]
pub struct LineAccumulator<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Bytes dropped from the current line since it overflowed.
    dropped: usize,
    overflowed: bool,
}

/// A line accumulator for [`MAX_LINE_LEN`]-byte lines ending in `\r\n` or `\n`.
pub type DefaultLineAccumulator = LineAccumulator<{ MAX_LINE_LEN + 1 }>;

impl<const N: usize> Default for LineAccumulator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LineAccumulator<N> {
    /// An empty accumulator.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            dropped: 0,
            overflowed: false,
        }
    }

    /// Forgets any partial line (e.g. after the port was reopened).
    pub fn reset(&mut self) {
        self.len = 0;
        self.dropped = 0;
        self.overflowed = false;
    }

    /// Takes bytes until one line is complete or the input runs out.
    ///
    /// Call again with `remaining` until it returns [`LineFeed::Consumed`].
    pub fn feed<'s, 'a>(&'s mut self, mut input: &'a [u8]) -> LineFeed<'s, 'a> {
        loop {
            let Some(pos) = input.iter().position(|&b| b == b'\n') else {
                self.take(input);
                return LineFeed::Consumed;
            };
            let (chunk, rest) = (&input[..pos], &input[pos + 1..]);
            self.take(chunk);
            if self.overflowed {
                let len = self.len + self.dropped + 1;
                self.reset();
                return LineFeed::Error {
                    error: LineError::TooLong { len },
                    remaining: rest,
                };
            }
            let mut len = self.len;
            self.len = 0;
            if len > 0 && self.buf[len - 1] == b'\r' {
                len -= 1;
            }
            if self.buf[..len].iter().all(u8::is_ascii_whitespace) {
                input = rest;
                continue;
            }
            return match core::str::from_utf8(&self.buf[..len]) {
                Ok(line) => LineFeed::Line {
                    line,
                    remaining: rest,
                },
                Err(_) => LineFeed::Error {
                    error: LineError::NotUtf8,
                    remaining: rest,
                },
            };
        }
    }

    fn take(&mut self, chunk: &[u8]) {
        if self.overflowed {
            self.dropped += chunk.len();
            return;
        }
        match self.buf.get_mut(self.len..self.len + chunk.len()) {
            Some(dst) => {
                dst.copy_from_slice(chunk);
                self.len += chunk.len();
            }
            None => {
                self.overflowed = true;
                self.dropped = self.len + chunk.len();
                self.len = 0;
            }
        }
    }
}

/// The values one text line carried.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextRecord {
    /// The `device` key/column, if the line names one.
    pub device: Option<DeviceId>,
    /// The `ts` key/column (ms since the Unix epoch), if present.
    pub ts: Option<u64>,
    /// The `seq` key/column, if present.
    pub seq: Option<u32>,
    /// The `quality` key/column, if present.
    pub quality: Option<u8>,
    /// Metric name and value pairs, in line order (at least one).
    pub values: Vec<(MetricName, f64), MAX_LINE_VALUES>,
}

impl TextRecord {
    /// One [`Reading`] per value; `default_device` (usually from the serial
    /// port's configuration) is used when the line names no device.
    pub fn readings<'r>(
        &'r self,
        default_device: &'r DeviceId,
    ) -> impl Iterator<Item = Reading> + 'r {
        let device = self.device.as_ref().unwrap_or(default_device);
        self.values.iter().map(move |(metric, value)| Reading {
            device: device.clone(),
            metric: metric.clone(),
            value: *value,
            ts: self.ts,
            seq: self.seq,
            quality: self.quality,
        })
    }

    /// Stores one key/value pair, given as text, classifying reserved keys.
    fn set(&mut self, key: &str, value: Field<'_>, field: usize) -> Result<(), TextError> {
        let err = |kind| TextError { field, kind };
        match key {
            "device" => {
                let Field::Text(v) = value else {
                    return Err(err(TextErrorKind::BadDevice));
                };
                check_name("device", v).map_err(|_| err(TextErrorKind::BadDevice))?;
                let v = DeviceId::try_from(v).map_err(|_| err(TextErrorKind::BadDevice))?;
                replace(&mut self.device, v).map_err(|_| err(TextErrorKind::DuplicateKey))
            }
            "ts" => {
                let v = value.integer().ok_or(err(TextErrorKind::BadInteger))?;
                replace(&mut self.ts, v).map_err(|_| err(TextErrorKind::DuplicateKey))
            }
            "seq" => {
                let v = value.integer().ok_or(err(TextErrorKind::BadInteger))?;
                let v = u32::try_from(v).map_err(|_| err(TextErrorKind::BadInteger))?;
                replace(&mut self.seq, v).map_err(|_| err(TextErrorKind::DuplicateKey))
            }
            "quality" => {
                let v = value.integer().ok_or(err(TextErrorKind::BadInteger))?;
                let v = u8::try_from(v).map_err(|_| err(TextErrorKind::BadInteger))?;
                replace(&mut self.quality, v).map_err(|_| err(TextErrorKind::DuplicateKey))
            }
            metric => {
                if metric.len() > MAX_METRIC_LEN || check_name("metric", metric).is_err() {
                    return Err(err(TextErrorKind::BadKey));
                }
                if self.values.iter().any(|(m, _)| m.as_str() == metric) {
                    return Err(err(TextErrorKind::DuplicateKey));
                }
                let v = value.number().map_err(err)?;
                let name = MetricName::try_from(metric).map_err(|_| err(TextErrorKind::BadKey))?;
                self.values
                    .push((name, v))
                    .map_err(|_| err(TextErrorKind::TooManyValues))
            }
        }
    }

    fn finish(self) -> Result<Self, TextError> {
        if self.values.is_empty() {
            Err(TextError {
                field: 0,
                kind: TextErrorKind::NoValues,
            })
        } else {
            Ok(self)
        }
    }
}

fn replace<T>(slot: &mut Option<T>, v: T) -> Result<(), ()> {
    if slot.is_some() {
        return Err(());
    }
    *slot = Some(v);
    Ok(())
}

/// A value as found in a line, before it is known what it must be.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "alloc"), allow(dead_code))] // JSON-only variants
enum Field<'a> {
    /// Unquoted text (`key=value`, CSV) or a JSON string.
    Text(&'a str),
    /// A JSON number.
    Number(f64),
    /// A JSON unsigned integer.
    Unsigned(u64),
    /// Any other JSON value (bool, null, array, object, negative integer
    /// where a count is expected...).
    Other,
}

impl Field<'_> {
    fn number(self) -> Result<f64, TextErrorKind> {
        let v = match self {
            Field::Text(t) => f64::from_str(t.trim()).map_err(|_| TextErrorKind::BadNumber)?,
            Field::Number(v) => v,
            Field::Unsigned(v) => v as f64,
            Field::Other => return Err(TextErrorKind::BadNumber),
        };
        if v.is_finite() {
            Ok(v)
        } else {
            Err(TextErrorKind::NonFinite)
        }
    }

    fn integer(self) -> Option<u64> {
        match self {
            Field::Text(t) => u64::from_str(t.trim()).ok(),
            Field::Unsigned(v) => Some(v),
            _ => None,
        }
    }
}

/// What is wrong with a text line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextErrorKind {
    /// The line carries no metric value.
    NoValues,
    /// A `key=value` pair has no `=`.
    MissingEquals,
    /// A key is empty, too long, or not a valid metric name.
    BadKey,
    /// A metric value is not a number.
    BadNumber,
    /// A metric value is infinite or NaN.
    NonFinite,
    /// `ts`, `seq` or `quality` is not a non-negative integer in range.
    BadInteger,
    /// `device` is not a valid device id.
    BadDevice,
    /// A key appears twice.
    DuplicateKey,
    /// More than [`MAX_LINE_VALUES`] metric values.
    TooManyValues,
    /// A CSV line has the wrong number of columns.
    ColumnCount {
        /// Columns in the map.
        expected: usize,
        /// Columns in the line (counting stops one past `expected`).
        found: usize,
    },
    /// A JSON line is not valid JSON.
    NotJson,
    /// A JSON line is valid JSON but not an object.
    NotObject,
}

/// A malformed text line: which field, and what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextError {
    /// 1-based number of the pair, column or JSON key at fault; 0 when the
    /// line as a whole is at fault.
    pub field: usize,
    /// What is wrong.
    pub kind: TextErrorKind,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            TextErrorKind::NoValues => "line has no metric values",
            TextErrorKind::MissingEquals => "pair has no `=`",
            TextErrorKind::BadKey => "key is empty, too long or not a valid metric name",
            TextErrorKind::BadNumber => "value is not a number",
            TextErrorKind::NonFinite => "value is infinite or NaN",
            TextErrorKind::BadInteger => "value must be a non-negative integer in range",
            TextErrorKind::BadDevice => "device is not a valid device id",
            TextErrorKind::DuplicateKey => "key appears twice",
            TextErrorKind::TooManyValues => "too many values in one line",
            TextErrorKind::ColumnCount { expected, found } => {
                return write!(f, "expected {expected} columns, found {found}");
            }
            TextErrorKind::NotJson => "line is not valid JSON",
            TextErrorKind::NotObject => "line is JSON but not an object",
        };
        if self.field == 0 {
            f.write_str(what)
        } else {
            write!(f, "field {}: {what}", self.field)
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TextError {}

/// Parses `key=value` pairs separated by spaces, tabs, commas or semicolons:
/// `temperature=23.5 humidity=41 ts=1700000000123`.
pub fn parse_kv_line(line: &str) -> Result<TextRecord, TextError> {
    let mut rec = TextRecord::default();
    let pairs = line.split([' ', '\t', ',', ';']).filter(|p| !p.is_empty());
    for (i, pair) in pairs.enumerate() {
        let field = i + 1;
        let (key, value) = pair.split_once('=').ok_or(TextError {
            field,
            kind: TextErrorKind::MissingEquals,
        })?;
        if key.is_empty() {
            return Err(TextError {
                field,
                kind: TextErrorKind::BadKey,
            });
        }
        rec.set(key, Field::Text(value), field)?;
    }
    rec.finish()
}

/// What one CSV column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsvColumn {
    /// A metric value with this name.
    Metric(MetricName),
    /// The device id (`device`).
    Device,
    /// The timestamp, ms since the Unix epoch (`ts`).
    Ts,
    /// The device sequence number (`seq`).
    Seq,
    /// The quality indicator (`quality`).
    Quality,
    /// A column to ignore (`_`, `-` or empty).
    Skip,
}

/// Why a CSV column map is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvMapError {
    /// More than [`MAX_CSV_COLUMNS`] columns.
    TooManyColumns,
    /// Column `index` (0-based) is not a valid metric name.
    BadName {
        /// 0-based column index.
        index: usize,
    },
    /// Column `index` (0-based) repeats an earlier name.
    Duplicate {
        /// 0-based column index.
        index: usize,
    },
    /// No column is a metric.
    NoMetric,
    /// The delimiter could be part of a number or name; use `,` `;` `|`
    /// tab or space.
    BadDelimiter,
}

impl fmt::Display for CsvMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsvMapError::TooManyColumns => write!(f, "more than {MAX_CSV_COLUMNS} columns"),
            CsvMapError::BadName { index } => {
                write!(f, "column {index}: not a valid metric name")
            }
            CsvMapError::Duplicate { index } => write!(f, "column {index}: name repeated"),
            CsvMapError::NoMetric => write!(f, "no column is a metric"),
            CsvMapError::BadDelimiter => {
                write!(f, "delimiter must be one of `,` `;` `|` tab or space")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CsvMapError {}

/// How to read a CSV line: which column holds what, and the delimiter.
///
/// Built from column names (`["ts", "temperature", "humidity", "_"]`): the
/// names `ts`, `device`, `seq` and `quality` are reserved, `_`, `-` and the
/// empty name skip a column, every other name is a metric. Quoting is not
/// supported: sensor CSV is numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvMap {
    columns: Vec<CsvColumn, MAX_CSV_COLUMNS>,
    delimiter: char,
}

impl CsvMap {
    /// Builds and checks a column map.
    pub fn new<'n>(
        names: impl IntoIterator<Item = &'n str>,
        delimiter: char,
    ) -> Result<Self, CsvMapError> {
        if !matches!(delimiter, ',' | ';' | '|' | '\t' | ' ') {
            return Err(CsvMapError::BadDelimiter);
        }
        let mut columns: Vec<CsvColumn, MAX_CSV_COLUMNS> = Vec::new();
        for (index, name) in names.into_iter().enumerate() {
            let column = match name.trim() {
                "ts" => CsvColumn::Ts,
                "device" => CsvColumn::Device,
                "seq" => CsvColumn::Seq,
                "quality" => CsvColumn::Quality,
                "" | "_" | "-" => CsvColumn::Skip,
                metric => {
                    check_name("metric", metric).map_err(|_| CsvMapError::BadName { index })?;
                    CsvColumn::Metric(
                        MetricName::try_from(metric).map_err(|_| CsvMapError::BadName { index })?,
                    )
                }
            };
            if column != CsvColumn::Skip && columns.contains(&column) {
                return Err(CsvMapError::Duplicate { index });
            }
            columns
                .push(column)
                .map_err(|_| CsvMapError::TooManyColumns)?;
        }
        if !columns.iter().any(|c| matches!(c, CsvColumn::Metric(_))) {
            return Err(CsvMapError::NoMetric);
        }
        Ok(Self { columns, delimiter })
    }

    /// The columns, in order.
    pub fn columns(&self) -> &[CsvColumn] {
        &self.columns
    }

    /// Parses one CSV line; it must have exactly as many columns as the map.
    pub fn parse(&self, line: &str) -> Result<TextRecord, TextError> {
        let mut rec = TextRecord::default();
        let expected = self.columns.len();
        let mut found = 0;
        for (i, cell) in line.split(self.delimiter).enumerate() {
            found = i + 1;
            let Some(column) = self.columns.get(i) else {
                return Err(TextError {
                    field: 0,
                    kind: TextErrorKind::ColumnCount { expected, found },
                });
            };
            let cell = Field::Text(cell.trim());
            match column {
                CsvColumn::Metric(name) => rec.set(name, cell, found)?,
                CsvColumn::Device => rec.set("device", cell, found)?,
                CsvColumn::Ts => rec.set("ts", cell, found)?,
                CsvColumn::Seq => rec.set("seq", cell, found)?,
                CsvColumn::Quality => rec.set("quality", cell, found)?,
                CsvColumn::Skip => {}
            }
        }
        if found != expected {
            return Err(TextError {
                field: 0,
                kind: TextErrorKind::ColumnCount { expected, found },
            });
        }
        rec.finish()
    }
}

/// Parses a flat JSON object line:
/// `{"temperature":23.5,"humidity":41,"ts":1700000000123}`.
///
/// Values of metric keys must be numbers; `device` a string; `ts`, `seq` and
/// `quality` non-negative integers.
#[cfg(feature = "alloc")]
pub fn parse_json_line(line: &str) -> Result<TextRecord, TextError> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};

    struct LineVisitor;
    impl<'de> Visitor<'de> for LineVisitor {
        // Schema problems travel as values so they keep their own kind;
        // only syntax errors come back as `serde_json` errors.
        type Value = Result<TextRecord, TextError>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut rec = TextRecord::default();
            let mut field = 0;
            let mut failure = None;
            while let Some(key) = map.next_key::<alloc::borrow::Cow<'de, str>>()? {
                field += 1;
                if failure.is_some() {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                let value = map.next_value::<JsonField<'de>>()?;
                let f = match &value {
                    JsonField::Text(t) => Field::Text(t),
                    JsonField::Number(v) => Field::Number(*v),
                    JsonField::Unsigned(v) => Field::Unsigned(*v),
                    JsonField::Other => Field::Other,
                };
                if let Err(e) = rec.set(&key, f, field) {
                    failure = Some(e);
                }
            }
            Ok(match failure {
                Some(e) => Err(e),
                None => rec.finish(),
            })
        }
    }

    let mut de = serde_json::Deserializer::from_str(line);
    let result = match (&mut de).deserialize_map(LineVisitor) {
        Ok(r) => r,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(TextError {
                field: 0,
                kind: TextErrorKind::NotObject,
            })
        }
        Err(_) => {
            return Err(TextError {
                field: 0,
                kind: TextErrorKind::NotJson,
            })
        }
    };
    de.end().map_err(|_| TextError {
        field: 0,
        kind: TextErrorKind::NotJson,
    })?;
    result
}

/// A JSON value reduced to what a text line may carry.
#[cfg(feature = "alloc")]
enum JsonField<'de> {
    Text(alloc::borrow::Cow<'de, str>),
    Number(f64),
    Unsigned(u64),
    Other,
}

#[cfg(feature = "alloc")]
impl<'de> serde::Deserialize<'de> for JsonField<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{EnumAccess, IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonField<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(JsonField::Other)
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(JsonField::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(JsonField::Unsigned(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(JsonField::Number(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonField::Text(alloc::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonField::Text(alloc::borrow::Cow::Owned(v.into())))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(JsonField::Other)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(JsonField::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(JsonField::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(JsonField::Other)
            }
            fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
                Ok(JsonField::Other)
            }
        }
        d.deserialize_any(V)
    }
}
