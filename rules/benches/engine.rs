//! One benchmark per detector family, in readings per second through `Engine::on_reading`
//! on a warm engine (one core). Figures are in docs/performance.md.
//!
//! Time is the benchmark thread's own on-CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall-clock
//! time: on a shared build machine, wall-clock figures measure the other work as much as the
//! engine. Set `BENCH_WALL_CLOCK=1` to measure wall-clock time instead.
#![allow(unsafe_code)] // one libc call to read the thread's CPU clock

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Instant;

/// On-CPU nanoseconds of the current thread, or wall-clock nanoseconds.
struct OnCpu {
    wall: bool,
    epoch: Instant,
}

impl OnCpu {
    fn new() -> Self {
        OnCpu {
            wall: std::env::var_os("BENCH_WALL_CLOCK").is_some(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        if self.wall {
            return self.epoch.elapsed().as_nanos() as u64;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(
            rc, 0,
            "CLOCK_THREAD_CPUTIME_ID unavailable; run with BENCH_WALL_CLOCK=1"
        );
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

impl Measurement for OnCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        self.now()
    }
    fn end(&self, i: u64) -> u64 {
        self.now().saturating_sub(i)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NsFormatter
    }
}

struct NsFormatter;

impl ValueFormatter for NsFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if ns < 1e3 {
            (1.0, "ns")
        } else if ns < 1e6 {
            (1e-3, "µs")
        } else {
            (1e-6, "ms")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }
    fn scale_throughputs(&self, typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let per = match *t {
            Throughput::Bytes(n)
            | Throughput::BytesDecimal(n)
            | Throughput::Elements(n)
            | Throughput::Bits(n) => n as f64,
        };
        let (div, unit) = if per * 1e9 / typical >= 1e6 {
            (1e6, "M/s")
        } else {
            (1e3, "K/s")
        };
        values.iter_mut().for_each(|v| *v = per * 1e9 / *v / div);
        unit
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
use edgestream_rules::{compile, Engine, Output, Reading};
use std::hint::black_box;

const BATCH: usize = 10_000;

struct Stream {
    devices: Vec<String>,
    metrics: Vec<&'static str>,
    values: Vec<f64>,
}

impl Stream {
    fn new(devices: usize, metrics: &[&'static str]) -> Self {
        // A deterministic pseudo-random walk (xorshift), so every run measures the same input.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let values = (0..BATCH)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                60.0 + (s % 4000) as f64 / 100.0
            })
            .collect();
        Stream {
            devices: (0..devices).map(|i| format!("boiler-{i}")).collect(),
            metrics: metrics.to_vec(),
            values,
        }
    }

    fn run(&self, engine: &mut Engine, out: &mut Output, t0: &mut u64) -> usize {
        let mut n = 0;
        for (i, v) in self.values.iter().enumerate() {
            *t0 += 10;
            let r = Reading {
                device: &self.devices[i % self.devices.len()],
                metric: self.metrics[i % self.metrics.len()],
                value: *v,
                ts_ms: *t0,
            };
            engine.on_reading(&r, out);
            n += out.alerts.len();
        }
        n
    }
}

fn bench_plan(
    c: &mut Criterion<OnCpu>,
    group: &str,
    name: &str,
    src: &str,
    devices: usize,
    metrics: &[&'static str],
) {
    let plan = compile(src).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let stream = Stream::new(devices, metrics);
    let mut t0 = 0;
    // Warm: fill every window, see every device and metric.
    for _ in 0..3 {
        stream.run(&mut engine, &mut out, &mut t0);
    }
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::from_parameter(name), |b| {
        b.iter(|| black_box(stream.run(&mut engine, &mut out, &mut t0)))
    });
    g.finish();
}

fn thresholds(c: &mut Criterion<OnCpu>) {
    bench_plan(
        c,
        "threshold",
        "canonical_1_rule",
        "rule overheat\n on device \"boiler-*\"\n when temperature > 80 for 30s\n clear when temperature < 75\n alert critical \"hot\"",
        16,
        &["temperature"],
    );
    let mut src = String::new();
    for (i, m) in ["temperature", "pressure", "flow", "level"]
        .iter()
        .enumerate()
    {
        src += &format!("rule hi_{m}\n on device \"boiler-*\"\n when {m} > 95 for 10s\n clear when {m} < 90\n alert warning \"{m} high\"\n");
        src += &format!("rule lo_{m}\n on device \"boiler-*\"\n when {m} < {} and {m} > 0\n alert info \"{m} low\"\n", 61 + i);
    }
    bench_plan(
        c,
        "threshold",
        "8_rules_4_metrics",
        &src,
        16,
        &["temperature", "pressure", "flow", "level"],
    );
}

fn windows(c: &mut Criterion<OnCpu>) {
    for (name, call) in [
        ("avg_256", "avg(temperature, 256)"),
        ("max_256", "max(temperature, 256)"),
        ("stddev_256", "stddev(temperature, 256)"),
        ("percentile_256", "percentile(temperature, 95, 256)"),
        ("avg_1m_time", "avg(temperature, 1m)"),
        ("count_1m_time", "count(temperature, 1m)"),
        (
            "spread_256",
            "max(temperature, 256) - min(temperature, 256)",
        ),
    ] {
        let src = format!("rule w\n when {call} > 99.9\n alert info \"w\"");
        bench_plan(c, "window", name, &src, 16, &["temperature"]);
    }
}

fn anomalies(c: &mut Criterion<OnCpu>) {
    for (name, cond) in [
        ("zscore_256", "zscore(vibration, 256) > 4"),
        ("ewma_dev_0.1", "ewma_dev(vibration, 0.1) > 4"),
        ("mad_outlier_256", "mad_outlier(vibration, 256, 3.5)"),
        ("all_three_256", "zscore(vibration, 256) > 4 or ewma_dev(vibration, 0.1) > 4 or mad_outlier(vibration, 256, 3.5)"),
    ] {
        let src = format!("rule a\n when {cond}\n alert warning \"a\"");
        bench_plan(c, "anomaly", name, &src, 16, &["vibration"]);
    }
}

fn change(c: &mut Criterion<OnCpu>) {
    for (name, cond) in [
        ("rate", "rate(pressure) > 1000"),
        ("flatline_10m", "flatline(pressure, 10m)"),
        ("missing_2m", "missing(pressure, 2m)"),
    ] {
        let src = format!("rule c\n when {cond}\n alert warning \"c\"");
        bench_plan(c, "change", name, &src, 16, &["pressure"]);
    }
}

fn actions(c: &mut Criterion<OnCpu>) {
    bench_plan(
        c,
        "action",
        "forward_downsample_1m",
        "rule d\n forward avg, min, max of humidity every 1m",
        16,
        &["humidity"],
    );
    bench_plan(
        c,
        "action",
        "drop_and_tag",
        "rule d\n on metric \"hum*\"\n drop\nrule t\n tag site = \"p3\"",
        16,
        &["humidity", "temperature"],
    );
}

fn compiler(c: &mut Criterion<OnCpu>) {
    let mut src = String::new();
    for i in 0..100 {
        src += &format!("rule r{i}\n on device \"boiler-*\"\n when avg(temperature, 5m) > 80 and zscore(vibration, 256) > 4 for 30s\n clear when temperature < 75\n alert critical \"r{i}\"\n");
    }
    let mut g = c.benchmark_group("compile");
    g.throughput(Throughput::Bytes(src.len() as u64));
    g.bench_function("100_rules", |b| {
        b.iter(|| black_box(compile(black_box(&src)).is_ok()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(OnCpu::new());
    targets = thresholds, windows, anomalies, change, actions, compiler
}
criterion_main!(benches);
