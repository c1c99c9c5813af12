//! Damaged stores: a record damaged on disk is skipped, counted and reported while the rest is
//! delivered; a torn segment tail is found by `edgestream outbox verify` and truncated by its
//! `--repair` as the agent's start would; a store that cannot be opened is moved aside, the
//! agent runs on a fresh one and says so on its status topic.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use edgestream_sim::{CloudCollector, FaultProxy, Mosquitto};

const T0: u64 = 1_700_000_000_000;

/// The outbox's records: (segment file, frame offset, body offset, body length, seq).
fn frames(outbox: &Path) -> Vec<(PathBuf, u64, u64, usize, u64)> {
    use edgestream_agent::outbox::log::{list_segments, Item, Scanner, SegmentHeader};
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    for list in list_segments(outbox).unwrap() {
        for (_, path) in list {
            let f = std::fs::File::open(&path).unwrap();
            let mut h = [0u8; 26];
            f.read_exact_at(&mut h, 0).unwrap();
            let header = SegmentHeader::decode(&h).expect("intact header");
            let len = f.metadata().unwrap().len();
            let mut scan = Scanner::new(&f, header, 26, len);
            while let Item::Frame { off, len, seq, .. } = scan.next_item().unwrap() {
                let body = scan.body().len();
                out.push((path.clone(), off, off + len - body as u64, body, seq));
            }
        }
    }
    out
}

/// Flips a bit in the middle of a record's body, as bit rot would.
fn damage(path: &Path, body_at: u64, body_len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = body_at + body_len as u64 / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x04;
    f.write_all_at(&b, at).unwrap();
}

fn verify(data: &Path, repair: bool) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgestream"));
    cmd.args(["outbox", "verify", "--data-dir"]).arg(data);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().expect("run edgestream outbox verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_is_skipped_and_counted_and_the_rest_is_delivered() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let proxy = FaultProxy::start(cloud.addr()).await.expect("proxy");
    proxy.cut();
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-rot")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = config_toml("gw-rot", &data, local.port(), proxy.port(), "", "");
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    let samples: Vec<Sample> = (0..200u64)
        .map(|i| sample(&format!("dev-{}", i % 2), "temperature", i as f64, T0 + i))
        .collect();
    publish_samples(local.port(), &samples).await;
    // A graceful stop stores and acknowledges everything it was given; with the cloud
    // unreachable it all stays in the outbox. Readings the local broker had not handed over
    // yet stay there for the next start: restart until all of them are in the outbox.
    let stored = |data: &Path| frames(&data.join("outbox")).len();
    let mut tries = 0;
    loop {
        let status = agent.terminate(Duration::from_secs(20));
        assert!(status.success(), "{}", agent.logs());
        if stored(&data) == samples.len() {
            break;
        }
        tries += 1;
        assert!(tries < 10, "the agent never stored all readings");
        agent = AgentProcess::start(dir.path(), &cfg);
        agent.wait_subscribed().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, text) = verify(&data, false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("total: 200 records"), "{text}");

    // Damage record 77 the way bit rot would: only that record is lost; the frames around it
    // stand alone.
    let all = frames(&data.join("outbox"));
    let (path, _, body_at, body_len, _) = all
        .iter()
        .find(|f| f.4 == 77)
        .cloned()
        .expect("record 77 stored");
    assert!(
        all.iter().any(|f| f.0 == path && f.4 > 77),
        "record 77 is its segment's last: it would read as a torn tail"
    );
    damage(&path, body_at, body_len);
    let victims: Vec<u64> = vec![77];
    let (code, text) = verify(&data, false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("CORRUPT 1 record"), "{text}");
    assert!(text.contains("total: 199 records"), "{text}");

    proxy.restore();
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    assert!(
        wait_unique_readings(
            &collector,
            samples.len() - victims.len(),
            Duration::from_secs(30)
        )
        .await,
        "{}",
        agent.logs()
    );
    let cloud = cloud_readings(&collector.telemetry_readings());
    assert!(
        cloud.iter().all(|r| !victims.contains(&r.4)),
        "a record of the damaged value was delivered"
    );
    let expected: Vec<Sample> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| !victims.contains(&(*i as u64)))
        .map(|(_, s)| s.clone())
        .collect();
    assert_all_delivered_in_order(&expected, &cloud);
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/health")
                    && m.payload["counters"]["outbox_corrupt"] == 1),
                Duration::from_secs(10)
            )
            .await,
        "health never counted the corrupt record: {:?}",
        collector.payloads_on("health").last()
    );
    assert!(agent
        .logs()
        .contains("corrupt outbox record skipped at open"));
    agent.terminate(Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_opened_is_moved_aside_and_reported() {
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-aside")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A file where the outbox's directory should be.
    std::fs::write(
        data.join("outbox"),
        b"\x00garbage where a database should be",
    )
    .unwrap();
    let cfg = config_toml("gw-aside", &data, local.port(), cloud.port(), "", "");
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    assert!(
        collector
            .wait_for(
                |m| m.iter().any(|m| m.topic.ends_with("/status")
                    && m.payload["state"] == "online"
                    && m.payload["outbox_recovered"]["moved_to"]
                        .as_str()
                        .is_some_and(|p| p.contains("outbox.broken-"))),
                Duration::from_secs(20)
            )
            .await,
        "status never reported the moved-aside store: {:?}\n{}",
        collector.payloads_on("status"),
        agent.logs()
    );
    let aside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.broken-")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the broken store was not kept for inspection"
    );
    agent.wait_subscribed().await;
    let samples: Vec<Sample> = (0..50u64)
        .map(|i| sample("dev-1", "temperature", i as f64, T0 + i))
        .collect();
    publish_samples(local.port(), &samples).await;
    assert!(
        wait_unique_readings(&collector, samples.len(), Duration::from_secs(30)).await,
        "{}",
        agent.logs()
    );
    assert_all_delivered_in_order(&samples, &cloud_readings(&collector.telemetry_readings()));
    agent.terminate(Duration::from_secs(15));
}

#[test]
fn outbox_verify_reports_damage_and_repair_truncates_a_torn_tail() {
    use edgestream_agent::outbox::config::{Durability, FullPolicy};
    use edgestream_agent::outbox::record::{ReadingRecord, Record};
    use edgestream_agent::outbox::store::{Outbox, OutboxSettings};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings = OutboxSettings {
        max_bytes: 1 << 20,
        cache_bytes: 1 << 20,
        durability: Durability::Batch,
        flush_interval_ms: 1000,
        full_policy: FullPolicy::DropOldestTelemetry,
        max_age_secs: None,
    };
    {
        let (ob, _) =
            Outbox::open(&data.join("outbox"), settings.clone(), Default::default()).unwrap();
        let recs: Vec<Record> = (0..100)
            .map(|i| {
                Record::Reading(ReadingRecord {
                    device: "dev-1".try_into().unwrap(),
                    metric: "temperature".try_into().unwrap(),
                    value: i as f64,
                    ts_ms: T0 + i,
                    tags: vec![],
                })
            })
            .collect();
        ob.append(&recs).unwrap();
        ob.flush_blocking().unwrap();
    }
    let (code, text) = verify(&data, false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("total: 100 records"), "{text}");
    assert!(
        text.contains("oldest 0 s") || text.contains("oldest 1 s"),
        "{text}"
    );
    // A power cut in the middle of the last frame: half of it, then zeros.
    let all = frames(&data.join("outbox"));
    let (path, last_off, ..) = all.last().cloned().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 5).unwrap();
    f.set_len(len + 100).unwrap();
    drop(f);
    let (code, text) = verify(&data, false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("TORN tail"), "{text}");
    assert!(text.contains("total: 99 records"), "{text}");
    let (code, text) = verify(&data, true);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("truncated"), "{text}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), last_off);
    let (code, text) = verify(&data, false);
    assert_eq!(code, 0, "{text}");
    // The agent's store opens the repaired directory with the 99 records.
    let (ob, report) = Outbox::open(&data.join("outbox"), settings, Default::default()).unwrap();
    assert_eq!(
        (report.records, report.truncated_bytes, ob.depth()),
        (99, 0, 99)
    );
    drop(ob);
    // Not an outbox at all: a read error, exit 2.
    let (code, text) = verify(&dir.path().join("missing"), false);
    assert_eq!(code, 2, "{text}");
}
