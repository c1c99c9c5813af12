//! Figures of a process and of the machine from Linux `/proc`, for the bench, the demo and the
//! system tests: the agent runs as a child process, so its CPU time, memory and disk writes
//! are read from its own `/proc/PID/{stat,status,io}`.
//!
//! This module reads the files; `procfs-core` parses them. What cannot be read or parsed
//! reads as 0 (or `None`): a figure missing from a report is better than a failed run.

use std::path::Path;

use procfs_core::process::{Io, Schedstat, Stat, Status};
use procfs_core::{ExplicitSystemInfo, FromRead, FromReadSI, KernelStats, LoadAverage};
use serde::Serialize;

/// Kernel clock ticks per second of `/proc` CPU times. `USER_HZ` is 100 on every Linux
/// architecture edgestream targets (x86_64, arm64, armhf); it is part of the kernel's ABI.
pub const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Memory, CPU and disk figures of one process at one moment.
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
    /// Bytes the process caused to be written to storage (`write_bytes` of `/proc/PID/io`);
    /// 0 where the kernel does not account I/O per task.
    pub disk_write_bytes: u64,
}

impl ProcessStats {
    /// The figures of process `pid` now.
    pub fn read(pid: u32) -> ProcessStats {
        let status = parse_file::<Status>(format!("/proc/{pid}/status"));
        let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
        let (user, system) = cpu_split(pid);
        ProcessStats {
            rss_bytes: kib(status.as_ref().and_then(|s| s.vmrss)),
            peak_rss_bytes: kib(status.as_ref().and_then(|s| s.vmhwm)),
            cpu_seconds: user + system,
            cpu_system_seconds: system,
            disk_write_bytes: parse_file::<Io>(format!("/proc/{pid}/io"))
                .map(|io| io.write_bytes)
                .unwrap_or(0),
        }
    }
}

/// User + system CPU seconds of process `pid` (`utime` + `stime` of `/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU seconds of process `pid`; 0 for what cannot be read.
fn cpu_split(pid: u32) -> (f64, f64) {
    stat(format!("/proc/{pid}/stat"))
        .map(|s| stat_cpu_split(&s))
        .unwrap_or_default()
}

/// A process's or a thread's `stat` file (`/proc/PID/stat`, `/proc/PID/task/TID/stat`).
pub fn stat(path: impl AsRef<Path>) -> Option<Stat> {
    parse_file(path)
}

/// `utime` and `stime` of a parsed `stat`, in seconds.
pub fn stat_cpu_split(stat: &Stat) -> (f64, f64) {
    let secs = |ticks: u64| ticks as f64 / CLOCK_TICKS_PER_SEC as f64;
    (secs(stat.utime), secs(stat.stime))
}

/// A thread's run time so far, in nanoseconds: the first field of its `schedstat` file
/// (`/proc/PID/task/TID/schedstat`, or `/proc/thread-self/schedstat` for the caller). Exact,
/// where `stat`'s times come in whole ticks of 10 ms.
pub fn schedstat_ns(path: impl AsRef<Path>) -> Option<u64> {
    parse_file::<Schedstat>(path).map(|s| s.sum_exec_runtime)
}

/// CPU seconds of each live thread of `pid` (`/proc/PID/task/*/schedstat`, or `stat`'s ticks
/// where that is missing), summed by thread name with numbered pools merged (`sled-io-3`
/// counts as `sled-io`).
pub fn thread_cpu_by_name(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Some(stat) = stat(task.path().join("stat")) else {
            continue;
        };
        // The main thread is named after the executable: call it by its role.
        let name = if task.file_name().to_str() == Some(pid.to_string().as_str()) {
            "main"
        } else {
            stat.comm
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
        };
        // The thread's run time in nanoseconds (`schedstat`, first field). Its utime and stime
        // come in whole ticks (10 ms), and a tick lost to rounding in each of nine threads
        // read as most of a microsecond per reading in a 10-second phase at 10,000/s.
        let exact = schedstat_ns(task.path().join("schedstat")).map(|ns| ns as f64 / 1e9);
        let seconds = exact.unwrap_or_else(|| {
            let (user, system) = stat_cpu_split(&stat);
            user + system
        });
        *by_name.entry(name.to_string()).or_insert(0.0) += seconds;
    }
    by_name
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    parse_file::<LoadAverage>("/proc/loadavg").map(|l| f64::from(l.one))
}

/// Clock ticks of the whole machine, summed over all cores (`/proc/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTicks {
    /// Everything but idle and I/O wait (steal included).
    pub busy: u64,
    /// Taken by the hypervisor while a vCPU had work.
    pub steal: u64,
    pub total: u64,
    /// Online cores (the `cpuN` lines).
    pub cpus: usize,
}

impl MachineTicks {
    /// The machine's CPU time so far; `None` where `/proc/stat` cannot be read.
    pub fn read() -> Option<MachineTicks> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses `/proc/stat` text. `None` for a kernel that does not report steal: no figures
    /// rather than wrong ones.
    pub fn parse(stat: &str) -> Option<MachineTicks> {
        let info = ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: CLOCK_TICKS_PER_SEC,
            page_size: 4096,
            is_little_endian: cfg!(target_endian = "little"),
        };
        let k = KernelStats::from_read(stat.as_bytes(), &info).ok()?;
        let t = &k.total;
        // guest and guest_nice are already counted in user and nice.
        let idle = t.idle + t.iowait?;
        let total =
            t.user + t.nice + t.system + t.idle + t.iowait? + t.irq? + t.softirq? + t.steal?;
        Some(MachineTicks {
            busy: total - idle,
            steal: t.steal?,
            total,
            cpus: k.cpu_time.len(),
        })
    }

    /// Cores' worth of the ticks `field` picks between two readings.
    pub fn cores_between(
        t0: Option<MachineTicks>,
        t1: Option<MachineTicks>,
        field: impl Fn(&MachineTicks) -> u64,
    ) -> Option<f64> {
        let (t0, t1) = (t0?, t1?);
        let total = t1.total.checked_sub(t0.total).filter(|&t| t > 0)?;
        Some(field(&t1).saturating_sub(field(&t0)) as f64 / total as f64 * t1.cpus as f64)
    }
}

/// Reads a `/proc` file and parses it with procfs-core; `None` if either fails.
fn parse_file<T: FromRead>(path: impl AsRef<Path>) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    T::from_read(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_read_busy_and_total_from_proc_stat() {
        let tail = "ctxt 1\nbtime 2\nprocesses 3\n";
        let stat =
            format!("cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n{tail}");
        // busy: user + nice + system + irq + softirq + steal; idle and iowait are not.
        let one = MachineTicks {
            busy: 170,
            steal: 10,
            total: 990,
            cpus: 1,
        };
        assert_eq!(MachineTicks::parse(&stat), Some(one));
        let two = format!(
            "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n\
             cpu1 50 3 25 400 10 2 1 5 7 0\n{tail}"
        );
        assert_eq!(
            MachineTicks::parse(&two),
            Some(MachineTicks { cpus: 2, ..one })
        );
        assert_eq!(MachineTicks::parse(&format!("cpu0 1 2 3\n{tail}")), None);
        assert_eq!(
            MachineTicks::parse(&format!("cpu  1 2 x 4 5 6 7 8\n{tail}")),
            None
        );
        // A kernel too old to report steal (7 fields).
        assert_eq!(
            MachineTicks::parse(&format!("cpu  1 2 3 4 5 6 7\n{tail}")),
            None
        );
        let at = |busy, steal, total| {
            Some(MachineTicks {
                busy,
                steal,
                total,
                cpus: 2,
            })
        };
        // Half of the new ticks busy on 2 cores: one core; a tenth stolen: 0.2 of a core.
        let (t0, t1) = (at(100, 10, 1000), at(600, 110, 2000));
        assert_eq!(MachineTicks::cores_between(t0, t1, |t| t.busy), Some(1.0));
        assert_eq!(MachineTicks::cores_between(t0, t1, |t| t.steal), Some(0.2));
        assert_eq!(MachineTicks::cores_between(t0, t0, |t| t.busy), None);
        assert_eq!(MachineTicks::cores_between(None, t1, |t| t.busy), None);
    }

    #[test]
    fn reads_this_process() {
        let me = ProcessStats::read(std::process::id());
        assert!(
            me.rss_bytes > 0 && me.peak_rss_bytes >= me.rss_bytes,
            "{me:?}"
        );
        let thread = stat("/proc/thread-self/stat").expect("own thread stat");
        assert!(!thread.comm.is_empty());
        assert!(schedstat_ns("/proc/thread-self/schedstat").is_some_and(|ns| ns > 0));
        let threads = thread_cpu_by_name(std::process::id());
        assert!(threads.contains_key("main"), "{threads:?}");
        assert!(load_average().is_some());
        assert!(MachineTicks::read().is_some_and(|t| t.cpus > 0));
    }
}
