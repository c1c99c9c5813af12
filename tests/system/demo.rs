//! `edgestream demo` is the first thing a newcomer runs: it must work with nothing installed
//! and show data flowing end to end.

use std::process::Command;

#[test]
fn demo_runs_end_to_end_without_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["demo", "--duration", "10"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run edgestream demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n{stdout}\n{stderr}");
    let figure = |label: &str| -> u64 {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in the summary:\n{stdout}"))
    };
    assert!(figure("readings in") > 0, "{stdout}");
    assert!(figure("modbus readings in") > 0, "{stdout}");
    assert!(figure("alerts raised/cleared") > 0, "{stdout}");
    assert!(figure("records forwarded") > 0, "{stdout}");
    assert!(figure("records acknowledged") > 0, "{stdout}");
    assert!(figure("readings at the cloud") > 0, "{stdout}");
    assert_eq!(figure("errors logged"), 0, "{stdout}\n{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    // One status line per second.
    assert!(
        stdout.lines().filter(|l| l.starts_with('[')).count() >= 8,
        "{stdout}"
    );
    // The config the demo generated and kept for the user is one the agent accepts.
    let config = stdout
        .lines()
        .find_map(|l| l.strip_prefix("agent config: "))
        .unwrap_or_else(|| panic!("no agent config path in\n{stdout}"));
    let check = Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(["check", "--config", config])
        .output()
        .expect("run edgestream check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let kept = std::path::Path::new(config).parent().expect("config dir");
    let _ = std::fs::remove_dir_all(kept);
}
