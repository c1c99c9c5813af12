//! `edgestream`: run the gateway daemon, check its config, or try it with simulated devices.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgestream_agent::config::Config;
use edgestream_agent::pipeline::Agent;
use edgestream_agent::telemetry::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "edgestream",
    version,
    about = "Edge/IoT stream processor for ARM gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (and its rules) without starting; non-zero exit on any problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    #[cfg(feature = "tools")]
    /// The whole data path with nothing installed: in-process brokers, simulated devices,
    /// demo rules and a cloud subscriber, with a live status line.
    Demo {
        /// Stop by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    #[cfg(feature = "tools")]
    /// End-to-end load benchmark: brokers, simulated devices, the agent (as a child process)
    /// and a cloud subscriber; prints throughput, latency, CPU, memory and disk figures.
    Bench(edgestream_agent::bench::BenchOptions),
    #[cfg(feature = "tools")]
    /// Run simulated devices against a broker (and/or on pseudo-terminals) to try a setup.
    Simulate {
        /// Broker the MQTT devices publish to.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// `demo` (six devices with injected anomalies) or `uniform` (`--devices` alike).
        #[arg(long, default_value = "demo")]
        fleet: String,
        /// Number of devices with `--fleet uniform`.
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Readings per second per metric with `--fleet uniform`; 0 = flat out.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Also run a serial probe on a pseudo-terminal (its path is printed).
        #[arg(long)]
        serial: bool,
        /// Stop after this many seconds (default: Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Compile rule files or replay recorded readings through them.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Inspect the durable outbox of a stopped agent.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Check every stored record: print records, bytes, the oldest record's age and anything
    /// damaged, per segment; exit 1 if anything is damaged (2 if it cannot be read).
    Verify {
        /// The agent's `gateway.data_dir` (or its `outbox` directory).
        #[arg(long)]
        data_dir: PathBuf,
        /// Truncate torn segment tails at the last valid record, as the agent's start does.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// Compile a rule file and report its rules and memory budget, or every error.
    Check { file: PathBuf },
    /// Replay readings (JSON lines: device, metric, value, ts) through a rule file and print
    /// the alerts, commands and aggregates they produce.
    Test {
        file: PathBuf,
        #[arg(long)]
        input: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} problem(s)", config.display(), errors.0.len());
                for p in &errors.0 {
                    eprintln!("  {p}");
                }
                ExitCode::from(2)
            }
        },
        Command::Run { config } => report(run(config)),
        #[cfg(feature = "tools")]
        Command::Demo { duration } => report(edgestream_agent::demo::main(duration)),
        #[cfg(feature = "tools")]
        Command::Bench(opts) => report(edgestream_agent::bench::main(opts)),
        #[cfg(feature = "tools")]
        Command::Simulate {
            host,
            port,
            fleet,
            devices,
            rate,
            serial,
            duration,
        } => report(simulate(
            host, port, &fleet, devices, rate, serial, duration,
        )),
        Command::Outbox {
            command: OutboxCommand::Verify { data_dir, repair },
        } => {
            use edgestream_agent::outbox::verify;
            let dir = verify::outbox_dir(&data_dir);
            match verify::verify(&dir, repair) {
                Ok(v) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    print!("{}", v.render(now));
                    if v.damaged() {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", dir.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Rules { command } => match command {
            RulesCommand::Check { file } => {
                report(edgestream_agent::rules_stage::cli::check(&file))
            }
            RulesCommand::Test { file, input } => {
                report(edgestream_agent::rules_stage::cli::test(&file, &input))
            }
        },
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "tools")]
fn simulate(
    host: String,
    port: u16,
    fleet: &str,
    devices: usize,
    rate: f64,
    serial: bool,
    duration: Option<u64>,
) -> anyhow::Result<()> {
    use edgestream_sim::simulate;
    edgestream_agent::logging::init("warn");
    let mqtt_devices = match fleet {
        "demo" => simulate::demo_fleet(),
        "uniform" => simulate::uniform_fleet(
            "sim",
            devices,
            &["temperature", "pressure"],
            (rate > 0.0).then_some(rate),
            1,
        ),
        other => anyhow::bail!("unknown fleet {other:?}: use demo or uniform"),
    };
    let mut opts = simulate::SimulateOptions::mqtt(host, port, mqtt_devices);
    if serial {
        opts.serial_devices.push(simulate::demo_serial_probe());
    }
    opts.duration = duration.map(std::time::Duration::from_secs);
    opts.print = true;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(simulate::simulate(opts))?;
    println!("{report}");
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
    edgestream_agent::logging::init(&config.log.level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.gateway.worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Arc::new(Metrics::default());
        let agent = Agent::build(config, path.parent(), metrics).context("cannot start")?;
        let shutdown = CancellationToken::new();
        edgestream_agent::logging::cancel_on_signal(shutdown.clone())?;
        let report = agent.run(shutdown).await?;
        if !report.stuck.is_empty() {
            anyhow::bail!("did not stop cleanly: {:?}", report.stuck);
        }
        Ok(())
    })
}
