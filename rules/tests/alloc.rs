//! Zero heap allocations per reading once the engine is warm, counted by a global
//! allocator. This file is its own test binary, so the count covers nothing else, and it
//! runs its cases in one test so no other test thread allocates meanwhile.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use edgestream_rules::*;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BUNDLE: &str = r#"
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
  command set_speed(percent = 100) to device "fan-1"
  command set_speed(percent = 30) to device "fan-1" on clear
rule vibration
  when zscore(vibration, 256) > 3 or mad_outlier(vibration, 128, 3.5) or ewma_dev(vibration, 0.1) > 3
  alert warning "vibration anomaly"
  tag anomaly = "vibration"
rule trends
  when avg(temperature, 5m) > 70 and stddev(temperature, 100 samples) < 50 and percentile(temperature, 95, 1m) > 0
    and rate(pressure) > 0.5 or median(pressure, 64) > 3 or max(pressure, 30s) - min(pressure, 30s) > 1
  alert info "trend"
rule stuck
  when flatline(temperature, 10s) or missing(pressure, 20s)
  alert warning "stuck"
rule hum
  forward avg, min, max of humidity every 10s
rule noise
  on metric "debug*"
  drop
rule site
  tag site = "plant-3"
"#;

fn feed(engine: &mut Engine, out: &mut Output, from: u64, to: u64, events: &mut u64) {
    let devices = ["boiler-1", "boiler-2", "pump-1"];
    for i in from..to {
        let ts = i * 500;
        let d = devices[(i % 3) as usize];
        // Temperatures swing across the thresholds so alerts, commands and clears happen.
        let phase = (i / 200) % 2;
        let t = if phase == 0 {
            70.0 + (i % 7) as f64
        } else {
            85.0 + (i % 5) as f64
        };
        let v = if i % 97 == 0 {
            50.0
        } else {
            (i % 13) as f64 * 0.1
        };
        for (m, x) in [
            ("temperature", t),
            ("vibration", v),
            ("pressure", (i % 11) as f64),
            ("humidity", 40.0),
            ("debug_x", 1.0),
        ] {
            // As the agent's rules stage does, a few readings ahead (no allocation either).
            engine.prefetch(devices[((i + 1) % 3) as usize], m);
            engine.on_reading(
                &Reading {
                    device: d,
                    metric: m,
                    value: x,
                    ts_ms: ts,
                },
                out,
            );
            *events += (out.alerts.len() + out.commands.len() + out.aggregates.len()) as u64;
        }
        if i % 20 == 0 {
            engine.on_tick(ts, out);
            *events += (out.alerts.len() + out.commands.len() + out.aggregates.len()) as u64;
        }
    }
}

#[test]
fn no_allocation_per_reading_once_warm() {
    let mut engine = Engine::new(compile(BUNDLE).unwrap());
    let mut out = Output::default();
    let mut warm_events = 0;
    // Warm-up: every device and metric seen, every window filled, outputs grown, every
    // kind of event emitted at least once.
    feed(&mut engine, &mut out, 0, 2_000, &mut warm_events);
    assert!(warm_events > 0);

    let before = ALLOCS.load(Ordering::Relaxed);
    let mut events = 0;
    feed(&mut engine, &mut out, 2_000, 12_000, &mut events);
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert!(
        events > 50,
        "the measured stretch must include transitions, got {events}"
    );
    assert_eq!(
        allocs, 0,
        "{allocs} heap allocations during 50,000 warm readings"
    );

    // The counter works: a new device allocates its state.
    let before = ALLOCS.load(Ordering::Relaxed);
    engine.on_reading(
        &Reading {
            device: "boiler-new",
            metric: "temperature",
            value: 1.0,
            ts_ms: 10_000_000,
        },
        &mut out,
    );
    assert!(ALLOCS.load(Ordering::Relaxed) > before);
}
