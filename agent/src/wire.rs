//! JSON forms of outbox records as they are published to the cloud (README.md, "Topics").

use serde::Serialize;

use crate::outbox::Stored;
use crate::record::Record;

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

/// Encodes a single non-reading record (alert, aggregate, dead letter, control message).
pub fn single(gateway: &str, s: &Stored, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.clear();
    let v = match &s.record {
        Record::Control(c) => {
            out.extend_from_slice(&c.payload);
            return Ok(());
        }
        Record::Alert(a) => serde_json::json!({
            "v": 1, "gateway": gateway, "seq": s.seq, "rule": a.rule, "device": a.device,
            "severity": a.severity, "state": if a.raised { "raised" } else { "cleared" },
            "value": a.value, "ts": a.ts_ms, "message": a.message,
        }),
        Record::Aggregate(g) => serde_json::json!({
            "v": 1, "gateway": gateway, "seq": s.seq, "rule": g.rule, "device": g.device,
            "metric": g.metric, "start": g.start_ms, "end": g.end_ms, "count": g.count,
            "avg": g.avg, "min": g.min, "max": g.max,
        }),
        Record::DeadLetter(d) => serde_json::json!({
            "v": 1, "gateway": gateway, "seq": s.seq, "source": d.source, "where": d.location,
            "reason": d.reason, "payload": String::from_utf8_lossy(&d.payload), "ts": d.ts_ms,
        }),
        Record::Reading(r) => serde_json::json!({
            "v": 1, "gateway": gateway,
            "readings": [{"device": r.device, "metric": r.metric, "value": r.value, "ts": r.ts_ms, "seq": s.seq}],
        }),
    };
    serde_json::to_writer(&mut *out, &v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncation_respects_char_boundaries() {
        let s: heapless::String<4> = super::truncated("aéé");
        assert_eq!(s.as_str(), "aé");
    }
}
