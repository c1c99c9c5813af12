//! The rules engine alone on the end-to-end bench's workload: `edgestream bench`'s 20 rules
//! ([`BENCH_RULES`]) over 100 devices, fed the readings its load generator writes, through
//! `Engine::on_reading` on one core. What the rules cost of the agent's CPU per reading,
//! without the network, the outbox and the uplink.
//!
//! `cargo bench -p edgestream-sim --bench rules_bundle` (a plain harness: figures printed):
//! wall clock per reading, and beside it the thread's own CPU time (nanoseconds, from
//! `/proc/thread-self/schedstat`), which a busy neighbour does not inflate.
//!
//! `RULES_BENCH_DEVICES` changes the number of devices (100): with more, each device's rule
//! state is colder when its next reading comes, as on a gateway between two deliveries.
//!
//! `RULES_BENCH_EVICT_KIB=N` makes the state colder still, the way the agent meets it at a
//! gateway's rates: readings come in deliveries of `RULES_BENCH_DELIVERY` (10, about what one
//! wake-up brings at 10,000 readings/s), and between two deliveries the bench writes over N
//! KiB of other memory, as the brokers, the kernel and the rest of the agent do. Only the
//! engine's calls are timed (wall clock). Passes alternate between evaluating each delivery
//! as the agent's rules stage does (`edgestream_rules::drain_prefetching`: `Engine::prefetch` a few readings
//! ahead), and without it, so one run shows what the hint saves.

use std::time::Instant;

use edgestream_rules::{drain_prefetching, Engine, Output, Reading};
use edgestream_sim::bench::{load_reading, BENCH_RULES};
use edgestream_sim::procstat::schedstat_ns;

/// Readings per measured pass, and passes (the best pass is reported beside the mean).
const READINGS: usize = 2_000_000;
const PASSES: usize = 5;
/// Readings per measured pass with eviction (each delivery also writes the eviction buffer).
const COLD_READINGS: usize = 200_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `i`-th reading of the load (device index, metric, value) at the bench's 10,000
/// readings/s: the timestamps the time windows see on the bench.
fn reading<'a>(i: usize, names: &'a [String]) -> Reading<'a> {
    let (d, m, value) = load_reading(i, names.len());
    Reading {
        device: &names[d],
        metric: ["temperature", "vibration"][m],
        value,
        ts_ms: 1_700_000_000_000 + (i / 10) as u64,
    }
}

/// Mean and best of `v`.
fn mean_best(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (mean, v.iter().copied().fold(f64::INFINITY, f64::min))
}

/// The cold mode (module doc): `passes` pairs of passes, without and with the prefetch
/// hint, each of `COLD_READINGS` readings from `*i` on; prints ns per reading.
fn cold(engine: &mut Engine, out: &mut Output, names: &[String], i: &mut usize, evict_kib: usize) {
    let delivery = env_usize("RULES_BENCH_DELIVERY", 10).max(1);
    let mut evict = vec![0u64; evict_kib * 1024 / 8];
    let mut ns = [Vec::new(), Vec::new()];
    let mut batch = Vec::with_capacity(delivery);
    for pass in 0..2 * PASSES {
        let prefetch = pass % 2 == 1;
        let mut engine_ns = 0u128;
        let mut alerts = 0;
        for _ in 0..COLD_READINGS / delivery {
            batch.extend((0..delivery).map(|k| reading(*i + k, names)));
            *i += delivery;
            for line in evict.iter_mut().step_by(8) {
                *line = line.wrapping_add(1);
            }
            std::hint::black_box(&mut evict);
            let t = Instant::now();
            drain_prefetching(
                &mut batch,
                engine,
                |e, r| {
                    if prefetch {
                        e.prefetch(r.device, r.metric);
                    }
                },
                |e, r| {
                    e.on_reading(&r, out);
                    alerts += out.alerts.len();
                },
            );
            engine_ns += t.elapsed().as_nanos();
        }
        std::hint::black_box(alerts);
        ns[usize::from(prefetch)].push(engine_ns as f64 / COLD_READINGS as f64);
    }
    println!(
        "  cold: deliveries of {delivery}, {evict_kib} KiB written between them, {PASSES} passes \
         of {COLD_READINGS} readings each way"
    );
    for (label, v) in [("without prefetch", &ns[0]), ("with prefetch", &ns[1])] {
        let (mean, best) = mean_best(v);
        println!("  {label}: {mean:.0} ns per reading (best {best:.0})");
    }
}

/// The calling thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat").unwrap_or(0)
}

fn main() {
    let devices = env_usize("RULES_BENCH_DEVICES", 100);
    let evict_kib = env_usize("RULES_BENCH_EVICT_KIB", 0);
    let plan = edgestream_rules::compile(BENCH_RULES).expect("the bench rules compile");
    let rules = plan.rule_count();
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let names: Vec<String> = (0..devices).map(|d| format!("dev-{d:03}")).collect();
    let mut i = 0usize;
    let run = |engine: &mut Engine, out: &mut Output, i: &mut usize, n: usize| {
        let mut alerts = 0;
        for _ in 0..n {
            engine.on_reading(&reading(*i, &names), out);
            *i += 1;
            alerts += out.alerts.len();
        }
        alerts
    };
    // Warm: every window full on every device.
    std::hint::black_box(run(&mut engine, &mut out, &mut i, 1_000 * devices));
    println!("rules bundle: {rules} rules, {devices} devices");
    if evict_kib > 0 {
        cold(&mut engine, &mut out, &names, &mut i, evict_kib);
        return;
    }
    let mut ns = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..PASSES {
        let (t, c) = (Instant::now(), thread_cpu_ns());
        std::hint::black_box(run(&mut engine, &mut out, &mut i, READINGS));
        ns.push(t.elapsed().as_nanos() as f64 / READINGS as f64);
        cpu.push((thread_cpu_ns() - c) as f64 / READINGS as f64);
    }
    println!("  warm: {PASSES} passes of {READINGS} readings");
    let (mean, best) = mean_best(&ns);
    println!(
        "  wall clock: {mean:.0} ns per reading (best {best:.0}), {:.2} M readings/s",
        1e3 / mean
    );
    let (mean, best) = mean_best(&cpu);
    println!("  thread CPU: {mean:.0} ns per reading (best {best:.0})");
}
