//! Crash loop (issue 5): the real agent under steady load, killed with SIGKILL at random
//! moments 50 times in a row on the same data directory. Every reading the local broker
//! acknowledged to a device must reach the cloud, in order per device; duplicates come only
//! from the in-flight windows and are told apart by sequence number or reading identity.

#[path = "common/mod.rs"]
mod common;
#[path = "outbox_support.rs"]
mod support;

use std::time::{Duration, Instant};

use common::*;
use edgestream_sim::{CloudCollector, Mosquitto};
use rand::Rng;
use support::*;

const KILLS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_fifty_times_under_load_loses_no_acknowledged_reading() {
    let started = Instant::now();
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("cloud broker");
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-crash")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_toml(
        "gw-crash",
        &dir.path().join("data"),
        local.port(),
        cloud.port(),
        "",
        "",
    );
    // The first start creates the agent's persistent session on the local broker; from then
    // on the broker queues readings for it while it is dead.
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    let mut devices = fleet(local.port(), "crash", 4, 50.0);
    assert!(devices.wait_connected(Duration::from_secs(10)).await);

    let mut rng = rand::rng();
    let mut lifetimes = Vec::with_capacity(KILLS);
    for _ in 0..KILLS {
        // Anywhere from mid-start-up to well into steady delivery.
        let life = Duration::from_millis(rng.random_range(30..900));
        tokio::time::sleep(life).await;
        assert!(
            agent.is_running(),
            "agent died on its own\n{}",
            agent.logs()
        );
        agent.kill();
        lifetimes.push(life);
        agent = AgentProcess::start(dir.path(), &cfg);
    }
    let killed_at = Instant::now();
    agent.wait_subscribed().await;
    // Keep the load on a little after the last crash, then stop the devices (they wait for
    // their in-flight PUBACKs) so that `acked()` is final.
    tokio::time::sleep(Duration::from_millis(500)).await;
    devices.stop().await;
    let stats = devices.stats();
    assert!(
        wait_all_acked_delivered(&collector, &devices, Duration::from_secs(40)).await,
        "not every acknowledged reading reached the cloud\n{}",
        agent.logs()
    );
    let d = delivery(&collector);
    assert_acked_delivered_in_order(&devices, &d);
    let logs = agent.logs();
    agent.terminate(Duration::from_secs(15));
    eprintln!(
        "crash loop: {KILLS} SIGKILLs (lifetimes {:?}..{:?}), devices acked {} readings \
         ({} sampled, {} published), cloud got {} arrivals: {} distinct, {} resent in flight \
         (same seq), {} stored twice (new seq); recovered in {:?}; total {:?}",
        lifetimes.iter().min().unwrap(),
        lifetimes.iter().max().unwrap(),
        stats.acked,
        stats.sampled,
        stats.published,
        d.arrivals,
        d.first_arrivals.values().map(Vec::len).sum::<usize>(),
        d.dup_same_seq,
        d.dup_new_seq,
        killed_at.elapsed(),
        started.elapsed(),
    );
    assert!(
        stats.acked > 1000,
        "too little load to prove anything: {stats:?}"
    );
    assert!(
        !logs.contains("moved aside"),
        "a SIGKILL left a store that could not be opened\n{logs}"
    );
}
