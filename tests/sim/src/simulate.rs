//! Running a simulated site: the engine behind `edgestream simulate` and
//! `edgestream demo`.
//!
//! [`simulate`] starts MQTT devices against any broker and serial devices on
//! pseudo-terminals (printing the paths an agent should open), runs until a
//! duration passes, every device has taken its `max_samples`, or Ctrl-C, and
//! returns what happened as a [`SimReport`].
//!
//! [`demo_fleet`] is the preset the demo uses: three boilers (temperature,
//! pressure), two pumps (vibration) and a greenhouse (humidity), sampling at
//! [`DEMO_RATE_HZ`] with clocks running [`DEMO_TIME_SCALE`] times faster than
//! wall time. Boiler `boiler-1` overheats on cue: its temperature is above
//! 80 °C from signal time ~12 s to 50 s (so a "above 80 for 30 s" rule fires
//! about 4.2 s of wall time into the run) and then returns to about 65 °C,
//! below 75, so the alert clears by ~5 s. `boiler-3` overheats again from
//! 600 s to 660 s (one wall minute in) for demos that run longer.
//! `boiler-2`'s pressure sensor is silent from 30 s to 70 s of signal time.
//! `pump-2`'s vibration spikes (+12 mm/s for one sample) at 70 s of signal
//! time and every 120 s after, each after a full 64-sample window of normal
//! data. `greenhouse-1`'s humidity drifts up slowly from 120 s.
//!
//! Signal time starts at the wall clock when a device starts and runs
//! [`DEMO_TIME_SCALE`] times faster, so reading timestamps run ahead of
//! the wall clock (by 90 s after 10 s of demo).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::devices::mqtt::{DeviceStats, MetricSpec, MqttDeviceConfig, MqttFleet};
use crate::devices::serial::{LineFormat, SerialDevice, SerialDeviceConfig, SerialStats};
use crate::signal::{Fault, FaultKind, Signal};

/// Samples per second per metric in the demo.
pub const DEMO_RATE_HZ: f64 = 10.0;
/// How much faster than wall time the demo devices' clocks run.
pub const DEMO_TIME_SCALE: f64 = 10.0;
/// The device whose temperature overheats early in the demo.
pub const DEMO_OVERHEATING_DEVICE: &str = "boiler-1";
/// Vibration spikes injected into `pump-2` (one per 2 minutes of signal time).
const DEMO_SPIKES: u32 = 30;
/// How often [`simulate`] prints progress when `print` is on.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What to simulate, and where.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Broker host for the MQTT devices.
    pub host: String,
    /// Broker port for the MQTT devices.
    pub port: u16,
    /// MQTT devices (may be empty).
    pub mqtt_devices: Vec<MqttDeviceConfig>,
    /// Serial devices on ptys (may be empty).
    pub serial_devices: Vec<SerialDeviceConfig>,
    /// Also serve a simulated Modbus TCP energy meter on 127.0.0.1 at this port (0: any free
    /// port; printed).
    pub modbus_port: Option<u16>,
    /// Stop after this long; `None` = until Ctrl-C or every device finished.
    pub duration: Option<Duration>,
    /// Print serial paths and periodic progress to stdout.
    pub print: bool,
}

impl SimulateOptions {
    /// MQTT devices only, printing on, no time limit.
    pub fn mqtt(host: impl Into<String>, port: u16, devices: Vec<MqttDeviceConfig>) -> Self {
        SimulateOptions {
            host: host.into(),
            port,
            mqtt_devices: devices,
            serial_devices: Vec::new(),
            modbus_port: None,
            duration: None,
            print: true,
        }
    }
}

/// The outcome of one [`simulate`] run.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Wall time the run took.
    pub elapsed: Duration,
    /// Per MQTT device: name and counters.
    pub mqtt: Vec<(String, DeviceStats)>,
    /// Per serial device: name, the path it was reachable at, counters.
    pub serial: Vec<(String, PathBuf, SerialStats)>,
}

impl SimReport {
    /// MQTT counters summed over all devices.
    pub fn mqtt_total(&self) -> DeviceStats {
        let mut t = DeviceStats::default();
        for (_, s) in &self.mqtt {
            t += *s;
        }
        t
    }
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.mqtt_total();
        writeln!(
            f,
            "simulated {:.1}s: {} MQTT devices, {} readings acknowledged by the broker \
             ({} lost in flight, {} skipped offline, {} dropouts), {} commands",
            self.elapsed.as_secs_f64(),
            self.mqtt.len(),
            t.acked,
            t.unacked_lost,
            t.skipped_offline,
            t.dropouts,
            t.commands
        )?;
        for (name, path, s) in &self.serial {
            writeln!(
                f,
                "serial {name} at {}: {} lines written, {} dropped, {} commands",
                path.display(),
                s.lines_written,
                s.lines_dropped,
                s.commands
            )?;
        }
        Ok(())
    }
}

/// Runs `opts` until its duration, every device finished, or Ctrl-C.
pub async fn simulate(opts: SimulateOptions) -> anyhow::Result<SimReport> {
    simulate_until(opts, async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C; running until the duration");
            std::future::pending::<()>().await;
        }
    })
    .await
}

/// Like [`simulate`], but stops when `shutdown` resolves instead of Ctrl-C.
pub async fn simulate_until(
    opts: SimulateOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<SimReport> {
    let started = Instant::now();
    let mut serial = Vec::with_capacity(opts.serial_devices.len());
    for cfg in opts.serial_devices.clone() {
        let name = cfg.name.clone();
        let dev =
            SerialDevice::spawn(cfg).map_err(|e| anyhow::anyhow!("serial device {name}: {e}"))?;
        if opts.print {
            println!(
                "serial device {name}: {} -> {}",
                dev.path().display(),
                dev.pty_path().display()
            );
        }
        serial.push(dev);
    }
    let meter = match opts.modbus_port {
        Some(port) => Some(
            crate::devices::modbus::energy_meter(port)
                .await
                .map_err(|e| anyhow::anyhow!("modbus meter on port {port}: {e}"))?,
        ),
        None => None,
    };
    if let (Some(m), true) = (&meter, opts.print) {
        println!(
            "modbus energy meter: 127.0.0.1:{} unit 1, input registers 0-1 voltage and 2-3 power (f32, word_order = \"little\")",
            m.port()
        );
    }
    let mut fleet = MqttFleet::spawn(&opts.host, opts.port, opts.mqtt_devices.clone());
    if opts.print && !opts.mqtt_devices.is_empty() {
        println!(
            "{} MQTT devices publishing to {}:{} on sensors/{{device}}/{{metric}}",
            opts.mqtt_devices.len(),
            opts.host,
            opts.port
        );
    }
    let deadline = opts.duration.map(|d| started + d);
    // A Modbus meter answers until stopped: with one, only the deadline or Ctrl-C ends the run.
    let all_finite = meter.is_none()
        && opts.mqtt_devices.iter().all(|d| d.max_samples.is_some())
        && opts.serial_devices.iter().all(|d| d.max_samples.is_some());
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    tokio::pin!(shutdown);
    loop {
        let finished = all_finite
            && fleet.devices().iter().all(|d| d.is_finished())
            && serial.iter().all(|d| d.is_finished());
        if finished || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = progress.tick(), if opts.print => {
                let t = fleet.stats();
                println!(
                    "{:>6.1}s  acked {}  lost in flight {}  skipped offline {}  commands {}",
                    started.elapsed().as_secs_f64(),
                    t.acked,
                    t.unacked_lost,
                    t.skipped_offline,
                    t.commands
                );
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    fleet.stop().await;
    drop(meter);
    let report = SimReport {
        elapsed: started.elapsed(),
        mqtt: fleet
            .devices()
            .iter()
            .map(|d| (d.name().to_string(), d.stats()))
            .collect(),
        serial: serial
            .iter_mut()
            .map(|d| {
                d.stop();
                (d.name().to_string(), d.path().to_path_buf(), d.stats())
            })
            .collect(),
    };
    if opts.print {
        print!("{report}");
    }
    Ok(report)
}

fn demo_device(name: &str, metrics: Vec<MetricSpec>) -> MqttDeviceConfig {
    let mut c = MqttDeviceConfig::new(name, metrics, DEMO_RATE_HZ);
    c.ts_step = Duration::from_secs_f64(DEMO_TIME_SCALE / DEMO_RATE_HZ);
    c
}

/// `count` devices named `{prefix}-1`..`{prefix}-{count}`, each with
/// `metrics` (signals from [`Signal::for_metric`], seeded from `seed`, the
/// device and metric index) at `rate_hz`, or flat out when `rate_hz` is
/// `None`: what `edgestream simulate` and benchmarks start from.
pub fn uniform_fleet(
    prefix: &str,
    count: usize,
    metrics: &[&str],
    rate_hz: Option<f64>,
    seed: u64,
) -> Vec<MqttDeviceConfig> {
    (0..count)
        .map(|d| {
            let specs = metrics
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let s = seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add((d as u64) << 16)
                        .wrapping_add(i as u64);
                    MetricSpec::new(*m, Signal::for_metric(m, s))
                })
                .collect();
            let mut c = MqttDeviceConfig::new(
                format!("{prefix}-{}", d + 1),
                specs,
                rate_hz.unwrap_or(10.0),
            );
            if rate_hz.is_none() {
                c.rate = crate::devices::mqtt::Rate::FlatOut;
                c.ts_step = Duration::from_millis(1);
            }
            c
        })
        .collect()
}

/// The demo's devices (see the module docs). Deterministic: fixed seeds.
pub fn demo_fleet() -> Vec<MqttDeviceConfig> {
    let overheat = |start_s: f64, duration_s: f64| Fault {
        start_s,
        duration_s,
        kind: FaultKind::Excursion {
            target: 88.0,
            ramp_s: 2.0,
        },
    };
    // Spikes only after 64 samples: outlier detectors (MAD over 64) need a
    // full window before they judge. First at 70 s (7 s of wall time), then
    // every 2 minutes of signal time for an hour.
    let mut pump_2 = Signal::vibration(2.2, 501);
    for k in 0..DEMO_SPIKES {
        pump_2.add_fault(Fault {
            start_s: 70.0 + 120.0 * f64::from(k),
            duration_s: 1.0,
            kind: FaultKind::Spike { magnitude: 12.0 },
        });
    }
    vec![
        demo_device(
            "boiler-1",
            vec![
                MetricSpec::new(
                    "temperature",
                    Signal::temperature(65.0, 101).with_fault(overheat(10.0, 40.0)),
                ),
                MetricSpec::new("pressure", Signal::pressure(2.5, 102)),
            ],
        ),
        demo_device(
            "boiler-2",
            vec![
                MetricSpec::new("temperature", Signal::temperature(63.0, 201)),
                MetricSpec::new(
                    "pressure",
                    // Silent for 40 s of signal time (4 s of wall time), so a
                    // 3 s `missing` rule fires whichever clock it counts.
                    Signal::pressure(2.4, 202).with_fault(Fault {
                        start_s: 30.0,
                        duration_s: 40.0,
                        kind: FaultKind::Dropout,
                    }),
                ),
            ],
        ),
        demo_device(
            "boiler-3",
            vec![
                MetricSpec::new(
                    "temperature",
                    Signal::temperature(66.0, 301).with_fault(overheat(600.0, 60.0)),
                ),
                MetricSpec::new("pressure", Signal::pressure(2.6, 302)),
            ],
        ),
        demo_device(
            "pump-1",
            vec![MetricSpec::new("vibration", Signal::vibration(2.0, 401))],
        ),
        demo_device("pump-2", vec![MetricSpec::new("vibration", pump_2)]),
        demo_device(
            "greenhouse-1",
            vec![MetricSpec::new(
                "humidity",
                Signal::humidity(55.0, 601).with_fault(Fault {
                    start_s: 120.0,
                    duration_s: 600.0,
                    kind: FaultKind::Drift { per_s: 0.02 },
                }),
            )],
        ),
    ]
}

/// A serial probe for demos that show the serial path: key=value lines with
/// temperature and humidity at [`DEMO_RATE_HZ`], clock scaled like the fleet.
pub fn demo_serial_probe() -> SerialDeviceConfig {
    let mut c = SerialDeviceConfig::new(
        "probe-1",
        vec![
            MetricSpec::new("temperature", Signal::temperature(21.0, 701)),
            MetricSpec::new("humidity", Signal::humidity(45.0, 702)),
        ],
        DEMO_RATE_HZ,
    );
    c.ts_step = Duration::from_secs_f64(DEMO_TIME_SCALE / DEMO_RATE_HZ);
    c.format = LineFormat::KeyValue;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(device: &str, metric: &str, n: u32) -> Vec<Option<f64>> {
        let mut fleet = demo_fleet();
        let d = fleet.iter_mut().find(|d| d.name == device).unwrap();
        let step = d.ts_step.as_secs_f64();
        let m = d.metrics.iter_mut().find(|m| m.metric == metric).unwrap();
        (0..n)
            .map(|i| m.signal.sample(f64::from(i) * step))
            .collect()
    }

    #[test]
    fn pump_2_spikes_only_after_a_full_window() {
        let v = series("pump-2", "vibration", 200);
        let spikes: Vec<usize> = (0..v.len()).filter(|i| v[*i].unwrap() > 8.0).collect();
        assert_eq!(spikes, vec![70, 190]);
    }

    #[test]
    fn boiler_2_pressure_is_silent_for_40_seconds() {
        let v = series("boiler-2", "pressure", 100);
        let silent: Vec<usize> = (0..v.len()).filter(|i| v[*i].is_none()).collect();
        assert_eq!(silent, (30..70).collect::<Vec<_>>());
    }

    #[test]
    fn uniform_fleet_names_and_rates() {
        let f = uniform_fleet("dev", 3, &["temperature", "flow"], Some(5.0), 9);
        assert_eq!(
            f.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["dev-1", "dev-2", "dev-3"]
        );
        assert_eq!(f[0].metrics.len(), 2);
        assert_eq!(f[0].rate, crate::devices::mqtt::Rate::PerSecond(5.0));
        let fast = uniform_fleet("b", 1, &["x"], None, 0);
        assert_eq!(fast[0].rate, crate::devices::mqtt::Rate::FlatOut);
    }

    #[test]
    fn demo_clocks_run_ten_times_wall_time() {
        for d in demo_fleet() {
            assert_eq!(d.rate, crate::devices::mqtt::Rate::PerSecond(DEMO_RATE_HZ));
            assert_eq!(d.ts_step, Duration::from_secs(1));
        }
    }
}
