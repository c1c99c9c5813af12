//! The Modbus benchmark: figures for docs/performance.md, not pass/fail speed claims (each run
//! only checks that values flowed). A `cargo bench` target (no test harness); run it on a quiet
//! machine with a release build of the agent, both parts or those whose name contains an
//! argument:
//!
//! ```sh
//! cargo build --release -p edgestream-agent --no-default-features
//! EDGESTREAM_AGENT=$CARGO_TARGET_DIR/release/edgestream MODBUS_BENCH_SECS=30 \
//!   cargo bench -p edgestream-agent --bench modbus [-- tcp|rtu]
//! ```
//!
//! - `tcp_10_slaves_x_100_registers_at_10_hz`: ten simulated Modbus TCP slaves (one bus
//!   each), 100 holding registers each, polled every 100 ms: 10,000 values/s through the rules
//!   stage, the outbox and the uplink to a real mosquitto. Reports the agent's CPU per value
//!   (all its threads, from /proc) and the poll jitter at the slaves: how far each interval
//!   between two requests of one slave is from 100 ms (p50, p99, max).
//! - `rtu_polls_against_the_line_maximum`: one RTU bus on a pseudo-terminal whose simulated
//!   slaves answer when the request, the silence that ends it and the answer would have taken
//!   that long on a real line (8N1) at 9,600 and 115,200 baud; four slaves polled every
//!   10 ms keep the bus saturated. Reports polls per second against the line's theoretical
//!   maximum for the same requests: request + 3.5 characters + answer + 3.5 characters.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::procstat::cpu_seconds;
use edgestream_sim::prometheus::scrape_parsed;
use edgestream_sim::{ModbusRtuSlave, ModbusTable, ModbusTcpSlave, Mosquitto};

fn bench_secs() -> u64 {
    std::env::var("MODBUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// The agent under measure: `EDGESTREAM_AGENT` (a release build) or the test build's.
fn agent_binary() -> String {
    std::env::var("EDGESTREAM_AGENT").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgestream").into())
}

/// The agent and its brokers. No cloud subscriber: at 10,000 readings/s one would cost this
/// process more than the agent costs its own; the agent's own counters come from its
/// Prometheus endpoint.
struct Site {
    _local: Mosquitto,
    _cloud: Mosquitto,
    metrics_port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(gateway: &str, modbus_toml: &str) -> Site {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_toml(
        gateway,
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        "",
        &format!("\n[metrics]\nprometheus = true\nport = {metrics_port}\n{modbus_toml}"),
    )
    .replace("batch_size = 50", "batch_size = 256");
    let config_path = dir.path().join("edgestream.toml");
    std::fs::write(&config_path, config).expect("config");
    let log = dir.path().join("agent.log");
    let child = std::process::Command::new(agent_binary())
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the agent");
    Site {
        _local: local,
        _cloud: cloud,
        metrics_port,
        _dir: dir,
        child,
        log,
    }
}

/// One sample of the agent's Prometheus endpoint (0 until it answers).
async fn metric(site: &Site, name: &str) -> f64 {
    scrape_parsed(site.metrics_port)
        .await
        .ok()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0.0)
}

const MODBUS_READINGS: &str = r#"edgestream_readings_in_total{source="modbus"}"#;
const SENT: &str = "edgestream_uplink_records_sent_total";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn tcp_10_slaves_x_100_registers_at_10_hz() {
    let mut slaves = Vec::new();
    let mut modbus = String::new();
    for s in 0..10u16 {
        let slave = ModbusTcpSlave::start(&[1]).await.expect("slave");
        let values: Vec<u16> = (0..100).map(|r| s * 1000 + r).collect();
        slave.set_registers(1, ModbusTable::Holding, 0, &values);
        modbus.push_str(&format!(
            "\n[[modbus]]\ntransport = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n[[modbus.slaves]]\nunit = 1\ndevice = \"meter-{s}\"\n",
            slave.port()
        ));
        for r in 0..100 {
            modbus.push_str(&format!(
                "[[modbus.slaves.registers]]\nmetric = \"r{r}\"\nfunction = \"holding\"\naddress = {r}\ninterval_ms = 100\n"
            ));
        }
        slaves.push(slave);
    }
    let site = start("gw-modbus-bench", &modbus).await;
    // Warm up: every slave polled, readings flowing.
    let warm = Instant::now();
    while metric(&site, MODBUS_READINGS).await < 20_000.0 {
        assert!(
            warm.elapsed() < Duration::from_secs(60),
            "no values flowed:\n{}",
            std::fs::read_to_string(&site.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = bench_secs();
    let pid = site.child.id();
    let polls_before: u64 = slaves.iter().map(|s| s.requests(1)).sum();
    let sent_before = metric(&site, SENT).await;
    let cpu_before = cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let elapsed = t0.elapsed().as_secs_f64();
    let sent = metric(&site, SENT).await - sent_before;
    let polls: u64 = slaves.iter().map(|s| s.requests(1)).sum::<u64>() - polls_before;
    let values = polls * 100;
    let mut jitter_ms: Vec<f64> = Vec::new();
    for s in &slaves {
        let times: Vec<Instant> = s
            .request_times(1)
            .into_iter()
            .filter(|t| *t >= t0)
            .collect();
        jitter_ms.extend(
            times
                .windows(2)
                .map(|w| ((w[1] - w[0]).as_secs_f64() * 1000.0 - 100.0).abs()),
        );
    }
    jitter_ms.sort_by(f64::total_cmp);
    let outbox = metric(&site, "edgestream_outbox_records").await;
    println!(
        "modbus tcp bench: {secs} s, 10 slaves x 100 registers at 10 Hz\n\
         values read: {values} ({:.0}/s of 10,000/s)\n\
         agent CPU: {cpu:.2} s = {:.1} % of a core, {:.2} us per value\n\
         poll jitter: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} intervals)\n\
         records sent to the cloud: {sent} ({:.0}/s); outbox depth at the end: {outbox}",
        values as f64 / elapsed,
        100.0 * cpu / elapsed,
        cpu * 1e6 / values as f64,
        percentile(&jitter_ms, 0.5),
        percentile(&jitter_ms, 0.99),
        jitter_ms.last().copied().unwrap_or(f64::NAN),
        jitter_ms.len(),
        sent / elapsed,
    );
    assert!(values > 0 && sent > 0.0);
}

async fn rtu_polls_against_the_line_maximum() {
    const REGISTERS: usize = 10;
    for baud in [9_600u32, 115_200] {
        let bus = ModbusRtuSlave::start(&[1, 2, 3, 4]).expect("rtu bus");
        bus.set_line_speed(Some(baud));
        let mut modbus = format!(
            "\n[[modbus]]\ntransport = \"rtu\"\npath = \"{}\"\nbaud_rate = {baud}\nparity = \"none\"\nstop_bits = 1\ntimeout_ms = 500\n",
            bus.path().display()
        );
        for unit in 1..=4 {
            modbus.push_str(&format!(
                "[[modbus.slaves]]\nunit = {unit}\ndevice = \"rtu-{unit}\"\n"
            ));
            for r in 0..REGISTERS {
                modbus.push_str(&format!(
                    "[[modbus.slaves.registers]]\nmetric = \"r{r}\"\nfunction = \"holding\"\naddress = {r}\ninterval_ms = 10\n"
                ));
            }
        }
        let site = start("gw-modbus-rtu-bench", &modbus).await;
        let warm = Instant::now();
        while (1..=4).map(|u| bus.requests(u)).sum::<u64>() < 40 {
            assert!(
                warm.elapsed() < Duration::from_secs(60),
                "no polls:\n{}",
                std::fs::read_to_string(&site.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = bench_secs().min(20);
        let before: u64 = (1..=4).map(|u| bus.requests(u)).sum();
        let cpu_before = cpu_seconds(site.child.id());
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let polls = (1..=4).map(|u| bus.requests(u)).sum::<u64>() - before;
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(site.child.id()) - cpu_before;
        // 8N1: 10 bits a character; request 8 bytes, answer 5 + 2 per register.
        let character = 10.0 / f64::from(baud);
        let silence = if baud > 19_200 {
            0.00175
        } else {
            3.5 * character
        };
        let per_poll = (8 + 5 + 2 * REGISTERS) as f64 * character + 2.0 * silence;
        let achieved = polls as f64 / elapsed;
        let max = 1.0 / per_poll;
        println!(
            "modbus rtu bench: {baud} baud 8N1, read of {REGISTERS} registers, {secs} s\n\
             achieved {achieved:.1} polls/s, line maximum {max:.1} polls/s: {:.1} %\n\
             agent CPU {:.1} % of a core; shortest silence before a request {:?}",
            100.0 * achieved / max,
            100.0 * cpu / elapsed,
            bus.gaps().iter().min()
        );
        assert!(polls > 0);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument selects parts by name.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if wanted("tcp_10_slaves_x_100_registers_at_10_hz") {
        println!("== tcp_10_slaves_x_100_registers_at_10_hz");
        rt.block_on(tcp_10_slaves_x_100_registers_at_10_hz());
    }
    if wanted("rtu_polls_against_the_line_maximum") {
        println!("== rtu_polls_against_the_line_maximum");
        rt.block_on(rtu_polls_against_the_line_maximum());
    }
}
