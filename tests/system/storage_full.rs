//! A full disk is a state the agent reports and recovers from by itself: the data directory on
//! a small tmpfs, filled up while readings arrive, then freed. Needs root (to mount tmpfs),
//! as CI has.
//!
//! What must hold: while the disk is full nothing is acknowledged, the health message, the
//! Prometheus endpoint and the log say so; when space comes back every reading is stored and
//! reaches the cloud without a restart; SIGTERM while the disk is full ends cleanly (exit 0)
//! and what was not stored is delivered after the restart (the local broker kept it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{config_toml, metrics_port, publish_samples, sample, wait_online, AgentProcess};
use edgestream_sim::{CloudCollector, Mosquitto};

/// A tmpfs of `size` mounted at `path` for the life of the value.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a filler file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xA5u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The latest health message's `summary.outbox.storage`.
fn latest_storage(collector: &CloudCollector) -> Option<serde_json::Value> {
    collector
        .payloads_on("health")
        .last()
        .map(|h| h["summary"]["outbox"]["storage"].clone())
}

async fn wait_storage_ok(collector: &CloudCollector, ok: bool, timeout: Duration) -> bool {
    collector
        .wait_for(
            |msgs| {
                msgs.iter()
                    .rev()
                    .find(|m| m.topic.ends_with("/health"))
                    .is_some_and(|m| m.payload["summary"]["outbox"]["storage"]["ok"] == ok)
            },
            timeout,
        )
        .await
}

/// Distinct reading values (each reading's value identifies it) that reached the cloud.
fn delivered(collector: &CloudCollector) -> std::collections::BTreeSet<u64> {
    collector
        .telemetry_readings()
        .iter()
        .filter_map(|r| r["value"].as_f64())
        .map(|v| v as u64)
        .collect()
}

async fn wait_delivered(collector: &CloudCollector, values: std::ops::Range<u64>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = delivered(collector);
        if values.clone().all(|v| got.contains(&v)) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Segment files in the outbox's directory (`*.seg`).
fn segment_files(data: &Path) -> usize {
    let outbox = data.join("outbox");
    std::fs::read_dir(&outbox)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                .count()
        })
        .unwrap_or(0)
}

fn readings(values: std::ops::Range<u64>) -> Vec<common::Sample> {
    values
        .map(|v| sample("meter-1", "energy", v as f64, 1_700_000_000_000 + v))
        .collect()
}

async fn scrape(port: u16) -> std::collections::HashMap<String, f64> {
    edgestream_sim::prometheus::scrape_parsed(port)
        .await
        .expect("scrape the metrics endpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_recovered_from_without_a_restart() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-full")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tmpfs = Tmpfs::mount(&data, "2m");
    // A 1 MiB cap makes 64 KiB segments, retired once wholly acknowledged past 16 KiB: the
    // healthy phase below ends with no segment file, so the first append on the full disk
    // must create one.
    let config = config_toml("gw-full", &data, local.port(), cloud.port(), "", "")
        + "[outbox]\nmax_bytes = 1048576\n[metrics]\nprometheus = true\nport = 0\n";
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    assert!(wait_online(&collector).await, "{}", agent.logs());
    agent
        .wait_log("metrics endpoint listening", Duration::from_secs(10))
        .await;
    let port = metrics_port(&agent.logs());

    // Healthy: stored and delivered.
    publish_samples(local.port(), &readings(0..800)).await;
    assert!(wait_delivered(&collector, 0..800).await, "{}", agent.logs());
    assert!(wait_storage_ok(&collector, true, Duration::from_secs(5)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while segment_files(&data) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drained segment was never retired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Disk full: nothing new is stored, and every channel says so.
    let filler = tmpfs.fill();
    publish_samples(local.port(), &readings(800..1300)).await;
    agent
        .wait_log("outbox storage failing", Duration::from_secs(10))
        .await;
    assert!(
        wait_storage_ok(&collector, false, Duration::from_secs(5)).await,
        "health never reported the failing storage\n{}",
        agent.logs()
    );
    let storage = latest_storage(&collector).unwrap();
    assert!(
        storage["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "health names the error: {storage}"
    );
    let m = scrape(port).await;
    assert_eq!(
        m.get("edgestream_outbox_storage_failing"),
        Some(&1.0),
        "{m:?}"
    );
    assert!(m["edgestream_outbox_storage_errors_total"] >= 1.0, "{m:?}");
    let during = delivered(&collector);
    assert!(
        during.range(800..1300).count() < 500,
        "the readings cannot all have been stored on a full disk"
    );

    // Space comes back: everything is stored and delivered, no restart.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_delivered(&collector, 800..1300).await,
        "readings held back by the full disk never reached the cloud: {} of 500\n{}",
        delivered(&collector).range(800..1300).count(),
        agent.logs()
    );
    agent
        .wait_log("outbox storage works again", Duration::from_secs(10))
        .await;
    assert!(wait_storage_ok(&collector, true, Duration::from_secs(5)).await);
    let m = scrape(port).await;
    assert_eq!(m.get("edgestream_outbox_storage_failing"), Some(&0.0));
    publish_samples(local.port(), &readings(1300..1350)).await;
    assert!(
        wait_delivered(&collector, 1300..1350).await,
        "{}",
        agent.logs()
    );
    assert!(agent.is_running());

    // Full again, then SIGTERM: a clean stop; what was not stored comes after the restart.
    let filler = tmpfs.fill();
    publish_samples(local.port(), &readings(1350..1650)).await;
    agent
        .wait_log("outbox storage failing", Duration::from_secs(10))
        .await;
    // A command whose refusal cannot be stored: the command router waits on the disk too.
    let now = 1_700_000_000_000u64;
    let cmd = serde_json::json!({"v": 1, "id": "c-full", "device": "nobody", "name": "open",
        "args": {}, "issued_at": now, "expires_at": now + 60_000});
    collector.publish("commands", &cmd, false).await.unwrap();
    agent
        .wait_log("command outcomes cannot be stored", Duration::from_secs(10))
        .await;
    let status = agent.terminate(Duration::from_secs(15));
    let logs = agent.logs();
    assert!(
        status.success(),
        "stop during a full disk: {status}\n{logs}"
    );
    assert!(!logs.contains("did not stop cleanly"), "{logs}");
    std::fs::remove_file(&filler).unwrap();
    let mut agent = AgentProcess::start(dir.path(), &config);
    agent.wait_subscribed().await;
    assert!(
        wait_delivered(&collector, 0..1650).await,
        "after the restart, missing: {:?}\n{}",
        (0..1650)
            .filter(|v| !delivered(&collector).contains(v))
            .take(20)
            .collect::<Vec<_>>(),
        agent.logs()
    );
    assert!(agent.terminate(Duration::from_secs(15)).success());
}
