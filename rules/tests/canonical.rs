//! The canonical threshold rule, end to end through the public API.

use edgestream_rules::*;

const OVERHEAT: &str = r#"
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
"#;

fn reading<'a>(device: &'a str, metric: &'a str, value: f64, ts_ms: u64) -> Reading<'a> {
    Reading {
        device,
        metric,
        value,
        ts_ms,
    }
}

#[test]
fn overheat_raises_after_30s_and_clears_below_75() {
    let plan = compile(OVERHEAT).expect("canonical rule compiles");
    assert_eq!(plan.rule_count(), 1);
    assert!(plan.state_bytes() > 0);
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let mut alerts = Vec::new();
    let series = [
        (0, 79.0),
        (5_000, 81.0), // condition starts holding
        (20_000, 90.0),
        (34_999, 85.0), // 29.999 s: not yet
        (35_000, 85.0), // 30 s: raise
        (40_000, 88.0), // still raised: no new event
        (45_000, 78.0), // hysteresis: between 75 and 80, stays raised
        (50_000, 74.0), // clear
        (55_000, 74.0),
    ];
    for (ts, v) in series {
        engine.on_reading(&reading("boiler-7", "temperature", v, ts), &mut out);
        assert_eq!(out.disposition, Disposition::Forward);
        alerts.extend(out.alerts.iter().cloned());
    }
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0].state, AlertState::Raised);
    assert_eq!(alerts[0].ts_ms, 35_000);
    assert_eq!(alerts[0].severity, Severity::Critical);
    assert_eq!(&*alerts[0].rule, "overheat");
    assert_eq!(alerts[0].device.as_str(), "boiler-7");
    assert_eq!(alerts[0].value, 85.0);
    assert_eq!(&*alerts[0].message, "boiler overheating");
    assert_eq!(alerts[1].state, AlertState::Cleared);
    assert_eq!(alerts[1].ts_ms, 50_000);
    assert_eq!(alerts[1].value, 74.0);
}

#[test]
fn overheat_resets_when_condition_breaks_before_30s() {
    let mut engine = Engine::new(compile(OVERHEAT).unwrap());
    let mut out = Output::default();
    let mut n = 0;
    for (ts, v) in [
        (0, 85.0),
        (20_000, 79.0),
        (29_000, 85.0),
        (40_000, 85.0),
        (58_999, 85.0),
    ] {
        engine.on_reading(&reading("boiler-1", "temperature", v, ts), &mut out);
        n += out.alerts.len();
    }
    assert_eq!(n, 0, "the 30 s restart at 29 s after the dip");
    engine.on_reading(&reading("boiler-1", "temperature", 85.0, 59_000), &mut out);
    assert_eq!(out.alerts.len(), 1);
}

#[test]
fn overheat_ignores_other_devices_and_metrics() {
    let mut engine = Engine::new(compile(OVERHEAT).unwrap());
    let mut out = Output::default();
    for ts in (0..100_000).step_by(1_000) {
        engine.on_reading(&reading("fan-1", "temperature", 99.0, ts), &mut out);
        assert!(out.alerts.is_empty());
        engine.on_reading(&reading("boiler-1", "pressure", 99.0, ts), &mut out);
        assert!(out.alerts.is_empty());
    }
}

#[test]
fn tick_completes_a_duration_without_new_readings() {
    let mut engine = Engine::new(compile(OVERHEAT).unwrap());
    let mut out = Output::default();
    engine.on_reading(&reading("boiler-1", "temperature", 85.0, 1_000), &mut out);
    engine.on_tick(30_999, &mut out);
    assert!(out.alerts.is_empty());
    engine.on_tick(31_000, &mut out);
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(out.alerts[0].ts_ms, 31_000);
}

#[test]
fn state_budget_is_computed_per_rule_and_device() {
    let plan = compile(OVERHEAT).unwrap();
    let per_device = plan.state_bytes() / Limits::default().default_max_devices;
    assert!(
        per_device > 0 && per_device < 512,
        "canonical rule: {per_device} bytes per device"
    );
    let z = compile("rule z\n when zscore(vibration, 256) > 4\n alert info \"z\"\n max_devices 10")
        .unwrap();
    let per_device_z = z.state_bytes() / 10;
    // 256 samples of 8 bytes dominate.
    assert!(
        (2048..3072).contains(&per_device_z),
        "zscore(256): {per_device_z} bytes per device"
    );
    eprintln!("per device: canonical {per_device} B, zscore(256) {per_device_z} B");
}

#[test]
fn time_windows_keep_32_bit_times_and_counts_keep_no_values() {
    let per_device = |cond: &str| {
        let src = format!("rule r\n when {cond}\n alert info \"x\"\n max_devices 10");
        compile(&src).unwrap().state_bytes() / 10
    };
    // A 10 s window keeps up to 512 samples (`Limits::time_window_samples`): 8 bytes of
    // value and 4 of time offset each; a count keeps the times only.
    let avg = per_device("avg(temperature, 10s) > 95");
    let count = per_device("count(temperature, 10s) > 100");
    let count_samples = per_device("count(temperature, 100 samples) > 50");
    assert!((512 * 12..512 * 13).contains(&avg), "avg(10s): {avg} B");
    assert!((512 * 4..512 * 5).contains(&count), "count(10s): {count} B");
    assert!(count_samples < 512, "count(100 samples): {count_samples} B");
    // Aggregates over one metric and window in one rule share a ring, which keeps what each
    // needs: the count adds nothing to the average's ring, and a spread keeps one sorted ring
    // of 100 samples (values and the sorted copy) instead of two.
    let both = per_device("avg(temperature, 10s) > 95 and count(temperature, 10s) > 100");
    assert_eq!(both, avg, "avg and count over one window");
    let spread = per_device("max(temperature, 100) - min(temperature, 100) > 60");
    let max_only = per_device("max(temperature, 100) > 60");
    assert_eq!(spread, max_only, "max and min over one window");
    assert!((1600..2100).contains(&spread), "spread: {spread} B");
    eprintln!("per device: avg(10s) {avg} B, count(10s) {count} B, count(100) {count_samples} B");
}

/// A spread (`max - min` over one window) reads both from one shared ring: it raises when
/// the newest three samples span more than 10, and clears when the lowest has left.
#[test]
fn a_spread_over_one_shared_window_raises_and_clears() {
    let plan = compile("rule spread\n when max(t, 3) - min(t, 3) > 10\n alert warning \"spread\"")
        .unwrap();
    let mut engine = Engine::new(plan);
    let mut out = Output::default();
    let mut states = Vec::new();
    for (i, v) in [1.0, 5.0, 12.0, 13.0, 14.0, 15.0].into_iter().enumerate() {
        engine.on_reading(&reading("d", "t", v, 1_000 * i as u64), &mut out);
        states.extend(out.alerts.iter().map(|a| (i, a.state)));
    }
    assert_eq!(
        states,
        [(2, AlertState::Raised), (3, AlertState::Cleared)],
        "raised at 1, 5, 12 (spread 11), cleared at 5, 12, 13 (spread 8)"
    );
}
