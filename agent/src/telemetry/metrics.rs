//! Counters for every stage, shared by the pipeline's tasks and read by the health message,
//! the demo's status line and (later) the Prometheus endpoint.
//!
//! Plain relaxed atomics: each counter is independent and monotonic (gauges are marked), and a
//! reader only needs a recent value, never a consistent snapshot across counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters; see each field.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A copy of every counter at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Metrics {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Readings accepted from the local broker.
    readings_in_mqtt,
    /// Payloads from the local broker rejected as malformed (see dead letters).
    rejected_mqtt,
    /// Readings evaluated by the rules stage.
    rules_evaluated,
    /// Alert transitions (raised + cleared) produced by rules.
    alerts_raised,
    alerts_cleared,
    /// Device commands produced by rules.
    rule_commands,
    /// Aggregates produced by downsampling rules.
    aggregates,
    /// Readings a rule chose to drop.
    readings_dropped_by_rule,
    /// Tags not forwarded because rules attached more than the wire format carries.
    tags_truncated,
    /// Records appended to the outbox, and flushes (group commits) that made them durable.
    outbox_appended,
    outbox_flushes,
    /// Records removed from the outbox because their PUBACK arrived.
    outbox_acked,
    /// Records dropped because the outbox was full (by policy).
    outbox_dropped_full,
    /// Telemetry dropped because it was older than `outbox.max_age_secs`.
    outbox_dropped_age,
    /// Records skipped because they failed their checksum or could not be decoded.
    outbox_corrupt,
    /// Records in the outbox (gauge).
    outbox_depth,
    /// Bytes held in the outbox (gauge).
    outbox_bytes,
    /// Publishes sent to the cloud and records they carried.
    uplink_publishes,
    uplink_records_sent,
    /// Payload bytes sent to the cloud.
    uplink_bytes,
    /// Connections established to the cloud broker, and failures to.
    uplink_connects,
    uplink_connect_failures,
    /// 1 while connected to the cloud (gauge).
    uplink_online,
    /// Dead-letter samples queued upstream, and rejected inputs not sampled (rate limit).
    deadletters_sent,
    deadletters_suppressed,
    /// Rule bundles applied and rejected.
    bundles_applied,
    bundles_rejected,
    /// Readings accepted from serial ports.
    readings_in_serial,
    /// Serial lines or frames rejected (garbage, over-long, bad CRC, unparsable; see dead
    /// letters).
    rejected_serial,
    /// Bytes read from serial ports.
    serial_bytes,
    /// Serial port opens that succeeded, and disconnects (read error or end of data).
    serial_connects,
    serial_disconnects,
    /// Serial ports open right now (gauge).
    serial_ports_open,
    /// Command replies read from serial ports (frames or JSON lines), handed to the router.
    serial_outcomes,
    /// Commands received from the cloud, and issued by rules (that reached the router).
    commands_received_cloud,
    commands_from_rules,
    /// Commands accepted, and rejected (by the gateway or by the device).
    commands_accepted,
    commands_rejected,
    /// Commands handed to their transport (a serial port or the local broker).
    commands_dispatched,
    /// Commands finished: the device reported success or failure, or no reply came in time.
    commands_succeeded,
    commands_failed,
    commands_timed_out,
    /// Accepted commands not yet finished (gauge).
    commands_pending,
    /// Device replies for no pending command: unknown id or wrong device, or after the
    /// command had finished (late). Sampled to the dead-letter topic.
    command_replies_unmatched,
    command_replies_late,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }
}
