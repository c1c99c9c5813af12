//! TLS to the cloud broker (issue 5): mutual TLS with a test CA and client certificate,
//! refusal of a server certificate that the configured CA did not sign, and ALPN
//! (`cloud.alpn`) checked by a real TLS terminator, since mosquitto 2.0 cannot check it.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
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
    let logs = refusal_logs(&mut agent).await;
    assert_refused(&logs, "certificate", &collector);
    agent.terminate(Duration::from_secs(15));
}

/// What AWS IoT Core expects for MQTT over port 443.
const AWS_ALPN: &str = "x-amzn-mqtt-ca";

/// Per handshake: the negotiated protocol, or the handshake error.
type Handshake = Result<Option<String>, String>;

/// A TLS terminator in front of a plaintext broker, like a cloud load balancer: it accepts
/// only clients that negotiate one of `alpn`, records what each handshake negotiated (or the
/// error), and forwards the plaintext both ways.
struct AlpnTerminator {
    port: u16,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AlpnTerminator {
    async fn start(
        cert: &Path,
        key: &Path,
        alpn: &[&str],
        upstream: std::net::SocketAddr,
    ) -> AlpnTerminator {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&std::fs::read(cert).unwrap())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&std::fs::read(key).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        // With a list set, rustls refuses a client whose offer does not overlap it
        // (`no_application_protocol`), as AWS IoT Core does.
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let log = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), log.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            log.lock().unwrap().push(Err(e.to_string()));
                            return;
                        }
                    };
                    let negotiated = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    log.lock().unwrap().push(Ok(negotiated));
                    let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Ends when either side closes; nothing to report.
                    let _closed = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        AlpnTerminator {
            port,
            handshakes,
            task,
        }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for AlpnTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_negotiated_as_configured_and_a_mismatch_is_refused() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = generate_test_certs(certs_dir.path()).expect("test certificates");
    let local = Mosquitto::start().await.expect("local broker");
    let cloud = Mosquitto::start().await.expect("plaintext cloud broker");
    let terminator = AlpnTerminator::start(
        &certs.server.cert,
        &certs.server.key,
        &[AWS_ALPN],
        cloud.addr(),
    )
    .await;
    let samples: Vec<Sample> = (0..100u64)
        .map(|i| sample("dev-1", "temperature", i as f64, T0 + i))
        .collect();

    // 1. The agent offers exactly what the terminator wants: delivers, and the handshake
    //    negotiated that protocol (not merely "some TLS").
    let start = |gateway: &'static str, alpn: &'static str| {
        let (ca, local_port, cloud_port) = (certs.server.ca.clone(), local.port(), cloud.port());
        async move {
            let collector = CloudCollector::connect("127.0.0.1", cloud_port, "edgestream", gateway)
                .await
                .expect("collector");
            let dir = tempfile::tempdir().unwrap();
            let tls = format!("ca_file = \"{}\"\nalpn = [\"{alpn}\"]", ca.display());
            let cfg = tls_config(
                gateway,
                &dir.path().join("data"),
                local_port,
                terminator.port,
                &tls,
            );
            let mut agent = AgentProcess::start(dir.path(), &cfg);
            agent.wait_subscribed().await;
            (collector, dir, agent)
        }
    };
    let (collector, _dir, mut agent) = start("gw-alpn", AWS_ALPN).await;
    publish_samples(local.port(), &samples).await;
    assert!(
        wait_unique_readings(&collector, samples.len(), Duration::from_secs(30)).await,
        "nothing through the ALPN terminator: {:?}\n{}",
        terminator.handshakes(),
        agent.logs()
    );
    assert_all_delivered_in_order(&samples, &cloud_readings(&collector.telemetry_readings()));
    agent.terminate(Duration::from_secs(15));
    let seen = terminator.handshakes();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|h| h == &Ok(Some(AWS_ALPN.to_string()))),
        "handshakes: {seen:?}"
    );

    // 2. Another protocol offered: every handshake is refused, nothing is delivered, and the
    //    log says why.
    let before = seen.len();
    let (collector, _dir2, mut agent) = start("gw-h2", "h2").await;
    publish_samples(local.port(), &samples[..10]).await;
    let logs = refusal_logs(&mut agent).await;
    let refused = terminator.handshakes()[before..].to_vec();
    assert!(
        !refused.is_empty() && refused.iter().all(|h| h.is_err()),
        "handshakes with a wrong ALPN: {refused:?}"
    );
    assert_refused(&logs, "NoApplicationProtocol", &collector);
    agent.terminate(Duration::from_secs(15));
}

/// The agent's log after several refused connection attempts (backoff 100 ms .. 1 s): the
/// first failure is logged at once with its reason, later ones at a bounded rate.
async fn refusal_logs(agent: &mut AgentProcess) -> String {
    agent
        .wait_log("cloud broker unreachable", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.logs()
}

/// The agent never connected, its log says `why`, and nothing reached the cloud.
fn assert_refused(logs: &str, why: &str, collector: &CloudCollector) {
    assert!(
        !logs.contains("connected to cloud broker"),
        "connected although the TLS handshake should fail\n{logs}"
    );
    assert!(
        logs.to_lowercase().contains(&why.to_lowercase()),
        "the refusal does not say {why:?}\n{logs}"
    );
    assert!(
        collector.messages().is_empty(),
        "something reached the cloud: {:?}",
        collector.messages()
    );
}
