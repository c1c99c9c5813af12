//! Counters for every stage, shared by the pipeline's tasks and read by the health message
//! and the Prometheus endpoint.
//!
//! Plain relaxed atomics: each counter is independent and monotonic (gauges are marked), and a
//! reader only needs a recent value, never a consistent snapshot across counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident : $kind:ident $family:literal $labels:literal $help:literal ),* $(,)?) => {
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

        impl Snapshot {
            /// Every counter as a Prometheus sample, in the order declared below.
            pub fn samples(&self) -> impl Iterator<Item = Sample> {
                [ $( Sample {
                    family: $family,
                    kind: Kind::$kind,
                    labels: $labels,
                    help: $help,
                    value: self.$name,
                }, )* ].into_iter()
            }
        }
    };
}

/// Kind of a metric in the Prometheus exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One counter as the Prometheus endpoint exposes it: a sample of `family` with `labels`
/// (empty for none). Samples of one family share its help text, given on its first sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub family: &'static str,
    pub kind: Kind,
    pub labels: &'static str,
    pub help: &'static str,
    pub value: u64,
}

// Each counter: its field, then how Prometheus sees it (kind, family, labels, help on the
// family's first sample). The endpoint is generated from this list, so a new counter is
// exposed by declaring it here.
counters! {
    /// Readings accepted from the local broker.
    readings_in_mqtt: Counter "edgestream_readings_in_total" r#"source="mqtt""# "Readings accepted, by source.",
    /// Payloads from the local broker rejected as malformed (see dead letters).
    rejected_mqtt: Counter "edgestream_parse_errors_total" r#"source="mqtt""# "Inputs rejected as malformed, by source.",
    /// Readings rejected by the rules stage because their timestamp is further ahead of the
    /// gateway's clock than `rules.max_clock_skew_ms` (see dead letters).
    readings_clock_skew: Counter "edgestream_readings_rejected_total" r#"reason="clock_skew""# "Readings the rules stage rejected, by reason.",
    /// Devices a rule did not track because it was at its `max_devices` (once per rule and
    /// device), and readings of devices the engine did not track because it was at its
    /// device limit (once per reading).
    rule_devices_refused: Counter "edgestream_rule_devices_refused_total" r#"limit="rule""# "Not evaluated because a device table was full: devices per rule (limit=rule), readings (limit=engine).",
    engine_devices_refused: Counter "edgestream_rule_devices_refused_total" r#"limit="engine""# "",
    /// Readings evaluated by the rules stage.
    rules_evaluated: Counter "edgestream_rule_evaluations_total" r#""# "Readings evaluated by the rules stage.",
    /// Alert transitions (raised + cleared) produced by rules.
    alerts_raised: Counter "edgestream_alerts_total" r#"transition="raised""# "Alert transitions produced by rules.",
    alerts_cleared: Counter "edgestream_alerts_total" r#"transition="cleared""# "",
    /// Device commands produced by rules.
    rule_commands: Counter "edgestream_commands_received_total" r#"source="rules""# "",
    /// Aggregates produced by downsampling rules.
    aggregates: Counter "edgestream_aggregates_total" r#""# "Aggregates produced by downsampling rules.",
    /// Readings a rule chose to drop.
    readings_dropped_by_rule: Counter "edgestream_records_dropped_total" r#"reason="rule""# "Records and readings dropped, by reason.",
    /// Tags not forwarded because rules attached more than the wire format carries.
    tags_truncated: Counter "edgestream_records_dropped_total" r#"reason="tags_over_wire_limit""# "",
    /// Records appended to the outbox, and flushes (group commits) that made them durable.
    outbox_appended: Counter "edgestream_outbox_appended_total" r#""# "Records appended to the outbox.",
    outbox_flushes: Counter "edgestream_outbox_flushes_total" r#""# "Outbox group commits (flushes to disk).",
    /// Records removed from the outbox because their PUBACK arrived.
    outbox_acked: Counter "edgestream_outbox_acked_total" r#""# "Records removed from the outbox on their cloud PUBACK.",
    /// Records dropped because the outbox was full (by policy).
    outbox_dropped_full: Counter "edgestream_records_dropped_total" r#"reason="outbox_full""# "",
    /// Telemetry dropped because it was older than `outbox.max_age_secs`.
    outbox_dropped_age: Counter "edgestream_records_dropped_total" r#"reason="outbox_age""# "",
    /// Records skipped because they failed their checksum or could not be decoded.
    outbox_corrupt: Counter "edgestream_records_dropped_total" r#"reason="corrupt""# "",
    /// Failed outbox appends and group commits (disk full or failing), and 1 while that is
    /// the outbox's state (gauge): nothing is acknowledged then; it ends by itself when the
    /// storage works again.
    outbox_storage_errors: Counter "edgestream_outbox_storage_errors_total" r#""# "Failed outbox appends and group commits (disk full or failing).",
    outbox_storage_failing: Gauge "edgestream_outbox_storage_failing" r#""# "1 while outbox storage fails: nothing is acknowledged until it works again.",
    /// Records in the outbox (gauge).
    outbox_depth: Gauge "edgestream_outbox_records" r#""# "Records waiting in the outbox.",
    /// Bytes held in the outbox (gauge).
    outbox_bytes: Gauge "edgestream_outbox_bytes" r#""# "Record bytes held in the outbox (what the cap counts).",
    /// Publishes sent to the cloud and records they carried.
    uplink_publishes: Counter "edgestream_uplink_publishes_total" r#""# "Publishes sent to the cloud broker.",
    uplink_records_sent: Counter "edgestream_uplink_records_sent_total" r#""# "Records carried by publishes to the cloud (resends included).",
    /// Payload bytes sent to the cloud.
    uplink_bytes: Counter "edgestream_uplink_bytes_sent_total" r#""# "Payload bytes sent to the cloud broker.",
    /// Connections established to the cloud broker, and failed attempts or lost connections.
    uplink_connects: Counter "edgestream_uplink_connects_total" r#""# "Connections established to the cloud broker (reconnects = this - 1).",
    uplink_connect_failures: Counter "edgestream_uplink_connect_failures_total" r#""# "Failed attempts to connect to the cloud broker, and lost connections.",
    /// 1 while connected to the cloud (gauge).
    uplink_online: Gauge "edgestream_uplink_online" r#""# "1 while connected to the cloud broker.",
    /// Connections established to the local broker, failed attempts or lost connections, and
    /// whether one is up now (gauge).
    local_connects: Counter "edgestream_local_connects_total" r#""# "Connections established to the local broker (reconnects = this - 1).",
    local_connect_failures: Counter "edgestream_local_connect_failures_total" r#""# "Failed attempts to connect to the local broker, and lost connections.",
    local_online: Gauge "edgestream_local_online" r#""# "1 while connected to the local broker.",
    /// Messages over the agent's size limit for their connection: acknowledged, not
    /// processed, sampled to the dead-letter topic.
    local_oversized: Counter "edgestream_oversized_messages_total" r#"connection="local""# "Messages over the agent's size limit, acknowledged and dead-lettered, by connection.",
    cloud_oversized: Counter "edgestream_oversized_messages_total" r#"connection="cloud""# "",
    /// Dead-letter samples queued upstream, and rejected inputs not sampled (rate limit).
    deadletters_sent: Counter "edgestream_deadletters_total" r#""# "Samples of rejected input queued for the cloud dead-letter topic.",
    deadletters_suppressed: Counter "edgestream_records_dropped_total" r#"reason="deadletter_rate_limit""# "",
    /// Rule bundles applied and rejected.
    bundles_applied: Counter "edgestream_rule_bundles_total" r#"result="applied""# "Rule bundles received over MQTT, by result.",
    bundles_rejected: Counter "edgestream_rule_bundles_total" r#"result="rejected""# "",
    /// Readings accepted from serial ports.
    readings_in_serial: Counter "edgestream_readings_in_total" r#"source="serial""# "",
    /// Serial lines or frames rejected (garbage, over-long, bad CRC, unparsable; see dead
    /// letters).
    rejected_serial: Counter "edgestream_parse_errors_total" r#"source="serial""# "",
    /// Bytes read from serial ports.
    serial_bytes: Counter "edgestream_serial_bytes_total" r#""# "Bytes read from serial ports.",
    /// Serial port opens that succeeded, and disconnects (read error or end of data).
    serial_connects: Counter "edgestream_serial_connects_total" r#""# "Serial port opens that succeeded.",
    serial_disconnects: Counter "edgestream_serial_disconnects_total" r#""# "Serial port disconnects (read error or end of data).",
    /// Serial ports open right now (gauge).
    serial_ports_open: Gauge "edgestream_serial_ports_open" r#""# "Serial ports open now.",
    /// Command replies read from serial ports (frames or JSON lines), handed to the router.
    serial_outcomes: Counter "edgestream_serial_command_replies_total" r#""# "Command replies read from serial ports.",
    /// Readings polled from Modbus slaves.
    readings_in_modbus: Counter "edgestream_readings_in_total" r#"source="modbus""# "",
    /// Modbus reads answered with the values asked for.
    modbus_polls: Counter "edgestream_modbus_polls_total" r#""# "Modbus reads answered with the values asked for.",
    /// Modbus reads that gave no values, by reason (see dead letters; per slave in the log and
    /// the samples): an exception, no answer in time, fewer values than asked, an answer to
    /// another request, bytes that do not decode, an RTU answer with a wrong CRC, a connection
    /// (TCP) or port (RTU) that failed.
    modbus_errors_exception: Counter "edgestream_modbus_errors_total" r#"reason="exception""# "Modbus reads that gave no values, by reason.",
    modbus_errors_timeout: Counter "edgestream_modbus_errors_total" r#"reason="timeout""# "",
    modbus_errors_short: Counter "edgestream_modbus_errors_total" r#"reason="short""# "",
    modbus_errors_mismatch: Counter "edgestream_modbus_errors_total" r#"reason="mismatch""# "",
    modbus_errors_garbage: Counter "edgestream_modbus_errors_total" r#"reason="garbage""# "",
    modbus_errors_crc: Counter "edgestream_modbus_errors_total" r#"reason="crc""# "",
    modbus_errors_connection: Counter "edgestream_modbus_errors_total" r#"reason="connection""# "",
    /// Modbus connections opened, failed attempts, and connections lost.
    modbus_connects: Counter "edgestream_modbus_connects_total" r#""# "Modbus bus connections opened.",
    modbus_connect_failures: Counter "edgestream_modbus_connect_failures_total" r#""# "Failed attempts to connect to a Modbus bus.",
    modbus_disconnects: Counter "edgestream_modbus_disconnects_total" r#""# "Modbus bus connections lost.",
    /// Slaves that stopped answering (`missing_after` failed polls in a row) (gauge).
    modbus_slaves_missing: Gauge "edgestream_modbus_slaves_missing" r#""# "Modbus slaves not answering now.",
    /// Commands received from the cloud, and issued by rules (that reached the router).
    commands_received_cloud: Counter "edgestream_commands_received_total" r#"source="cloud""# "Device commands received, by source (rules: every command a rule emitted).",
    commands_from_rules: Counter "edgestream_commands_routed_from_rules_total" r#""# "Commands issued by rules that reached the command router.",
    /// Commands accepted, and rejected (by the gateway or by the device).
    commands_accepted: Counter "edgestream_commands_total" r#"outcome="accepted""# "Device commands, by outcome.",
    commands_rejected: Counter "edgestream_commands_total" r#"outcome="rejected""# "",
    /// Commands handed to their transport (a serial port or the local broker).
    commands_dispatched: Counter "edgestream_commands_dispatched_total" r#""# "Device commands handed to a serial port or the local broker.",
    /// Commands finished: the device reported success or failure, or no reply came in time.
    commands_succeeded: Counter "edgestream_commands_total" r#"outcome="succeeded""# "",
    commands_failed: Counter "edgestream_commands_total" r#"outcome="failed""# "",
    commands_timed_out: Counter "edgestream_commands_total" r#"outcome="timed_out""# "",
    /// Commands refused because their id belongs to a pending or finished command (not a
    /// broker redelivery): dead-lettered, no outcome.
    commands_duplicate: Counter "edgestream_commands_duplicate_total" r#""# "Commands refused because their id was taken (dead-lettered, no outcome).",
    /// Accepted commands not yet finished (gauge).
    commands_pending: Gauge "edgestream_commands_pending" r#""# "Accepted device commands not yet finished.",
    /// Device replies for no pending command: unknown id or wrong device, or after the
    /// command had finished (late). Sampled to the dead-letter topic.
    command_replies_unmatched: Counter "edgestream_command_replies_unmatched_total" r#"why="unknown""# "Device replies that matched no pending command, by why.",
    command_replies_late: Counter "edgestream_command_replies_unmatched_total" r#"why="late""# "",
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
