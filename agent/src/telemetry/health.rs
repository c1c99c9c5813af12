//! The agent's own process figures (memory, CPU, disk writes) and the periodic health message.
//!
//! Figures come from Linux `/proc/self`; on another system, or if a file cannot be read, they
//! are 0 rather than an error: a health message with a missing figure is better than none.
//! The five fields are read by hand: the `procfs-core` crate (which the tools crate uses to
//! read other processes) adds about 80 KB to a release binary for them.

use serde::Serialize;
use serde_json::json;

use crate::outbox::fault::StorageStatus;
use crate::outbox::store::OpenReport;
use crate::telemetry::metrics::Snapshot;

/// Kernel clock ticks per second for `/proc/*/stat` CPU times. `USER_HZ` is 100 on every
/// Linux architecture the agent targets (x86_64, arm64, armhf); it is part of the ABI.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Memory, CPU and disk figures of this process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcessStats {
    /// Resident set size now (`VmRSS`).
    pub rss_bytes: u64,
    /// Highest resident set size since start (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// User + system CPU time since start.
    pub cpu_seconds: f64,
    /// The part of [`Self::cpu_seconds`] spent in the kernel (`stime`): system calls, the
    /// network stack, wake-ups of other threads.
    pub cpu_system_seconds: f64,
    /// Bytes this process caused to be written to storage (`write_bytes` of `/proc/self/io`);
    /// 0 where the kernel does not account I/O per task.
    pub disk_write_bytes: u64,
}

impl ProcessStats {
    /// This process's figures now.
    pub fn read() -> ProcessStats {
        let read =
            |name: &str| std::fs::read_to_string(format!("/proc/self/{name}")).unwrap_or_default();
        let status = read("status");
        let kib = |key: &str| field(&status, key).map_or(0, |k| k * 1024);
        let (user, system) = stat_cpu_split(&read("stat"));
        ProcessStats {
            rss_bytes: kib("VmRSS:"),
            peak_rss_bytes: kib("VmHWM:"),
            cpu_seconds: user + system,
            cpu_system_seconds: system,
            disk_write_bytes: field(&read("io"), "write_bytes:").unwrap_or(0),
        }
    }
}

/// The number after `key` on its line of a `/proc` key-value file (`VmRSS:  1234 kB`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// utime and stime, in seconds, of a `/proc/.../stat` text; 0 for what does not parse.
fn stat_cpu_split(stat: &str) -> (f64, f64) {
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return (0.0, 0.0);
    };
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let user = ticks();
    let system = ticks();
    (
        user as f64 / CLOCK_TICKS_PER_SEC,
        system as f64 / CLOCK_TICKS_PER_SEC,
    )
}

/// The health message published on `{prefix}/{gateway}/health`: a summary a person can read at
/// a glance (one figure per stage), the process figures, and every raw counter.
pub fn message(
    gateway: &str,
    uptime_s: u64,
    m: &Snapshot,
    outbox_disk_bytes: u64,
    outbox_opened: &OpenReport,
    storage: &StorageStatus,
) -> serde_json::Value {
    let p = ProcessStats::read();
    json!({
        "v": 1,
        "gateway": gateway,
        "uptime_s": uptime_s,
        "rss_bytes": p.rss_bytes,
        "outbox_disk_bytes": outbox_disk_bytes,
        "outbox_opened": outbox_opened,
        "summary": {
            "readings_in": {
                "mqtt": m.readings_in_mqtt,
                "serial": m.readings_in_serial,
                "modbus": m.readings_in_modbus,
            },
            "parse_errors": { "mqtt": m.rejected_mqtt, "serial": m.rejected_serial },
            "oversized": { "local": m.local_oversized, "cloud": m.cloud_oversized },
            "serial": {
                "ports_open": m.serial_ports_open,
                "connects": m.serial_connects,
                "disconnects": m.serial_disconnects,
                "bytes": m.serial_bytes,
            },
            "modbus": {
                "polls": m.modbus_polls,
                "errors": {
                    "exception": m.modbus_errors_exception,
                    "timeout": m.modbus_errors_timeout,
                    "short": m.modbus_errors_short,
                    "mismatch": m.modbus_errors_mismatch,
                    "garbage": m.modbus_errors_garbage,
                    "crc": m.modbus_errors_crc,
                    "connection": m.modbus_errors_connection,
                },
                "slaves_missing": m.modbus_slaves_missing,
                "connects": m.modbus_connects,
                "disconnects": m.modbus_disconnects,
            },
            "rule_evaluations": m.rules_evaluated,
            "rules_refused": {
                "clock_skew": m.readings_clock_skew,
                "rule_devices_full": m.rule_devices_refused,
                "engine_devices_full": m.engine_devices_refused,
            },
            "alerts": { "raised": m.alerts_raised, "cleared": m.alerts_cleared },
            "commands": {
                "from_cloud": m.commands_received_cloud,
                "from_rules": m.commands_from_rules,
                "accepted": m.commands_accepted,
                "rejected": m.commands_rejected,
                "succeeded": m.commands_succeeded,
                "failed": m.commands_failed,
                "timed_out": m.commands_timed_out,
                "pending": m.commands_pending,
                "replies_unmatched": m.command_replies_unmatched,
                "replies_late": m.command_replies_late,
            },
            "outbox": {
                "records": m.outbox_depth,
                "bytes": m.outbox_bytes,
                "disk_bytes": outbox_disk_bytes,
                "storage": storage,
            },
            "dropped": {
                "by_rule": m.readings_dropped_by_rule,
                "outbox_full": m.outbox_dropped_full,
                "outbox_age": m.outbox_dropped_age,
                "corrupt": m.outbox_corrupt,
                "deadletters_suppressed": m.deadletters_suppressed,
                "tags_truncated": m.tags_truncated,
            },
            "rule_bundles": { "applied": m.bundles_applied, "rejected": m.bundles_rejected },
            "local": {
                "online": m.local_online == 1,
                "connects": m.local_connects,
                "connect_failures": m.local_connect_failures,
            },
            "uplink": {
                "online": m.uplink_online == 1,
                "connects": m.uplink_connects,
                "reconnects": m.uplink_connects.saturating_sub(1),
                "connect_failures": m.uplink_connect_failures,
                "records_sent": m.uplink_records_sent,
                "bytes_sent": m.uplink_bytes,
            },
            "process": p,
        },
        "counters": m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read();
        assert!(p.rss_bytes > 0, "{p:?}");
        assert!(p.peak_rss_bytes >= p.rss_bytes, "{p:?}");
        // Burn a little CPU so that the figure is visibly non-zero.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let p = ProcessStats::read();
        assert!(p.cpu_seconds > 0.0, "{p:?}");
        assert!(p.cpu_system_seconds <= p.cpu_seconds, "{p:?}");
    }

    #[test]
    fn stat_splits_user_and_system_time() {
        // A command name with a space and a parenthesis; utime 250 and stime 75 ticks.
        let stat = "4242 (tokio rt) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(stat_cpu_split(stat), (2.5, 0.75));
        assert_eq!(stat_cpu_split("no parenthesis"), (0.0, 0.0));
    }

    #[test]
    fn message_summarises_each_stage() {
        let m = Snapshot {
            readings_in_mqtt: 7,
            rejected_mqtt: 2,
            uplink_connects: 3,
            outbox_dropped_full: 5,
            outbox_dropped_age: 6,
            local_online: 1,
            local_connect_failures: 4,
            ..Snapshot::default()
        };
        let opened = OpenReport {
            records: 12,
            truncated_bytes: 40,
            unclean: true,
            ..OpenReport::default()
        };
        let storage = StorageStatus {
            ok: false,
            error: Some("No space left on device (os error 28)".into()),
            failing_secs: 3,
            failures: 9,
        };
        let v = message("gw", 1, &m, 0, &opened, &storage);
        assert_eq!(v["summary"]["outbox"]["storage"]["ok"], false);
        assert_eq!(v["summary"]["outbox"]["storage"]["failures"], 9);
        assert_eq!(v["outbox_opened"]["records"], 12);
        assert_eq!(v["outbox_opened"]["truncated_bytes"], 40);
        assert_eq!(v["outbox_opened"]["unclean"], true);
        assert_eq!(v["summary"]["readings_in"]["mqtt"], 7);
        assert_eq!(v["summary"]["parse_errors"]["mqtt"], 2);
        assert_eq!(v["summary"]["uplink"]["reconnects"], 2);
        assert_eq!(v["counters"]["readings_in_mqtt"], 7);
        assert_eq!(v["summary"]["dropped"]["outbox_full"], 5);
        assert_eq!(v["summary"]["dropped"]["outbox_age"], 6);
        assert_eq!(v["counters"]["outbox_dropped_age"], 6);
        assert_eq!(v["summary"]["local"]["online"], true);
        assert_eq!(v["summary"]["local"]["connect_failures"], 4);
        assert_eq!(v["summary"]["uplink"]["online"], false);
    }
}
