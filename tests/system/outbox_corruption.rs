//! Damaged stores (issue 5): a value damaged on disk (a segment of telemetry records) is
//! skipped, counted and reported while the rest is delivered; a store that cannot be opened is moved aside, the agent runs on a
//! fresh one and says so on its status topic.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use edgestream_sim::{CloudCollector, FaultProxy, Mosquitto};

const T0: u64 = 1_700_000_000_000;

/// The outbox's values: key, value and the sequence numbers of the records each holds.
fn values(tree: &sled::Tree) -> Vec<(sled::IVec, sled::IVec, Vec<u64>)> {
    use edgestream_agent::outbox::record::{Segment, SEGMENT_VERSION};
    tree.iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.len() == 9 && k[0] <= 1)
        .map(|(k, v)| {
            let base = u64::from_be_bytes(k[1..9].try_into().unwrap());
            let seqs = if v.first() == Some(&SEGMENT_VERSION) {
                let seg = Segment::parse(base, &v, true).expect("intact segment");
                seg.entries.iter().map(|e| e.seq).collect()
            } else {
                vec![base]
            };
            (k, v, seqs)
        })
        .collect()
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
    let stored = |data: &std::path::Path| {
        let db = sled::open(data.join("outbox")).expect("open outbox with sled");
        let tree = db.open_tree("outbox").unwrap();
        values(&tree)
            .iter()
            .map(|(_, _, seqs)| seqs.len())
            .sum::<usize>()
    };
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

    // Damage the value holding record 77 the way bit rot would: sled's own log is intact, the
    // value is not. The whole value (a segment: the telemetry of one append) is lost.
    let victims: Vec<u64>;
    {
        let db = sled::open(data.join("outbox")).expect("open outbox with sled");
        let tree = db.open_tree("outbox").unwrap();
        let values = values(&tree);
        let stored: usize = values.iter().map(|(_, _, seqs)| seqs.len()).sum();
        assert_eq!(stored, samples.len(), "not everything was stored");
        let (k, v, seqs) = values
            .iter()
            .find(|(_, _, seqs)| seqs.contains(&77))
            .expect("record 77 stored");
        assert!(
            seqs.len() < samples.len(),
            "one value holds every record: the test would lose them all"
        );
        victims = seqs.clone();
        let mut v = v.to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0x04;
        tree.insert(k, v).unwrap();
        db.flush().unwrap();
    }

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
        .contains("corrupt outbox value removed at open"));
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
    // Not a sled database at all where the outbox should be.
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
