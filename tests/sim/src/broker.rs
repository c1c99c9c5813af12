//! Real MQTT brokers for tests, the demo and benchmarks.
//!
//! Two brokers, one contract: each listens on `127.0.0.1` on a port chosen by
//! the operating system, and [`Mosquitto::start`] / [`InProcessBroker::start`]
//! return only once that port accepts TCP connections, so a caller can
//! connect immediately.
//!
//! * [`Mosquitto`] spawns the real `mosquitto` binary with a generated config
//!   in its own temporary directory. Persistence is on, so persistent sessions
//!   and retained messages survive [`Mosquitto::restart`], which comes back on
//!   the same port: that is what outage tests need. [`Mosquitto::kill`] is the
//!   crash variant (SIGKILL, nothing saved since the last autosave).
//!   The child is killed when the value is dropped, so a failing test never
//!   leaves a broker behind.
//! * [`InProcessBroker`] runs rumqttd on background threads inside the
//!   current process, for `edgestream demo` and benchmarks on machines where
//!   nothing is installed. rumqttd has no shutdown: its threads live until the
//!   process exits. It keeps no state on disk, so it cannot stand in for
//!   mosquitto in restart tests.
//!
//! Limits are generous on purpose (large payloads, unbounded per-client
//! queues): a test broker must never be the component that drops data, or a
//! loss test would blame the agent for the broker's policy.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections after being spawned.
pub const BROKER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Mosquitto::stop`] waits for a clean exit before it kills.
pub const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest MQTT payload the in-process broker accepts. Rule bundles and
/// telemetry batches must fit; 1 MiB leaves a wide margin over the 256 KiB
/// the agent is designed for.
pub const INPROCESS_MAX_PAYLOAD: usize = 1024 * 1024;
/// rumqttd's `max_inflight_count`, which despite its name is how many packets it reads
/// from one connection per batch. The unacknowledged QoS 1 publishes it sends a connection
/// are capped by a constant of rumqttd 0.20 (100, `MAX_INFLIGHT` in its router), which no
/// setting changes: a subscriber that acknowledges late (the agent, after its flush) waits
/// for its acknowledgements to reach rumqttd before it gets more.
pub const INPROCESS_MAX_INFLIGHT: usize = 1000;
/// Connections the in-process broker accepts (its router preallocates slots).
pub const INPROCESS_MAX_CONNECTIONS: usize = 1000;
/// Attempts to find a free port that the spawned broker can actually bind
/// (another process may take the port between our probe and its bind).
const PORT_ATTEMPTS: usize = 5;

/// Why a broker could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The mosquitto binary was not found; install it
    /// (`apt-get install -y mosquitto`) or set `MOSQUITTO_BIN`.
    #[error("mosquitto binary not found (looked at $MOSQUITTO_BIN, /usr/sbin/mosquitto, $PATH); install it with `apt-get install -y mosquitto`")]
    MosquittoMissing,
    /// Filesystem or process error while preparing or spawning the broker.
    #[error("broker I/O error while {action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The broker process exited or never accepted connections; `log` holds
    /// the tail of its log to show why.
    #[error("broker did not come up on port {port}: {reason}\n--- broker log ---\n{log}")]
    NotReady {
        /// The port it was asked to listen on.
        port: u16,
        /// What went wrong.
        reason: String,
        /// Tail of the broker's own log.
        log: String,
    },
    /// The broker is not running (stopped or killed) when an operation
    /// needed it to be.
    #[error("broker is not running")]
    NotRunning,
}

fn io_err(action: &'static str) -> impl FnOnce(std::io::Error) -> BrokerError {
    move |source| BrokerError::Io { action, source }
}

/// Asks the OS for a free port on 127.0.0.1. The listener is closed again, so
/// the port is only very likely free: callers retry when the bind races.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `127.0.0.1:port` accepts a TCP connection or `timeout` passes.
pub async fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Files for an optional TLS listener on a mosquitto broker (PEM paths).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate that signed client certificates (and the server's).
    pub ca: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// Whether clients must present a certificate signed by `ca`.
    pub require_client_cert: bool,
}

/// Certificates made by [`generate_test_certs`].
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// For the broker (`require_client_cert` false; set it for mutual TLS).
    pub server: TlsFiles,
    /// A client certificate signed by the same CA (for mutual TLS).
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
}

/// Makes a throwaway CA, a server certificate for `127.0.0.1`/`localhost`
/// and a client certificate in `dir`, with the `openssl` command-line tool
/// (RSA 2048, valid two days). Test use only: the keys are unencrypted.
pub fn generate_test_certs(dir: &Path) -> Result<TestCerts, BrokerError> {
    let run = |args: &[&str]| -> Result<(), BrokerError> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running openssl (is it installed?)"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BrokerError::Io {
                action: "generating test certificates",
                source: std::io::Error::other(format!(
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )),
            })
        }
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .map_err(io_err("writing san.ext"))?;
    // Any extension makes `openssl x509 -req` issue an X.509 v3 certificate; without one it
    // issues v1, which rustls/webpki refuses ("UnsupportedCertVersion").
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .map_err(io_err("writing client.ext"))?;
    let days = "2";
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        days,
        "-subj",
        "/CN=edgestream-test-ca",
    ])?;
    for (name, cn, ext) in [
        ("server", "localhost", "san.ext"),
        ("client", "edgestream-test-client", "client.ext"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        run(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj,
        ])?;
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            days,
        ];
        args.extend(["-extfile", ext]);
        run(&args)?;
    }
    Ok(TestCerts {
        server: TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            require_client_cert: false,
        },
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}

/// How to configure a [`Mosquitto`] broker. `Default` is a plaintext broker.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// Adds a TLS listener on a second free port, see [`Mosquitto::tls_port`].
    pub tls: Option<TlsFiles>,
    /// Raw lines appended to the generated `mosquitto.conf`, for options a
    /// test needs that this module does not model.
    pub extra_config: Vec<String>,
}

/// A real mosquitto process listening on 127.0.0.1. See the module docs.
#[derive(Debug)]
pub struct Mosquitto {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    tls_port: Option<u16>,
    child: Option<Child>,
}

impl Mosquitto {
    /// Where the mosquitto binary is: `$MOSQUITTO_BIN`, `/usr/sbin/mosquitto`,
    /// or the first `mosquitto` on `$PATH`.
    pub fn find_binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Some(p);
            }
        }
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        if sbin.is_file() {
            return Some(sbin);
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("mosquitto"))
                .find(|p| p.is_file())
        })
    }

    /// Starts a plaintext broker with persistence on a free port.
    pub async fn start() -> Result<Self, BrokerError> {
        Self::start_with(MosquittoOptions::default()).await
    }

    /// Starts a broker configured by `opts`.
    pub async fn start_with(opts: MosquittoOptions) -> Result<Self, BrokerError> {
        let binary = Self::find_binary().ok_or(BrokerError::MosquittoMissing)?;
        let dir = tempfile::Builder::new()
            .prefix("edgestream-mosquitto-")
            .tempdir()
            .map_err(io_err("creating the broker directory"))?;
        let mut broker = Mosquitto {
            binary,
            dir,
            port: 0,
            tls_port: None,
            child: None,
        };
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            broker.port = free_port().map_err(io_err("finding a free port"))?;
            broker.tls_port = match opts.tls {
                Some(_) => Some(free_port().map_err(io_err("finding a free port"))?),
                None => None,
            };
            write_config(broker.dir.path(), broker.port, broker.tls_port, &opts)?;
            match broker.spawn_and_wait().await {
                Ok(()) => return Ok(broker),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(BrokerError::NotRunning))
    }

    async fn spawn_and_wait(&mut self) -> Result<(), BrokerError> {
        let conf = self.dir.path().join("mosquitto.conf");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("stderr.log"))
                    .map_err(io_err("opening the broker stderr log"))?,
            ))
            .spawn()
            .map_err(io_err("spawning mosquitto"))?;
        self.child = Some(child);
        let deadline = Instant::now() + BROKER_START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.not_ready(format!("mosquitto exited with {status}")));
                }
            }
            let tls_ready = match self.tls_port {
                Some(p) => wait_for_port(p, Duration::ZERO).await,
                None => true,
            };
            if tls_ready && wait_for_port(self.port, Duration::ZERO).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_child();
                return Err(self.not_ready("timed out waiting for the port".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn not_ready(&self, reason: String) -> BrokerError {
        BrokerError::NotReady {
            port: self.port,
            reason,
            log: self.log_tail(),
        }
    }

    /// The plaintext port on 127.0.0.1 (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker process's id while it runs (for reading its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:port()`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TLS port, when started with [`MosquittoOptions::tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The broker's temporary directory (config, persistence, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last ~8 KiB of the broker's log and stderr, for failure messages.
    pub fn log_tail(&self) -> String {
        const TAIL: usize = 8 * 1024;
        let mut out = String::new();
        for name in ["mosquitto.log", "stderr.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join(name)) {
                let start = text.len().saturating_sub(TAIL);
                let start = (start..text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                out.push_str(&text[start..]);
            }
        }
        out
    }

    /// Stops the broker cleanly (SIGTERM), so it writes its persistence file;
    /// kills it if it has not exited within [`BROKER_STOP_TIMEOUT`].
    pub async fn stop(&mut self) -> Result<(), BrokerError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // std can only SIGKILL; `kill -TERM` avoids unsafe libc calls.
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        if !matches!(term, Ok(s) if s.success()) {
            tracing::warn!(pid = child.id(), "SIGTERM failed, killing mosquitto");
        }
        let deadline = Instant::now() + BROKER_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    kill_and_reap(&mut child);
                    return Ok(());
                }
            }
        }
    }

    /// Crashes the broker (SIGKILL): whatever it had not autosaved (it
    /// autosaves every second) is lost, like a power cut.
    pub fn kill(&mut self) {
        self.kill_child();
    }

    /// Starts the broker again on the same port with the same persistence
    /// directory (stopping it first if it is running).
    pub async fn restart(&mut self) -> Result<(), BrokerError> {
        self.stop().await?;
        let mut last = None;
        // The port was ours a moment ago, but a TIME_WAIT or another test may
        // briefly hold it: retry for a while rather than changing port.
        for _ in 0..PORT_ATTEMPTS * 4 {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(last.unwrap_or(BrokerError::NotRunning))
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Err(e) = child.kill() {
        tracing::debug!(error = %e, "mosquitto already exited");
    }
    if let Err(e) = child.wait() {
        tracing::warn!(error = %e, "could not reap mosquitto");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill_child();
    }
}

fn write_config(
    dir: &Path,
    port: u16,
    tls_port: Option<u16>,
    opts: &MosquittoOptions,
) -> Result<(), BrokerError> {
    let d = dir.display();
    let mut conf = format!(
        "# generated by edgestream-sim\n\
         # stay root when run as root: the temp dir is not readable by the\n\
         # `mosquitto` user mosquitto would otherwise switch to\n\
         user root\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {d}/\n\
         persistence_file mosquitto.db\n\
         autosave_interval 1\n\
         log_dest file {d}/mosquitto.log\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         connection_messages true\n\
         log_timestamp_format %H:%M:%S\n\
         # unbounded queues: a test broker must never be what drops data\n\
         max_inflight_messages 0\n\
         max_queued_messages 0\n\
         max_queued_bytes 0\n\
         persistent_client_expiration 1d\n\
         listener {port} 127.0.0.1\n"
    );
    if let (Some(tls), Some(tls_port)) = (&opts.tls, tls_port) {
        conf.push_str(&format!(
            "listener {tls_port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate {}\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
            tls.require_client_cert
        ));
    }
    for line in &opts.extra_config {
        conf.push_str(line);
        conf.push('\n');
    }
    std::fs::write(dir.join("mosquitto.conf"), conf).map_err(io_err("writing mosquitto.conf"))
}

/// An rumqttd broker running on background threads of this process.
/// See the module docs.
#[derive(Debug)]
pub struct InProcessBroker {
    port: u16,
}

impl InProcessBroker {
    /// Starts rumqttd on a free port on 127.0.0.1 and waits until it accepts.
    pub async fn start() -> Result<Self, BrokerError> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(io_err("finding a free port"))?;
            let mut broker = rumqttd::Broker::new(inprocess_config(port));
            // `start` blocks for the broker's lifetime (it joins the server
            // threads), so it gets a thread of its own.
            let spawned = std::thread::Builder::new()
                .name(format!("rumqttd-{port}"))
                .spawn(move || {
                    if let Err(e) = broker.start() {
                        tracing::error!(error = %e, port, "in-process broker stopped");
                    }
                });
            if let Err(e) = spawned {
                return Err(BrokerError::Io {
                    action: "spawning the in-process broker thread",
                    source: e,
                });
            }
            if wait_for_port(port, BROKER_START_TIMEOUT).await {
                return Ok(InProcessBroker { port });
            }
            last = Some(BrokerError::NotReady {
                port,
                reason: "rumqttd did not accept connections (port taken?)".into(),
                log: String::new(),
            });
        }
        Err(last.unwrap_or(BrokerError::NotRunning))
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port()`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

fn inprocess_config(port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: INPROCESS_MAX_PAYLOAD,
        max_inflight_count: INPROCESS_MAX_INFLIGHT,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let mut v4 = HashMap::new();
    v4.insert("1".to_string(), server);
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: INPROCESS_MAX_CONNECTIONS,
            // Packets the router hands a connection per batch; larger than
            // the inflight window so a fast subscriber is never starved.
            max_outgoing_packet_count: 2000,
            // In-memory commit log per topic: 8 x 16 MiB is far more than a
            // test or the demo produces, and memory is taken only as used.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    }
}
