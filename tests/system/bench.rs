//! `edgestream bench` must run from a fresh build, with nothing installed for the in-process
//! brokers, and report every figure the README's performance section is made of. The figures
//! themselves are the benchmark's business; this only checks that each one is measured.

use std::process::Command;

use serde_json::Value;

/// Runs a short bench and returns its exit status, stdout and stderr.
fn run_bench(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["bench", "--duration", "4", "--rate", "1000"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run edgestream bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status, stdout, stderr)
}

/// Runs a short bench that must succeed and returns its stdout.
fn bench(args: &[&str]) -> String {
    let (status, stdout, stderr) = run_bench(args);
    assert!(status.success(), "bench failed\n{stdout}\n{stderr}");
    stdout
}

/// Runs a 4-second `--soak` at the default rate (2-second samples) with `extra` arguments and
/// returns its JSON report.
fn short_soak(extra: &[&str]) -> Value {
    let args = [&["--json", "--soak", "4", "--soak-every", "2"], extra].concat();
    let out = bench(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"))
}

fn number(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field:?} in {v:#}"))
}

/// A fixed-rate phase's latencies: measured, and in order.
fn check_latencies(phase: &Value) {
    for field in ["latency_p50_ms", "latency_p99_ms", "latency_max_ms"] {
        assert!(number(phase, field) > 0.0, "{phase:#}");
    }
    assert!(number(phase, "latency_p50_ms") <= number(phase, "latency_p99_ms"));
    assert!(number(phase, "latency_p99_ms") <= number(phase, "latency_max_ms"));
}

/// Checks the report of a JSON run; `broker_process` says whether the local broker ran as a
/// process of its own (mosquitto), whose CPU the bench then reports.
fn check_report(stdout: &str, broker_process: bool) {
    let r: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("--json did not print one JSON object ({e}):\n{stdout}"));
    let phases = r["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    // mosquitto's own bridge is measured only when the brokers are mosquitto.
    let expected: &[&str] = if broker_process {
        &[
            "broker limit (bare subscriber)",
            "mosquitto bridge at 1000 readings/s",
            "mosquitto bridge flat out",
            "agent at 1000 readings/s",
            "agent flat out",
        ]
    } else {
        &[
            "broker limit (bare subscriber)",
            "agent at 1000 readings/s",
            "agent flat out",
        ]
    };
    assert_eq!(names, expected, "{r:#}");
    for p in phases {
        assert!(number(p, "delivered_per_s") > 0.0, "{p:#}");
        assert!(number(p, "offered_per_s") > 0.0, "{p:#}");
        assert_eq!(
            p["local_broker_cpu_us_per_reading"].is_f64(),
            broker_process,
            "{p:#}"
        );
        assert_eq!(
            p["local_broker_cpu_cores"].is_f64(),
            broker_process,
            "{p:#}"
        );
        // The whole machine: more than nothing, no more than its cores, and (for the agent's
        // phases) at least the agent's share, give or take a tick of either clock.
        let busy = number(p, "machine_busy_cores");
        assert!(busy > 0.0 && busy <= number(&r, "cores") + 0.05, "{p:#}");
        if let Some(agent) = p["agent_cpu_cores"].as_f64() {
            assert!(busy + 0.05 >= agent, "{p:#}");
        }
        // Steal is part of busy (0 on bare metal).
        let steal = number(p, "machine_steal_cores");
        assert!((0.0..=busy).contains(&steal), "{p:#}");
    }
    let (limit, latency, flat) = (
        &phases[0],
        &phases[names.len() - 2],
        &phases[names.len() - 1],
    );
    assert!(limit["agent_cpu_us_per_reading"].is_null(), "{limit:#}");
    if broker_process {
        // The bridge's deliveries were counted at the cloud broker, with no agent running.
        let (bridge_at_rate, bridge_flat) = (&phases[1], &phases[2]);
        for bridge in [bridge_at_rate, bridge_flat] {
            assert!(bridge["agent_cpu_us_per_reading"].is_null(), "{bridge:#}");
            assert!(
                number(bridge, "local_broker_cpu_us_per_reading") > 0.0,
                "{bridge:#}"
            );
        }
        assert!(number(&r, "agent_to_bridge_ratio") > 0.0, "{r:#}");
        // At the rate, the bridge keeps up and its latency is measured like the agent's.
        let rate = number(bridge_at_rate, "delivered_per_s");
        assert!((500.0..1500.0).contains(&rate), "{bridge_at_rate:#}");
        check_latencies(bridge_at_rate);
        // The agent's CPU per reading against the bridging mosquitto's, phase for phase: at
        // the same offered rate, and flat out.
        for (field, agent, bridge) in [
            ("agent_to_bridge_cpu_at_rate", latency, bridge_at_rate),
            ("agent_to_bridge_cpu_flat_out", flat, bridge_flat),
        ] {
            let c = &r[field];
            let ratio = number(c, "ratio");
            assert!(ratio.is_finite() && ratio > 0.0, "{field}: {c:#}");
            let agent_us = number(c, "agent_us_per_reading");
            let bridge_us = number(c, "bridge_us_per_reading");
            assert_eq!(agent_us, number(agent, "agent_cpu_us_per_reading"), "{r:#}");
            assert_eq!(
                bridge_us,
                number(bridge, "local_broker_cpu_us_per_reading"),
                "{r:#}"
            );
            assert!(
                (ratio - agent_us / bridge_us).abs() < 1e-9,
                "{field}: {c:#}"
            );
        }
    } else {
        for field in [
            "agent_to_bridge_ratio",
            "agent_to_bridge_cpu_at_rate",
            "agent_to_bridge_cpu_flat_out",
        ] {
            assert!(r[field].is_null(), "{field}: {r:#}");
        }
    }
    check_latencies(latency);
    for p in [latency, flat] {
        for field in [
            "agent_cpu_us_per_reading",
            "agent_cpu_cores",
            "agent_disk_bytes_per_reading",
            "agent_peak_rss_bytes",
            "agent_steady_rss_bytes",
        ] {
            assert!(number(p, field) > 0.0, "{field}: {p:#}");
        }
        // The second half's highest sample is one of the phase's samples.
        assert!(
            number(p, "agent_steady_rss_bytes") <= number(p, "agent_peak_rss_bytes"),
            "{p:#}"
        );
        let threads = p["agent_cpu_us_per_reading_by_thread"]
            .as_object()
            .expect("CPU by thread");
        assert!(threads.contains_key("tokio-rt-worker"), "{p:#}");
        // The kernel's part is part of the whole.
        let system = number(p, "agent_cpu_system_us_per_reading");
        assert!(
            (0.0..=number(p, "agent_cpu_us_per_reading")).contains(&system),
            "{p:#}"
        );
    }
    // Flat out the agent reads and writes sockets and flushes the outbox all the time: its
    // kernel time over the phase is many clock ticks.
    assert!(
        number(flat, "agent_cpu_system_us_per_reading") > 0.0,
        "{flat:#}"
    );
    assert!(number(&r, "agent_to_limit_ratio") > 0.0, "{r:#}");
    // Not compared with the sampled peak: the kernel updates `VmHWM` only on some paths
    // (unmapping, exit), so a transient peak that `VmRSS` showed can be missing from it.
    assert!(number(&r, "agent_vm_hwm_bytes") > 0.0, "{r:#}");
    assert!(number(&r, "agent_readings_per_flush") >= 1.0, "{r:#}");
}

#[test]
fn bench_reports_every_figure_with_in_process_brokers() {
    check_report(&bench(&["--json"]), false);
}

#[test]
fn bench_reports_every_figure_and_the_broker_cpu_with_mosquitto() {
    check_report(&bench(&["--json", "--broker", "mosquitto"]), true);
}

#[test]
fn bench_prints_the_table_with_the_ratio_to_the_broker_limit() {
    let out = bench(&[]);
    for line in [
        "broker limit (bare subscriber)",
        "agent at 1000 readings/s",
        "agent flat out ",
        "CPU us/rdg by thread",
        "agent CPU us/rdg in the kernel (system time): agent at 1000 readings/s ",
        "steady RSS",
        "machine busy cores (of ",
        "agent flat out / broker limit:",
        "readings per outbox flush",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
}

/// `--agent` measures another build (a board build without `tools`): the bench must run that
/// file as the agent, not itself. The file here is a script that leaves a mark and then runs
/// this build, so the figures are real and the mark shows which file was started.
#[test]
fn bench_runs_the_agent_binary_it_is_given() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let agent = dir.path().join("edgestream-board");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\nexec '{}' \"$@\"\n",
            mark.display(),
            env!("CARGO_BIN_EXE_edgestream")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = bench(&["--json", "--agent", agent.to_str().unwrap()]);
    check_report(&out, false);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["options"]["agent"].as_str(), agent.to_str(), "{r:#}");
    let args = std::fs::read_to_string(&mark).expect("the bench did not start the given agent");
    assert!(args.starts_with("run --config "), "{args}");

    let (status, _, stderr) = run_bench(&["--agent", "/nonexistent/edgestream"]);
    assert!(!status.success());
    assert!(
        stderr.contains("--agent /nonexistent/edgestream: no such file"),
        "{stderr}"
    );
}

/// `--rules FILE` runs the agent with that bundle instead of the built-in 20 rules: here one
/// rule that raises once per device and never clears, so the agent's alert counter must
/// equal the number of devices. Bundles the bench cannot count through (rules that drop
/// readings), bundles that do not compile and missing files are refused before anything
/// starts, each with a message that says what and where.
#[test]
fn bench_runs_the_agent_with_the_rules_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("probe.rules");
    std::fs::write(
        &rules,
        "rule probe\n  on device \"dev-*\"\n  when temperature > 0\n  alert info \"probe\"\n",
    )
    .unwrap();
    let rules_arg = rules.to_str().unwrap();
    let r = short_soak(&[
        "--devices",
        "10",
        "--connections",
        "2",
        "--rules",
        rules_arg,
    ]);
    assert_eq!(r["rules"], 1, "{r:#}");
    assert_eq!(r["options"]["rules"].as_str(), Some(rules_arg), "{r:#}");
    let raised = &r["agent_counters"]["edgestream_alerts_total{transition=\"raised\"}"];
    assert_eq!(raised.as_f64(), Some(10.0), "{r:#}");

    let drop = dir.path().join("drop.rules");
    std::fs::write(&drop, "rule quiet\n  on metric \"vibration\"\n  drop\n").unwrap();
    let bad = dir.path().join("bad.rules");
    std::fs::write(&bad, "rule broken\n  when temperature >\n").unwrap();
    let missing = dir.path().join("missing.rules");
    for (file, want) in [
        (&drop, "rule(s) quiet drop readings"),
        (&bad, "does not compile"),
        (&missing, "cannot read"),
    ] {
        let (status, stdout, stderr) = run_bench(&["--rules", file.to_str().unwrap()]);
        assert!(!status.success(), "{stdout}");
        assert!(stderr.contains(want), "{}: {stderr}", file.display());
        assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    }
}

/// `--soak` runs the agent at the rate for the given time and samples what could grow with
/// it: resident memory, the outbox's depth and its store on disk, with the rate delivered
/// and the latency of each interval.
#[test]
fn bench_soak_samples_memory_and_store_over_time() {
    let out = bench(&["--json", "--soak", "6", "--soak-every", "2"]);
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let phases = r["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 1, "{r:#}");
    assert_eq!(phases[0]["name"], "agent soak at 1000 readings/s", "{r:#}");
    for field in [
        "delivered_per_s",
        "latency_p99_ms",
        "agent_cpu_us_per_reading",
        "agent_disk_bytes_per_reading",
        "agent_peak_rss_bytes",
    ] {
        assert!(number(&phases[0], field) > 0.0, "{field}: {r:#}");
    }
    let system = number(&phases[0], "agent_cpu_system_us_per_reading");
    assert!(
        (0.0..=number(&phases[0], "agent_cpu_us_per_reading")).contains(&system),
        "{r:#}"
    );
    let samples = r["soak"].as_array().expect("soak samples");
    assert_eq!(samples.len(), 3, "{r:#}");
    let mut last_at = 0.0;
    for s in samples {
        let at = number(s, "at_s");
        assert!(at > last_at + 1.5, "samples 2 s apart: {s:#}");
        last_at = at;
        // The load runs at 1,000 readings/s; the agent keeps up at that rate.
        let rate = number(s, "delivered_per_s");
        assert!((500.0..1500.0).contains(&rate), "{s:#}");
        assert!(number(s, "latency_p99_ms") > 0.0, "{s:#}");
        assert!(number(s, "agent_rss_bytes") > 1e6, "{s:#}");
        assert!(number(s, "outbox_disk_bytes") > 0.0, "{s:#}");
        assert!(s["outbox_records"].is_f64(), "{s:#}");
        assert!(number(s, "machine_steal_cores") >= 0.0, "{s:#}");
        let system = number(s, "agent_cpu_system_us_per_reading");
        assert!(
            (0.0..=number(s, "agent_cpu_us_per_reading")).contains(&system),
            "{s:#}"
        );
    }
    // The whole soak's machine figures, as in the other phases.
    let busy = number(&phases[0], "machine_busy_cores");
    assert!(busy > 0.0, "{r:#}");
    assert!(
        (0.0..=busy).contains(&number(&phases[0], "machine_steal_cores")),
        "{r:#}"
    );
    // `durability = "batch"` (the default): every group commit is flushed.
    assert_eq!(r["options"]["durability"], "batch", "{r:#}");
    assert!(number(&r, "agent_outbox_flushes") > 0.0, "{r:#}");
    let default_group = number(&r, "agent_readings_per_flush");

    // `--commit-linger-ms` reaches the agent: at 1,000 readings/s a group may wait 200 ms
    // instead of 16 to share its flush, so each flush carries several times the readings
    // (up to rumqttd's window of 100), and the load is still delivered.
    let r = short_soak(&["--commit-linger-ms", "200"]);
    assert_eq!(r["options"]["commit_linger_ms"], 200, "{r:#}");
    let long_group = number(&r, "agent_readings_per_flush");
    assert!(
        long_group >= 30.0 && long_group >= 2.0 * default_group,
        "{long_group} readings per flush against {default_group}: {r:#}"
    );
    let rate = number(&r["phases"][0], "delivered_per_s");
    assert!((500.0..1500.0).contains(&rate), "{r:#}");

    // `--durability interval` reaches the agent: its groups are not flushed (sled flushes
    // in the background), and it keeps up as before.
    let r = short_soak(&["--durability", "interval"]);
    assert_eq!(r["options"]["durability"], "interval", "{r:#}");
    assert_eq!(number(&r, "agent_outbox_flushes"), 0.0, "{r:#}");
    let rate = number(&r["phases"][0], "delivered_per_s");
    assert!((500.0..1500.0).contains(&rate), "{r:#}");

    let table = bench(&[
        "--soak",
        "4",
        "--soak-every",
        "2",
        "--commit-linger-ms",
        "100",
    ]);
    assert!(
        table.contains("durable outbox (batch, commit linger 100 ms)"),
        "{table}"
    );
    let table = bench(&["--soak", "4", "--soak-every", "2"]);
    for line in [
        "durable outbox (batch)",
        "agent soak at 1000 readings/s",
        "soak samples (every 2 s):",
        "CPU us/rdg  kernel       RSS  outbox records  store on disk  steal",
        "soak: highest RSS",
    ] {
        assert!(table.contains(line), "no {line:?} in\n{table}");
    }
    assert!(!table.contains("broker limit"), "{table}");
}
