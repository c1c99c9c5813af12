//! Proptest strategies for every wire type, shared by the integration tests.
#![allow(dead_code)]

use edgestream_protocol::limits::*;
use edgestream_protocol::types::*;
use heapless::{String, Vec};
use proptest::collection::vec;
use proptest::prelude::*;

/// Cuts `s` to at most `N` bytes at a character boundary.
pub fn fit<const N: usize>(s: &str) -> String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    String::try_from(&s[..end]).unwrap()
}

/// A valid name (topic-safe) of 1..=N bytes, including the full length.
pub fn name<const N: usize>() -> impl Strategy<Value = String<N>> {
    let re = format!("[A-Za-z0-9_.:!~-]{{1,{N}}}");
    proptest::string::string_regex(&re)
        .unwrap()
        .prop_map(|s| fit::<N>(&s))
}

/// Free text (any Unicode) of at most N bytes.
pub fn text<const N: usize>() -> impl Strategy<Value = String<N>> {
    ".{0,64}".prop_map(|s| fit::<N>(&s))
}

pub fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |v| v.is_finite())
}

pub fn reading() -> impl Strategy<Value = Reading> {
    (
        name(),
        name(),
        finite(),
        any::<Option<u64>>(),
        any::<Option<u32>>(),
        any::<Option<u8>>(),
    )
        .prop_map(|(device, metric, value, ts, seq, quality)| Reading {
            device,
            metric,
            value,
            ts,
            seq,
            quality,
        })
}

pub fn batch() -> impl Strategy<Value = ReadingBatch> {
    vec(reading(), 1..=MAX_BATCH_READINGS).prop_map(|rs| ReadingBatch {
        readings: Vec::from_slice(&rs).unwrap(),
    })
}

pub fn arg_value() -> impl Strategy<Value = ArgValue> {
    prop_oneof![
        any::<i64>().prop_map(ArgValue::Int),
        finite().prop_map(ArgValue::Float),
        any::<bool>().prop_map(ArgValue::Bool),
        text::<MAX_ARG_STR_LEN>().prop_map(ArgValue::Str),
    ]
}

pub fn args() -> impl Strategy<Value = CommandArgs> {
    vec(
        (name::<MAX_ARG_KEY_LEN>(), arg_value()),
        0..=MAX_COMMAND_ARGS,
    )
    .prop_map(|pairs| {
        let mut args = CommandArgs::default();
        for (k, v) in pairs {
            args.insert(&k, v).unwrap();
        }
        args
    })
}

pub fn command() -> impl Strategy<Value = Command> {
    (name(), name(), name(), args(), any::<u64>(), any::<u64>()).prop_map(
        |(id, device, name, args, a, b)| Command {
            id,
            device,
            name,
            args,
            issued_at: a.min(b),
            expires_at: a.max(b),
        },
    )
}

pub fn outcome_state() -> impl Strategy<Value = OutcomeState> {
    prop_oneof![
        Just(OutcomeState::Accepted),
        Just(OutcomeState::Rejected),
        Just(OutcomeState::Succeeded),
        Just(OutcomeState::Failed),
        Just(OutcomeState::TimedOut),
    ]
}

pub fn outcome() -> impl Strategy<Value = CommandOutcome> {
    (
        name(),
        name(),
        outcome_state(),
        text(),
        any::<Option<u64>>(),
    )
        .prop_map(|(id, device, state, detail, ts)| CommandOutcome {
            id,
            device,
            state,
            detail,
            ts,
        })
}

pub fn device_message() -> impl Strategy<Value = DeviceMessage> {
    prop_oneof![
        reading().prop_map(DeviceMessage::Reading),
        batch().prop_map(DeviceMessage::Batch),
        outcome().prop_map(DeviceMessage::Outcome),
        command().prop_map(DeviceMessage::Command),
    ]
}

pub fn tags() -> impl Strategy<Value = Tags> {
    vec(
        (name::<MAX_TAG_KEY_LEN>(), text::<MAX_TAG_VALUE_LEN>()),
        0..=MAX_TAGS,
    )
    .prop_map(|pairs| {
        let mut tags = Tags::default();
        for (k, v) in pairs {
            tags.insert(&k, v).unwrap();
        }
        tags
    })
}

pub fn telemetry() -> impl Strategy<Value = TelemetryReading> {
    (
        name(),
        name(),
        finite(),
        any::<u64>(),
        any::<u64>(),
        any::<Option<u8>>(),
        tags(),
    )
        .prop_map(
            |(device, metric, value, ts, seq, quality, tags)| TelemetryReading {
                device,
                metric,
                value,
                ts,
                seq,
                quality,
                tags,
            },
        )
}

pub fn alert() -> impl Strategy<Value = AlertEvent> {
    let severity = prop_oneof![
        Just(Severity::Info),
        Just(Severity::Warning),
        Just(Severity::Critical)
    ];
    let state = prop_oneof![Just(AlertState::Raised), Just(AlertState::Cleared)];
    (
        any::<u64>(),
        name(),
        name(),
        severity,
        state,
        finite(),
        any::<u64>(),
        text(),
    )
        .prop_map(
            |(seq, rule, device, severity, state, value, ts, message)| AlertEvent {
                seq,
                rule,
                device,
                severity,
                state,
                value,
                ts,
                message,
            },
        )
}

pub fn aggregate() -> impl Strategy<Value = AggregateRecord> {
    (
        (any::<u64>(), name(), name(), name()),
        (any::<u64>(), any::<u64>(), 1..=u32::MAX),
        (finite(), finite(), finite()),
    )
        .prop_map(
            |((seq, rule, device, metric), (a, b, count), (avg, min, max))| AggregateRecord {
                seq,
                rule,
                device,
                metric,
                start: a.min(b),
                end: a.max(b),
                count,
                avg,
                min,
                max,
            },
        )
}

pub fn hex_hash() -> impl Strategy<Value = String<MAX_HASH_LEN>> {
    "[0-9a-f]{1,64}".prop_map(|s| fit(&s))
}

pub fn bundle_status() -> impl Strategy<Value = BundleStatus> {
    let error =
        (any::<u32>(), any::<u32>(), text()).prop_map(|(line, column, message)| BundleError {
            line,
            column,
            message,
        });
    prop_oneof![
        (any::<u64>(), hex_hash(), any::<u32>(), any::<u64>()).prop_map(
            |(version, hash, rule_count, memory_bytes)| BundleStatus::Applied {
                version,
                hash,
                rule_count,
                memory_bytes
            }
        ),
        (any::<u64>(), text(), vec(error, 0..=MAX_BUNDLE_ERRORS)).prop_map(
            |(version, reason, errors)| BundleStatus::Rejected {
                version,
                reason,
                errors: Vec::from_slice(&errors).unwrap()
            }
        ),
    ]
}

/// A small fixed reading used by golden tests and examples.
pub fn sample_reading() -> Reading {
    Reading {
        device: String::try_from("boiler-1").unwrap(),
        metric: String::try_from("temperature").unwrap(),
        value: 23.5,
        ts: Some(1_700_000_000_123),
        seq: Some(42),
        quality: None,
    }
}

pub fn s<const N: usize>(v: &str) -> String<N> {
    String::try_from(v).unwrap()
}
