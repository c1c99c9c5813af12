//! TLS to the cloud broker (issue 5): mutual TLS with a test CA and client certificate, and
//! refusal of a server certificate that the configured CA did not sign.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use edgestream_sim::broker::generate_test_certs;
use edgestream_sim::{CloudCollector, Mosquitto, MosquittoOptions};

const T0: u64 = 1_700_000_000_000;

fn tls_config(gw: &str, data: &Path, local: u16, cloud: u16, tls: &str) -> String {
    format!(
        r#"
[gateway]
id = "{gw}"
data_dir = "{data}"
shutdown_timeout_ms = 5000

[local]
host = "127.0.0.1"
port = {local}
topics = ["sensors/+/+"]

[cloud]
host = "127.0.0.1"
port = {cloud}
{tls}
batch_size = 50
linger_ms = 50
backoff_min_ms = 100
backoff_max_ms = 1000

[health]
interval_secs = 1
"#,
        data = data.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_and_a_server_cert_from_another_ca_is_refused() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = generate_test_certs(certs_dir.path()).expect("test certificates");
    let other_dir = tempfile::tempdir().unwrap();
    let other = generate_test_certs(other_dir.path()).expect("second CA");
    let client_cert = certs.client_cert.clone();
    let mut server = certs.server.clone();
    server.require_client_cert = true;
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start_with(MosquittoOptions {
        tls: Some(server),
        ..Default::default()
    })
    .await
    .expect("TLS cloud broker");
    let tls_port = cloud.tls_port().expect("tls port");

    // 1. Right CA, client certificate: connects and delivers.
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-tls")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    // TLS is the default: the config does not even say `tls = true`.
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        certs.server.ca.display(),
        client_cert.display(),
        certs.client_key.display()
    );
    let cfg = tls_config(
        "gw-tls",
        &dir.path().join("data"),
        local.port(),
        tls_port,
        &tls,
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    let samples: Vec<Sample> = (0..100u64)
        .map(|i| sample("dev-1", "temperature", i as f64, T0 + i))
        .collect();
    publish_samples(local.port(), &samples).await;
    assert!(
        wait_unique_readings(&collector, samples.len(), Duration::from_secs(30)).await,
        "nothing over TLS\n{}",
        agent.logs()
    );
    assert_all_delivered_in_order(&samples, &cloud_readings(&collector.telemetry_readings()));
    agent.terminate(Duration::from_secs(15));

    // 2. A CA that did not sign the server's certificate: never connects, keeps the data.
    let collector = CloudCollector::connect("127.0.0.1", cloud.port(), "edgestream", "gw-mitm")
        .await
        .expect("collector");
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        other.server.ca.display(),
        client_cert.display(),
        certs.client_key.display()
    );
    let cfg = tls_config(
        "gw-mitm",
        &dir.path().join("data"),
        local.port(),
        tls_port,
        &tls,
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg);
    agent.wait_subscribed().await;
    publish_samples(local.port(), &samples[..10]).await;
    // Several connection attempts (backoff 100 ms .. 1 s).
    agent
        .wait_log("cloud broker still unreachable", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = agent.logs();
    assert!(
        !logs.contains("connected to cloud broker"),
        "connected to a server the CA did not sign\n{logs}"
    );
    assert!(
        logs.to_lowercase().contains("certificate"),
        "the refusal does not say why\n{logs}"
    );
    assert!(
        collector.messages().is_empty(),
        "something reached the cloud: {:?}",
        collector.messages()
    );
    agent.terminate(Duration::from_secs(15));
}
