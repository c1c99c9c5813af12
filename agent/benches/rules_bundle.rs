//! The rules engine alone on the end-to-end bench's workload: `edgestream bench`'s 20 rules
//! ([`BENCH_RULES`]) over 100 devices, fed the readings its load generator writes, through
//! `Engine::on_reading` on one core. What the rules cost of the agent's CPU per reading,
//! without the network, the outbox and the uplink.
//!
//! `cargo bench -p edgestream-agent --bench rules_bundle` (a plain harness: figures printed):
//! wall clock per reading, and beside it the thread's own CPU time (nanoseconds, from
//! `/proc/thread-self/schedstat`), which a busy neighbour does not inflate.
//!
//! `RULES_BENCH_DEVICES` changes the number of devices (100): with more, each device's rule
//! state is colder when its next reading comes, as on a gateway between two deliveries.

use std::time::Instant;

use edgestream_agent::bench::{load_reading, schedstat_ns, BENCH_RULES};
use edgestream_rules::{Engine, Output, Reading};

/// Readings per measured pass, and passes (the best pass is reported beside the mean).
const READINGS: usize = 2_000_000;
const PASSES: usize = 5;

/// The calling thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    schedstat_ns("/proc/thread-self/schedstat").unwrap_or(0)
}

fn main() {
    let devices: usize = std::env::var("RULES_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let plan = edgestream_rules::compile(BENCH_RULES).expect("the bench rules compile");
    let rules = plan.rule_count();
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let names: Vec<String> = (0..devices).map(|d| format!("dev-{d:03}")).collect();
    let metrics = ["temperature", "vibration"];
    let mut i = 0usize;
    let mut run = |engine: &mut Engine, out: &mut Output, n: usize| {
        let mut alerts = 0;
        for _ in 0..n {
            let (d, m, value) = load_reading(i, devices);
            i += 1;
            // 10,000 readings/s: the timestamps the time windows see on the bench.
            let r = Reading {
                device: &names[d],
                metric: metrics[m],
                value,
                ts_ms: 1_700_000_000_000 + (i / 10) as u64,
            };
            engine.on_reading(&r, out);
            alerts += out.alerts.len();
        }
        alerts
    };
    // Warm: every window full on every device.
    std::hint::black_box(run(&mut engine, &mut out, 1_000 * devices));
    let mut ns = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..PASSES {
        let (t, c) = (Instant::now(), thread_cpu_ns());
        std::hint::black_box(run(&mut engine, &mut out, READINGS));
        ns.push(t.elapsed().as_nanos() as f64 / READINGS as f64);
        cpu.push((thread_cpu_ns() - c) as f64 / READINGS as f64);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "rules bundle: {rules} rules, {devices} devices, {PASSES} passes of {READINGS} readings"
    );
    println!(
        "  wall clock: {:.0} ns per reading (best {:.0}), {:.2} M readings/s",
        mean(&ns),
        best(&ns),
        1e3 / mean(&ns)
    );
    println!(
        "  thread CPU: {:.0} ns per reading (best {:.0})",
        mean(&cpu),
        best(&cpu)
    );
}
