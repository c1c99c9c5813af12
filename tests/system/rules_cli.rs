//! `edgestream rules check` and `edgestream rules test`: the operator's offline tools.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;

/// The canonical alert rule the other system tests use too.
const RULES: &str = common::OVERHEAT_RULES;

fn edgestream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(args)
        .output()
        .expect("run edgestream")
}

/// `edgestream rules test RULES --input INPUT`.
fn rules_test(rules: &std::path::Path, input: &std::path::Path) -> std::process::Output {
    edgestream(&[
        "rules",
        "test",
        rules.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ])
}

#[test]
fn check_reports_the_plan_or_every_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.esr");
    std::fs::write(&good, RULES).unwrap();
    let out = edgestream(&["rules", "check", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 rule(s)") && stdout.contains("state budget"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.esr");
    std::fs::write(&bad, "rule a\n  when t > > 1\n  alert warning \"x\"\nrule b\n  when avrg(t, 5m) > 1\n  alert critical \"y\"\n").unwrap();
    let out = edgestream(&["rules", "check", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad.esr:2:"), "{stderr}");
    assert!(
        stderr.contains("bad.esr:5:") && stderr.contains("avrg"),
        "{stderr}"
    );
}

#[test]
fn test_replays_readings_and_prints_the_alerts_they_raise() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.esr");
    std::fs::write(&rules, RULES).unwrap();
    let input = dir.path().join("readings.jsonl");
    let mut lines = String::new();
    for i in 0..60u64 {
        let v = if (10..50).contains(&i) { 85.0 } else { 70.0 };
        lines.push_str(&format!(
            "{{\"device\":\"boiler-1\",\"metric\":\"temperature\",\"value\":{v},\"ts\":{}}}\n",
            i * 1000
        ));
    }
    std::fs::write(&input, lines).unwrap();
    let out = rules_test(&rules, &input);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let alerts: Vec<(&str, u64)> = events
        .iter()
        .filter(|e| e["event"] == "alert")
        .map(|e| {
            (
                e["state"].as_str().unwrap_or(""),
                e["ts"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        alerts,
        vec![("raised", 40_000), ("cleared", 50_000)],
        "{stdout}"
    );

    // A malformed line is reported with its line number.
    std::fs::write(
        &input,
        "{\"device\":\"b\",\"metric\":\"t\",\"value\":1,\"ts\":1}\nnot json\n",
    )
    .unwrap();
    let out = rules_test(&rules, &input);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("readings.jsonl:2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
