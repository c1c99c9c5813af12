//! The demo preset keeps its promise: boiler-1 runs hot (above 80 for more
//! than 30 s of signal time) within the first ~5 s of wall time, then cools
//! below 75.

use std::time::Duration;

use edgestream_sim::{
    demo_fleet, simulate_until, CloudCollector, InProcessBroker, SimulateOptions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_fleet_overheats_boiler_1_early_then_recovers() {
    let broker = InProcessBroker::start().await.expect("rumqttd");
    let sub = CloudCollector::connect("127.0.0.1", broker.port(), "sensors", "boiler-1")
        .await
        .expect("subscriber");
    let mut opts = SimulateOptions::mqtt("127.0.0.1", broker.port(), demo_fleet());
    opts.print = false;
    let wall = tokio::time::Instant::now();
    let report = simulate_until(opts, tokio::time::sleep(Duration::from_secs(6)))
        .await
        .expect("simulate");
    assert!(wall.elapsed() < Duration::from_secs(8));
    assert_eq!(report.mqtt.len(), 6);
    let t = report.mqtt_total();
    assert!(t.acked > 6 * 40, "{t:?}");
    assert_eq!(t.unacked_lost, 0);

    assert!(
        sub.wait_for(|m| m.len() > 100, Duration::from_secs(5))
            .await
    );
    let temps: Vec<(i64, f64)> = sub
        .payloads_on("temperature")
        .iter()
        .map(|p| (p["ts"].as_i64().unwrap(), p["value"].as_f64().unwrap()))
        .collect();
    let start = temps[0].0;
    let hot: Vec<i64> = temps
        .iter()
        .filter(|(_, v)| *v > 80.0)
        .map(|(ts, _)| *ts)
        .collect();
    assert!(!hot.is_empty(), "boiler-1 never ran hot");
    let (first_hot, last_hot) = (hot[0], *hot.last().unwrap());
    assert!(first_hot - start < 15_000, "overheat starts late");
    assert!(
        last_hot - first_hot > 30_000,
        "hot for only {} ms",
        last_hot - first_hot
    );
    // Continuously hot in between, so a "for 30 s" rule holds.
    assert!(temps
        .iter()
        .filter(|(ts, _)| *ts >= first_hot && *ts <= last_hot)
        .all(|(_, v)| *v > 80.0));
    let after: Vec<f64> = temps
        .iter()
        .filter(|(ts, _)| *ts > last_hot)
        .map(|(_, v)| *v)
        .collect();
    assert!(after.len() > 3, "no readings after the overheat");
    assert!(after.iter().all(|v| *v < 75.0), "{after:?}");
}

#[tokio::test]
async fn simulate_runs_serial_devices_until_they_finish() {
    let mut probe = edgestream_sim::demo_serial_probe();
    probe.max_samples = Some(20);
    probe.rate_hz = 200.0;
    let opts = SimulateOptions {
        host: "127.0.0.1".into(),
        port: 1,
        mqtt_devices: Vec::new(),
        serial_devices: vec![probe],
        modbus_port: None,
        duration: Some(Duration::from_secs(10)),
        print: false,
    };
    let report = simulate_until(opts, std::future::pending())
        .await
        .expect("simulate");
    assert!(
        report.elapsed < Duration::from_secs(5),
        "did not stop when finished"
    );
    let (name, path, stats) = &report.serial[0];
    assert_eq!(name, "probe-1");
    assert!(path.to_string_lossy().contains("by-id"));
    assert_eq!(stats.sampled, 20);
    assert!(report.to_string().contains("serial probe-1"));
}
