//! The Prometheus endpoint: every counter of [`Metrics`] plus the process figures, in the text
//! exposition format (version 0.0.4), on `http://127.0.0.1:{port}/metrics`.
//!
//! Guarantees:
//! - **Localhost only.** The listener binds 127.0.0.1; exposing it further is a job for a
//!   reverse proxy that adds authentication.
//! - **Concurrent and bounded.** Each connection is served by a task of its own, so a slow or
//!   idle client delays nobody else. At most [`MAX_CONNECTIONS`] are open at once: a new
//!   connection beyond that closes the oldest open one (a scrape is answered within
//!   milliseconds of its request, so the oldest is one that sent nothing). A request head may
//!   be at most [`MAX_REQUEST_BYTES`] and must arrive within [`HEADER_TIMEOUT`]; the answer
//!   must be taken within [`WRITE_TIMEOUT`]. The endpoint never holds more than
//!   [`MAX_CONNECTIONS`] small buffers, and cannot stall the pipeline (it only reads atomics
//!   and `/proc`).
//! - **Off by default** (`[metrics] prometheus = true` turns it on). With `port = 0` the
//!   operating system picks a free port, which is logged (`metrics endpoint listening`).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::outbox::store::Outbox;
use crate::telemetry::health::ProcessStats;
use crate::telemetry::metrics::{Kind, Metrics, Snapshot};

/// Longest request head read; anything longer is answered 431 and closed.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request head after connecting.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once; a new one beyond this closes the oldest.
pub const MAX_CONNECTIONS: usize = 32;

/// One family: name, kind, help, and its samples as (labels, value).
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(&'static str, f64)>,
}

/// The families of every counter (from [`Snapshot::samples`], grouped by family in order of
/// first appearance) and of the process figures.
fn families(m: &Snapshot, p: &ProcessStats, outbox_disk_bytes: Option<u64>) -> Vec<Family> {
    let mut v: Vec<Family> = Vec::with_capacity(48);
    for s in m.samples() {
        match v.iter_mut().find(|f| f.name == s.family) {
            Some(f) => f.samples.push((s.labels, s.value as f64)),
            None => v.push(Family {
                name: s.family,
                kind: s.kind,
                help: s.help,
                samples: vec![(s.labels, s.value as f64)],
            }),
        }
    }
    let mut one = |name, kind, help, value: f64| {
        v.push(Family {
            name,
            kind,
            help,
            samples: vec![("", value)],
        })
    };
    one(
        "process_resident_memory_bytes",
        Kind::Gauge,
        "Resident memory size in bytes.",
        p.rss_bytes as f64,
    );
    one(
        "edgestream_process_peak_resident_memory_bytes",
        Kind::Gauge,
        "Highest resident memory size since start, in bytes.",
        p.peak_rss_bytes as f64,
    );
    one(
        "edgestream_process_disk_write_bytes_total",
        Kind::Counter,
        "Bytes this process caused to be written to storage.",
        p.disk_write_bytes as f64,
    );
    one(
        "process_cpu_seconds_total",
        Kind::Counter,
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    if let Some(disk) = outbox_disk_bytes {
        one(
            "edgestream_outbox_disk_bytes",
            Kind::Gauge,
            "Size of the outbox directory on disk.",
            disk as f64,
        );
    }
    v
}

/// Renders the exposition text.
pub fn render(m: &Snapshot, p: &ProcessStats, outbox_disk_bytes: Option<u64>) -> String {
    let mut out = String::with_capacity(4096);
    for fam in families(m, p, outbox_disk_bytes) {
        let kind = match fam.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {} {}", fam.name, fam.help);
        let _ = writeln!(out, "# TYPE {} {kind}", fam.name);
        for (labels, value) in fam.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {value}", fam.name);
            } else {
                let _ = writeln!(out, "{}{{{labels}}} {value}", fam.name);
            }
        }
    }
    out
}

/// A bound, not yet serving endpoint.
#[derive(Debug)]
pub struct PrometheusEndpoint {
    listener: TcpListener,
    metrics: Arc<Metrics>,
    outbox: Option<Outbox>,
}

impl PrometheusEndpoint {
    /// Binds `127.0.0.1:port` (0 = any free port).
    pub async fn bind(
        port: u16,
        metrics: Arc<Metrics>,
        outbox: Option<Outbox>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        Ok(Self {
            listener,
            metrics,
            outbox,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = Arc::new(Scrape {
            metrics: self.metrics,
            outbox: self.outbox,
        });
        let mut open = tokio::task::JoinSet::new();
        // Open connections in accept order, for closing the oldest when full.
        let mut order: std::collections::VecDeque<tokio::task::AbortHandle> =
            std::collections::VecDeque::with_capacity(MAX_CONNECTIONS + 1);
        loop {
            // Cancellation safety: `accept` and `join_next` lose nothing when dropped.
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = open.join_next() => continue,
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            order.retain(|h| !h.is_finished());
            if order.len() >= MAX_CONNECTIONS {
                if let Some(oldest) = order.pop_front() {
                    tracing::debug!("metrics endpoint full; closing its oldest connection");
                    oldest.abort();
                }
            }
            order.push_back(open.spawn(Arc::clone(&shared).serve(stream)));
        }
        open.shutdown().await;
    }
}

/// What a scrape reads.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    outbox: Option<Outbox>,
}

impl Scrape {
    async fn serve(self: Arc<Self>, mut stream: TcpStream) {
        let mut buf = vec![0u8; MAX_REQUEST_BYTES];
        let head = tokio::time::timeout(HEADER_TIMEOUT, read_head(&mut stream, &mut buf)).await;
        let Ok(Some((len, head_complete))) = head else {
            return;
        };
        let request_line = std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(|s| s.lines().next())
            .unwrap_or("");
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, body) = if !head_complete {
            ("431 Request Header Fields Too Large", String::new())
        } else if method != "GET" {
            ("405 Method Not Allowed", String::new())
        } else if path == "/metrics" || path.starts_with("/metrics?") {
            let snapshot = self.metrics.snapshot();
            let process = ProcessStats::read();
            let disk = self.outbox.as_ref().map(Outbox::size_on_disk);
            ("200 OK", render(&snapshot, &process, disk))
        } else {
            ("404 Not Found", "try /metrics\n".to_string())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let write = async {
            if stream.write_all(head.as_bytes()).await.is_ok() {
                let _ = stream.write_all(body.as_bytes()).await;
            }
            let _ = stream.shutdown().await;
        };
        if tokio::time::timeout(WRITE_TIMEOUT, write).await.is_err() {
            tracing::debug!("metrics scrape not taken in time; closed");
        }
    }
}

/// Reads a request head into `buf`: its length and whether it ended (a blank line) within
/// `buf`; `None` if the client closed or failed first.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> Option<(usize, bool)> {
    let mut len = 0;
    loop {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            return Some((len, true));
        }
        if len == buf.len() {
            return Some((len, false));
        }
    }
}

/// Starts the endpoint if `[metrics] prometheus = true`; it stops when `shutdown` is cancelled.
pub async fn start(
    config: &crate::telemetry::config::MetricsConfig,
    metrics: Arc<Metrics>,
    outbox: Option<Outbox>,
    shutdown: CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    if !config.prometheus {
        return Ok(None);
    }
    let endpoint = PrometheusEndpoint::bind(config.port, metrics, outbox).await?;
    let addr = endpoint.local_addr()?;
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(Some(tokio::spawn(endpoint.run(shutdown))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgestream_sim::prometheus::{parse, scrape};

    #[test]
    fn renders_every_family_with_type_and_labels() {
        let m = Snapshot {
            readings_in_mqtt: 12,
            alerts_raised: 2,
            outbox_depth: 5,
            outbox_dropped_full: 3,
            outbox_dropped_age: 4,
            ..Snapshot::default()
        };
        let text = render(&m, &ProcessStats::default(), Some(4096));
        assert!(text.contains("# TYPE edgestream_readings_in_total counter"));
        assert!(text.contains("# TYPE edgestream_outbox_records gauge"));
        let v = parse(&text);
        assert_eq!(v[r#"edgestream_readings_in_total{source="mqtt"}"#], 12.0);
        assert_eq!(v[r#"edgestream_alerts_total{transition="raised"}"#], 2.0);
        assert_eq!(v["edgestream_outbox_records"], 5.0);
        assert_eq!(v["edgestream_outbox_disk_bytes"], 4096.0);
        let dropped = |r: &str| v[&format!("edgestream_records_dropped_total{{reason=\"{r}\"}}")];
        assert_eq!((dropped("outbox_full"), dropped("outbox_age")), (3.0, 4.0));
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let metrics = Arc::new(Metrics::default());
        Metrics::add(&metrics.readings_in_mqtt, 3);
        let ep = PrometheusEndpoint::bind(0, metrics, None).await.unwrap();
        let port = ep.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ep.run(shutdown.clone()));
        let body = scrape(port).await.unwrap();
        assert_eq!(
            parse(&body)[r#"edgestream_readings_in_total{source="mqtt"}"#],
            3.0
        );
        assert!(parse(&body)["process_resident_memory_bytes"] > 0.0);
        // Wrong path, and a request head that never ends within the limit.
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        let _ = s.write_all(&[b'a'; MAX_REQUEST_BYTES + 10]).await;
        let mut r = String::new();
        let _ = s.read_to_string(&mut r).await;
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        shutdown.cancel();
        task.await.unwrap();
    }
}
