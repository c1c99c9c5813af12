//! Engine behaviour through the public API: actions, time, limits, plan swaps, replay.

use edgestream_rules::*;

fn r<'a>(device: &'a str, metric: &'a str, value: f64, ts_ms: u64) -> Reading<'a> {
    Reading {
        device,
        metric,
        value,
        ts_ms,
    }
}

fn engine(src: &str) -> Engine {
    Engine::new(compile(src).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn command_on_raise_and_on_clear_with_arguments() {
    let mut e = engine(
        r#"
rule cool
  on device "boiler-*"
  when temperature > 80
  command set_speed(percent = 100, mode = "max", force = true) to device "fan-1"
  command set_speed(percent = 30) on clear
"#,
    );
    let mut out = Output::default();
    e.on_reading(&r("boiler-2", "temperature", 81.0, 1), &mut out);
    assert!(out.alerts.is_empty(), "no alert action, no alert event");
    assert_eq!(out.commands.len(), 1);
    let c = &out.commands[0];
    assert_eq!(
        (c.device.as_str(), &*c.name, c.ts_ms),
        ("fan-1", "set_speed", 1)
    );
    assert_eq!(c.args.len(), 3);
    assert_eq!(
        c.args[0],
        (std::sync::Arc::from("percent"), ArgValue::Number(100.0))
    );
    assert_eq!(c.args[1].1, ArgValue::Text("max".into()));
    assert_eq!(c.args[2].1, ArgValue::Bool(true));
    e.on_reading(&r("boiler-2", "temperature", 82.0, 2), &mut out);
    assert!(out.commands.is_empty(), "only on transitions");
    e.on_reading(&r("boiler-2", "temperature", 70.0, 3), &mut out);
    assert_eq!(out.commands.len(), 1);
    assert_eq!(
        out.commands[0].device.as_str(),
        "boiler-2",
        "default target is the same device"
    );
    assert_eq!(out.commands[0].args[0].1, ArgValue::Number(30.0));
}

/// Readings near `f64::MAX` are finite, but their sum is not: the average must stay finite
/// (the protocol refuses an aggregate whose `avg` is not).
#[test]
fn downsampled_average_stays_finite_when_the_sum_overflows() {
    let mut e = engine("rule big\n  forward avg, sum of x every 1m");
    let mut out = Output::default();
    let big = f64::MAX / 1.5;
    for (ts, v) in [(0, big), (1_000, big), (2_000, -big / 2.0), (60_000, 1.0)] {
        e.on_reading(&r("d", "x", v, ts), &mut out);
    }
    let a = &out.aggregates[0];
    assert_eq!(a.count, 3);
    assert!(a.sum.is_infinite(), "{}", a.sum);
    // (big + big - big / 2) / 3 = big / 2.
    assert!(a.avg.is_finite(), "{}", a.avg);
    assert!((a.avg - big / 2.0).abs() / big < 1e-12, "avg {}", a.avg);
}

#[test]
fn downsampling_replaces_raw_readings_with_one_aggregate_per_window() {
    let mut e =
        engine("rule hum\n  on device \"room-*\"\n  forward avg, min, max of humidity every 1m");
    let mut out = Output::default();
    let mut aggs = Vec::new();
    for (ts, v) in [
        (60_000, 40.0),
        (70_000, 50.0),
        (119_999, 45.0),
        (120_000, 60.0),
        (185_000, 10.0),
    ] {
        e.on_reading(&r("room-1", "humidity", v, ts), &mut out);
        assert_eq!(out.disposition, Disposition::Drop);
        aggs.append(&mut out.aggregates);
    }
    // Other metrics pass untouched.
    e.on_reading(&r("room-1", "temperature", 20.0, 185_001), &mut out);
    assert_eq!(out.disposition, Disposition::Forward);
    assert_eq!(aggs.len(), 2);
    let a = &aggs[0];
    assert_eq!((a.start_ms, a.end_ms, a.count), (60_000, 120_000, 3));
    assert_eq!(
        (a.avg, a.min, a.max, a.sum, a.last),
        (45.0, 40.0, 50.0, 135.0, 45.0)
    );
    assert_eq!(a.metric.as_str(), "humidity");
    assert!(a.functions.contains(AggFunctions::AVG) && !a.functions.contains(AggFunctions::SUM));
    assert_eq!(
        (aggs[1].start_ms, aggs[1].count, aggs[1].avg),
        (120_000, 1, 60.0)
    );
    // A tick closes the open window [180000, 240000).
    e.on_tick(239_999, &mut out);
    assert!(out.aggregates.is_empty());
    e.on_tick(240_000, &mut out);
    assert_eq!(out.aggregates.len(), 1);
    assert_eq!(
        (out.aggregates[0].start_ms, out.aggregates[0].avg),
        (180_000, 10.0)
    );
    // A reading for the window just emitted is late: forwarded raw, counted.
    e.on_reading(&r("room-1", "humidity", 99.0, 239_000), &mut out);
    assert_eq!(out.disposition, Disposition::Forward);
    assert_eq!(e.stats().late_readings, 1);
}

#[test]
fn drop_and_tag_follow_selectors_and_conditions() {
    let mut e = engine(
        r#"
rule debug
  on metric "debug_*"
  drop
rule site
  on device "plant3-*"
  tag site = "plant-3"
rule hot
  on device "plant3-*" metric "temperature"
  when temperature > 50
  tag hot = "yes"
rule noisy
  drop when noise > 10
"#,
    );
    let mut out = Output::default();
    e.on_reading(&r("x", "debug_level", 1.0, 1), &mut out);
    assert_eq!(out.disposition, Disposition::Drop);
    e.on_reading(&r("plant3-a", "temperature", 20.0, 1), &mut out);
    assert_eq!(out.disposition, Disposition::Forward);
    let tags: Vec<(&str, &str)> = out.tags.iter().map(|(k, v)| (&**k, &**v)).collect();
    assert_eq!(tags, vec![("site", "plant-3")]);
    e.on_reading(&r("plant3-a", "temperature", 60.0, 2), &mut out);
    let tags: Vec<(&str, &str)> = out.tags.iter().map(|(k, v)| (&**k, &**v)).collect();
    assert_eq!(tags, vec![("site", "plant-3"), ("hot", "yes")]);
    e.on_reading(&r("plant3-a", "humidity", 60.0, 3), &mut out);
    assert_eq!(out.tags.len(), 1, "hot tags only its selected metric");
    e.on_reading(&r("z", "noise", 11.0, 1), &mut out);
    assert_eq!(out.disposition, Disposition::Drop);
    e.on_reading(&r("z", "noise", 9.0, 2), &mut out);
    assert_eq!(out.disposition, Disposition::Forward);
}

#[test]
fn missing_data_is_detected_by_ticks_and_cleared_by_a_reading() {
    let mut e = engine("rule silent\n  when missing(temperature, 2m)\n  alert warning \"no data\"");
    let mut out = Output::default();
    e.on_reading(&r("s1", "temperature", 20.0, 0), &mut out);
    e.on_tick(119_999, &mut out);
    assert!(out.alerts.is_empty());
    e.on_tick(120_000, &mut out);
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(
        (out.alerts[0].state, out.alerts[0].ts_ms),
        (AlertState::Raised, 120_000)
    );
    e.on_tick(200_000, &mut out);
    assert!(out.alerts.is_empty());
    e.on_reading(&r("s1", "temperature", 20.0, 210_000), &mut out);
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(out.alerts[0].state, AlertState::Cleared);
}

#[test]
fn flatline_rate_and_arithmetic() {
    let mut e = engine("rule stuck\n  when flatline(t, 10s)\n  alert info \"stuck\"\nrule fast\n  when rate(p) * 2 > 1\n  alert info \"fast\"");
    let mut out = Output::default();
    let mut raised = Vec::new();
    for i in 0..=10u64 {
        e.on_reading(&r("d", "t", 5.0, i * 1000), &mut out);
        raised.extend(out.alerts.iter().map(|a| (a.rule.to_string(), a.ts_ms)));
    }
    assert_eq!(raised, vec![("stuck".to_string(), 10_000)]);
    e.on_reading(&r("d", "t", 5.5, 11_000), &mut out);
    assert_eq!(out.alerts[0].state, AlertState::Cleared);
    e.on_reading(&r("d", "p", 0.0, 0), &mut out);
    e.on_reading(&r("d", "p", 0.4, 1000), &mut out); // 0.4/s * 2 = 0.8
    assert!(out.alerts.is_empty());
    e.on_reading(&r("d", "p", 0.7, 1500), &mut out); // 0.6/s * 2 = 1.2
    assert_eq!(out.alerts.len(), 1);
}

#[test]
fn conditions_across_metrics_of_the_same_device() {
    let mut e = engine(
        "rule muggy\n  when temperature > 30 and not (humidity < 70)\n  alert info \"muggy\"",
    );
    let mut out = Output::default();
    e.on_reading(&r("a", "temperature", 35.0, 1), &mut out);
    assert!(
        out.alerts.is_empty(),
        "humidity unknown: comparisons with unknown are false"
    );
    e.on_reading(&r("b", "humidity", 80.0, 2), &mut out);
    assert!(out.alerts.is_empty(), "another device");
    e.on_reading(&r("a", "humidity", 80.0, 3), &mut out);
    assert_eq!(out.alerts.len(), 1);
}

#[test]
fn late_and_non_finite_readings_change_no_state() {
    let mut e = engine("rule hi\n  when x > 10\n  alert info \"hi\"");
    let mut out = Output::default();
    e.on_reading(&r("a", "x", 1.0, 1000), &mut out);
    e.on_reading(&r("a", "x", 50.0, 999), &mut out);
    assert!(out.alerts.is_empty());
    assert_eq!(out.disposition, Disposition::Forward);
    e.on_reading(&r("a", "x", f64::NAN, 2000), &mut out);
    e.on_reading(&r("a", "x", f64::INFINITY, 2000), &mut out);
    assert!(out.alerts.is_empty());
    let s = e.stats();
    assert_eq!((s.late_readings, s.non_finite, s.readings), (1, 2, 4));
    e.on_reading(&r("a", "x", 50.0, 1000), &mut out);
    assert_eq!(out.alerts.len(), 1, "equal timestamps are not late");
}

#[test]
fn max_devices_bounds_per_rule_state_and_counts_refusals() {
    let mut e = engine("rule hi\n  when x > 10\n  alert info \"hi\"\n  max_devices 2");
    let mut out = Output::default();
    let mut n = 0;
    for d in ["a", "b", "c", "d", "c"] {
        e.on_reading(&r(d, "x", 50.0, 1), &mut out);
        n += out.alerts.len();
    }
    assert_eq!(n, 2);
    assert_eq!(e.stats().rule_devices_refused, 2);
    assert_eq!(e.rule_refusals().collect::<Vec<_>>(), vec![("hi", 2)]);

    let limits = Limits {
        max_engine_devices: 1,
        ..Limits::default()
    };
    let mut e = Engine::new(compile_with("rule d\n  drop", &limits).unwrap());
    e.on_reading(&r("a", "x", 1.0, 1), &mut out);
    assert_eq!(out.disposition, Disposition::Drop);
    e.on_reading(&r("b", "x", 1.0, 1), &mut out);
    assert_eq!(
        out.disposition,
        Disposition::Forward,
        "past the engine limit: untouched"
    );
    assert_eq!((e.device_count(), e.stats().engine_devices_refused), (1, 1));
}

#[test]
fn swap_plan_keeps_state_of_unchanged_rules_only() {
    let keep = "rule keep\n  when avg(x, 3) > 10\n  alert info \"k\"\n";
    let change = "rule change\n  when avg(x, 3) > 10\n  alert info \"c\"\n";
    let mut e = engine(&format!("{keep}{change}"));
    let mut out = Output::default();
    for (i, v) in [30.0, 30.0].into_iter().enumerate() {
        e.on_reading(&r("a", "x", v, i as u64), &mut out);
    }
    // Both raised after the first reading (avg 30).
    let changed = change.replace("> 10", "> 11");
    e.swap_plan(compile(&format!("{keep}{changed}")).unwrap());
    assert_eq!(e.plan().rule_count(), 2);
    e.on_reading(&r("a", "x", 30.0, 2), &mut out);
    let names: Vec<&str> = out.alerts.iter().map(|a| &*a.rule).collect();
    assert_eq!(
        names,
        vec!["change"],
        "`change` restarts and raises again; `keep` stays raised"
    );
    e.on_reading(&r("a", "x", -100.0, 3), &mut out);
    // keep's window still holds 30, 30, 30 -> avg(30, 30, -100) < 10 clears it;
    // change's window holds 30, -100 -> clears too.
    assert_eq!(out.alerts.len(), 2);
    assert!(out.alerts.iter().all(|a| a.state == AlertState::Cleared));
    // Removing a rule frees it; a new device still works.
    e.swap_plan(compile(keep).unwrap());
    e.on_reading(&r("b", "x", 30.0, 4), &mut out);
    assert_eq!(out.alerts.len(), 1);
}

#[test]
fn replay_is_deterministic_and_prints_one_json_object_per_event() {
    let plan = compile(
        r#"
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
rule hum
  forward avg of humidity every 1m
rule silent
  when missing(temperature, 1m)
  alert warning "silent"
"#,
    )
    .unwrap();
    let mut readings = Vec::new();
    for i in 0..200u64 {
        let t = if (40..120).contains(&i) { 90.0 } else { 60.0 };
        readings.push(OwnedReading {
            device: "boiler-1".into(),
            metric: "temperature".into(),
            value: t,
            ts_ms: i * 1000,
        });
        readings.push(OwnedReading {
            device: "boiler-1".into(),
            metric: "humidity".into(),
            value: i as f64,
            ts_ms: i * 1000,
        });
    }
    readings.push(OwnedReading {
        device: "boiler-1".into(),
        metric: "humidity".into(),
        value: 0.0,
        ts_ms: 400_000,
    });
    let a = replay(plan.clone(), readings.clone());
    let b = replay(plan, readings);
    assert_eq!(a, b);
    let lines: Vec<String> = a.iter().map(|e| e.to_string()).collect();
    let alerts: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"alert\""))
        .collect();
    assert_eq!(alerts.len(), 3, "{alerts:#?}");
    assert_eq!(
        alerts[0],
        r#"{"event":"alert","ts":70000,"rule":"overheat","device":"boiler-1","severity":"critical","state":"raised","value":90,"message":"boiler overheating"}"#
    );
    assert!(alerts[1].contains("\"ts\":120000") && alerts[1].contains("cleared"));
    assert!(
        alerts[2].contains("\"rule\":\"silent\"") && alerts[2].contains("\"ts\":259000"),
        "{}",
        alerts[2]
    );
    let aggs = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"aggregate\""))
        .count();
    assert_eq!(aggs, 4, "windows 0, 1, 2 and 3 minutes");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"event\":\"dropped\""))
            .count(),
        201
    );
}

#[test]
fn degraded_paths_are_counted() {
    // A time window fuller than its ring: early evictions.
    let limits = Limits {
        time_window_samples: 4,
        ..Limits::default()
    };
    let mut e = Engine::new(
        compile_with(
            "rule w\n  when avg(x, 1m) > 1000\n  alert info \"w\"",
            &limits,
        )
        .unwrap(),
    );
    let mut out = Output::default();
    for i in 0..10 {
        e.on_reading(&r("a", "x", 1.0, i * 1000), &mut out);
    }
    assert_eq!(e.stats().window_early_evictions, 6);

    // More distinct metrics than the routing cache holds: still evaluated, counted.
    let mut e = engine("rule t\n  tag k = \"v\"");
    let names: Vec<String> = (0..MAX_CACHED_METRICS_PER_DEVICE + 3)
        .map(|i| format!("m{i}"))
        .collect();
    for n in &names {
        e.on_reading(&r("a", n, 1.0, 1), &mut out);
        assert_eq!(out.tags.len(), 1);
    }
    assert_eq!(e.stats().uncached_metric_readings, 3);

    // A device name longer than the protocol allows: untouched, counted.
    let long = "d".repeat(49);
    e.on_reading(&r(&long, "x", 1.0, 1), &mut out);
    assert!(out.is_empty());
    assert_eq!(e.stats().device_name_too_long, 1);
}

/// `Engine::prefetch` only reads: an engine told to prefetch, ahead and out of turn, for
/// readings it will see, has seen or will never see, decides exactly what one never told
/// does, through every state of every kind of window (empty, filling, full, expiring by
/// time) and through a plan swap.
#[test]
fn prefetch_changes_no_decision() {
    let src = r#"
rule hot
  on device "d-*"
  when temperature > 80 for 1s
  clear when temperature < 75
  alert warning "hot"
rule windows
  on device "d-*"
  when avg(temperature, 8) > 79 and max(temperature, 5) - min(temperature, 5) > 4 and median(temperature, 6) > 70 and percentile(temperature, 90, 9) > 81
  alert info "window"
rule timed
  on device "d-*"
  when avg(temperature, 3s) > 80 and count(vibration, 2s) > 3 and stddev(temperature, 2s) > 1
  alert info "timed"
rule scores
  on device "d-*"
  when zscore(vibration, 7) > 2 or mad_outlier(vibration, 6, 3) or ewma_dev(vibration, 0.3) > 2
  alert warning "vibration"
rule slow
  on device "d-*"
  when ewma(temperature, 0.5) > 82 or rate(temperature) > 5 or flatline(vibration, 3s) or missing(vibration, 4s)
  alert info "slow"
rule tagged
  on metric "vib*"
  tag line = "3"
"#;
    let mut plain = engine(src);
    let mut hinted = engine(src);
    let (mut a, mut b) = (Output::default(), Output::default());
    let devices = ["d-1", "d-2", "d-3"];
    let reading = |i: u64| {
        let device = devices[(i % 3) as usize];
        let (metric, value) = if i % 2 == 0 {
            ("temperature", 70.0 + ((i * 7) % 19) as f64)
        } else {
            ("vibration", if i % 23 == 0 { 40.0 } else { (i % 5) as f64 })
        };
        // Gaps now and then, so time windows empty and missing data fires.
        let ts = i * 150 + (i / 40) * 5_000;
        r(device, metric, value, ts)
    };
    let mut events = 0;
    for i in 0..600u64 {
        if i == 300 {
            // Swap to a plan that keeps some rules and changes others.
            let swapped = src.replace("avg(temperature, 8) > 79", "avg(temperature, 4) > 78");
            plain.swap_plan(compile(&swapped).unwrap());
            hinted.swap_plan(compile(&swapped).unwrap());
        }
        for ahead in [i, i + 1, i + 5, i.saturating_sub(3)] {
            let x = reading(ahead);
            hinted.prefetch(x.device, x.metric);
        }
        hinted.prefetch("unknown", "temperature");
        hinted.prefetch("d-1", "unknown");
        let x = reading(i);
        plain.on_reading(&x, &mut a);
        hinted.on_reading(&x, &mut b);
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "reading {i}");
        events += a.alerts.len();
        if i % 10 == 0 {
            plain.on_tick(x.ts_ms, &mut a);
            hinted.on_tick(x.ts_ms, &mut b);
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "tick after reading {i}");
            events += a.alerts.len();
        }
    }
    assert!(
        events > 20,
        "the stream must raise and clear alerts, got {events}"
    );
    assert_eq!(plain.stats(), hinted.stats());
}
