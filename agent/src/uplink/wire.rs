//! JSON forms of outbox records as they are published to the cloud (README.md, "Topics").

use serde::Serialize;

use crate::outbox::record::Record;
use crate::outbox::store::Stored;

/// `s` cut at a character boundary to fit a bounded protocol string (reasons and details the
/// protocol caps, such as a rejected bundle's or command's).
pub fn truncated<const N: usize>(s: &str) -> heapless::String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    heapless::String::try_from(&s[..end]).unwrap_or_default()
}

#[derive(Serialize)]
struct TelemetryItem<'a> {
    device: &'a str,
    metric: &'a str,
    value: f64,
    ts: u64,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<TagMap<'a>>,
}

struct TagMap<'a>(&'a [(String, String)]);

impl Serialize for TagMap<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

#[derive(Serialize)]
struct TelemetryBatch<'a> {
    v: u8,
    gateway: &'a str,
    readings: Vec<TelemetryItem<'a>>,
}

/// Encodes the reading records among `items` as one telemetry batch.
pub fn telemetry_batch(
    gateway: &str,
    items: &[&Stored],
    out: &mut Vec<u8>,
) -> serde_json::Result<()> {
    let readings = items
        .iter()
        .filter_map(|s| match &s.record {
            Record::Reading(r) => Some(TelemetryItem {
                device: &r.device,
                metric: &r.metric,
                value: r.value,
                ts: r.ts_ms,
                seq: s.seq,
                tags: (!r.tags.is_empty()).then_some(TagMap(&r.tags)),
            }),
            _ => None,
        })
        .collect();
    out.clear();
    serde_json::to_writer(
        &mut *out,
        &TelemetryBatch {
            v: 1,
            gateway,
            readings,
        },
    )
}

#[derive(Serialize)]
struct AlertJson<'a> {
    v: u8,
    gateway: &'a str,
    seq: u64,
    rule: &'a str,
    device: &'a str,
    severity: &'a str,
    state: &'a str,
    /// Left out when the rule's first metric had no reading yet (NaN in the record), as the
    /// protocol's alert JSON says.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    ts: u64,
    message: &'a str,
}

#[derive(Serialize)]
struct AggregateJson<'a> {
    v: u8,
    gateway: &'a str,
    seq: u64,
    rule: &'a str,
    device: &'a str,
    metric: &'a str,
    start: u64,
    end: u64,
    count: u32,
    avg: f64,
    min: f64,
    max: f64,
}

#[derive(Serialize)]
struct DeadLetterJson<'a> {
    v: u8,
    gateway: &'a str,
    seq: u64,
    source: &'a str,
    #[serde(rename = "where")]
    location: &'a str,
    reason: &'a str,
    payload: std::borrow::Cow<'a, str>,
    ts: u64,
}

/// Encodes a single non-reading record (alert, aggregate, dead letter, control message).
///
/// Written straight from the record, like the telemetry batch: no `serde_json::Value` in
/// between (that was a map and a string per field, for every alert).
pub fn single(gateway: &str, s: &Stored, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.clear();
    match &s.record {
        Record::Control(c) => {
            out.extend_from_slice(&c.payload);
            Ok(())
        }
        Record::Alert(a) => serde_json::to_writer(
            &mut *out,
            &AlertJson {
                v: 1,
                gateway,
                seq: s.seq,
                rule: &a.rule,
                device: &a.device,
                severity: &a.severity,
                state: if a.raised { "raised" } else { "cleared" },
                value: (!a.value.is_nan()).then_some(a.value),
                ts: a.ts_ms,
                message: &a.message,
            },
        ),
        Record::Aggregate(g) => serde_json::to_writer(
            &mut *out,
            &AggregateJson {
                v: 1,
                gateway,
                seq: s.seq,
                rule: &g.rule,
                device: &g.device,
                metric: &g.metric,
                start: g.start_ms,
                end: g.end_ms,
                count: g.count,
                avg: g.avg,
                min: g.min,
                max: g.max,
            },
        ),
        Record::DeadLetter(d) => serde_json::to_writer(
            &mut *out,
            &DeadLetterJson {
                v: 1,
                gateway,
                seq: s.seq,
                source: &d.source,
                location: &d.location,
                reason: &d.reason,
                payload: String::from_utf8_lossy(&d.payload),
                ts: d.ts_ms,
            },
        ),
        Record::Reading(_) => telemetry_batch(gateway, &[s], out),
    }
}

#[cfg(test)]
mod tests {
    use edgestream_protocol::json;
    use serde_json::Value;

    use super::*;
    use crate::outbox::record::{
        AggregateRecord, AlertRecord, DeadLetterRecord, Priority, ReadingRecord,
    };
    use crate::outbox::store::{key, Stored};

    #[test]
    fn truncation_respects_char_boundaries() {
        let s: heapless::String<4> = super::truncated("aéé");
        assert_eq!(s.as_str(), "aé");
    }

    fn stored(seq: u64, record: Record) -> Stored {
        Stored {
            key: key(Priority::High, seq),
            seq,
            record,
            size: 0,
        }
    }

    fn single_json(record: Record) -> Vec<u8> {
        let mut out = Vec::new();
        single("gw-1", &stored(7, record), &mut out).unwrap();
        out
    }

    /// What the uplink publishes is what the protocol's own decoders (the cloud side's) read.
    #[test]
    fn alerts_and_aggregates_are_what_the_protocol_decodes() {
        let out = single_json(Record::Alert(AlertRecord {
            rule: "overheat".try_into().unwrap(),
            device: "boiler-1".try_into().unwrap(),
            severity: "critical".try_into().unwrap(),
            raised: false,
            value: 91.5,
            ts_ms: 1_700_000_000_123,
            message: "too hot \"now\"".into(),
        }));
        let (gateway, a) = json::decode_alert(&out).unwrap();
        assert_eq!(gateway.as_str(), "gw-1");
        assert_eq!(
            (a.seq, a.rule.as_str(), a.device.as_str()),
            (7, "overheat", "boiler-1")
        );
        assert_eq!(a.severity, edgestream_protocol::types::Severity::Critical);
        assert_eq!(a.state, edgestream_protocol::types::AlertState::Cleared);
        assert_eq!((a.value, a.ts), (91.5, 1_700_000_000_123));
        assert_eq!(a.message.as_str(), "too hot \"now\"");

        // `missing(vibration, 30s)` on a device that never sent `vibration`: no value.
        let out = single_json(Record::Alert(AlertRecord {
            rule: "silent".try_into().unwrap(),
            device: "boiler-1".try_into().unwrap(),
            severity: "warning".try_into().unwrap(),
            raised: true,
            value: f64::NAN,
            ts_ms: 1_700_000_000_123,
            message: "vibration silent".into(),
        }));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains("value"), "{text}");
        let (_, a) = json::decode_alert(&out).unwrap();
        assert!(a.value.is_nan() && a.state == edgestream_protocol::types::AlertState::Raised);

        let out = single_json(Record::Aggregate(AggregateRecord {
            rule: "avg_1m".into(),
            device: "boiler-1".into(),
            metric: "temperature".into(),
            start_ms: 60_000,
            end_ms: 120_000,
            count: 12,
            avg: 20.5,
            min: 19.0,
            max: 22.0,
        }));
        let (gateway, g) = json::decode_aggregate(&out).unwrap();
        assert_eq!(gateway.as_str(), "gw-1");
        assert_eq!(
            (g.seq, g.rule.as_str(), g.metric.as_str()),
            (7, "avg_1m", "temperature")
        );
        assert_eq!((g.start, g.end, g.count), (60_000, 120_000, 12));
        assert_eq!((g.avg, g.min, g.max), (20.5, 19.0, 22.0));
    }

    #[test]
    fn a_dead_letter_keeps_where_and_why_and_its_sample_as_text() {
        let out = single_json(Record::DeadLetter(DeadLetterRecord {
            source: "local-mqtt".into(),
            location: "sensors/d1/t".into(),
            reason: "not a number".into(),
            payload: b"ab\xffc".to_vec(),
            ts_ms: 5,
        }));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "v": 1, "gateway": "gw-1", "seq": 7, "source": "local-mqtt",
                "where": "sensors/d1/t", "reason": "not a number", "payload": "ab\u{fffd}c",
                "ts": 5,
            })
        );
    }

    #[test]
    fn a_reading_sent_alone_is_a_telemetry_batch_of_one() {
        let out = single_json(Record::Reading(ReadingRecord {
            device: "d1".try_into().unwrap(),
            metric: "t".try_into().unwrap(),
            value: 1.5,
            ts_ms: 9,
            tags: vec![("site".into(), "p3".into())],
        }));
        let b = json::decode_telemetry_batch(&out).unwrap();
        assert_eq!(b.gateway.as_str(), "gw-1");
        assert_eq!(b.readings.len(), 1);
        let r = &b.readings[0];
        assert_eq!(
            (r.device.as_str(), r.metric.as_str(), r.value),
            ("d1", "t", 1.5)
        );
        assert_eq!((r.ts, r.seq), (9, 7));
    }
}
