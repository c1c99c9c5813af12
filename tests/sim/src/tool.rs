//! The tools' command line: `edgestream demo`, `edgestream bench` and `edgestream simulate`.
//! The `edgestream` binary flattens [`ToolCommand`] into its own commands (with its `tools`
//! feature) and hands it to [`run_tool`] with its own path, which the demo and the bench run
//! as the agent.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;

use crate::{bench, demo, simulate};

/// The tools' subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ToolCommand {
    /// The whole data path with nothing installed: in-process brokers, simulated devices,
    /// demo rules, the agent and a cloud subscriber, with a live status line.
    Demo {
        /// Stop by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// End-to-end load benchmark: brokers, simulated devices, the agent (as a child process)
    /// and a cloud subscriber; prints throughput, latency, CPU, memory and disk figures.
    Bench(bench::BenchOptions),
    /// Run simulated devices against a broker (and/or on pseudo-terminals) to try a setup.
    Simulate(SimulateArgs),
}

/// `edgestream simulate`'s options.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Broker the MQTT devices publish to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// `demo` (six devices with injected anomalies) or `uniform` (`--devices` alike).
    #[arg(long, default_value = "demo")]
    pub fleet: String,
    /// Number of devices with `--fleet uniform`.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Readings per second per metric with `--fleet uniform`; 0 = flat out.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Also run a serial probe on a pseudo-terminal (its path is printed).
    #[arg(long)]
    pub serial: bool,
    /// Also serve a simulated Modbus TCP energy meter on 127.0.0.1 at this port (0: any free
    /// port; printed with its register map).
    #[arg(long)]
    pub modbus_port: Option<u16>,
    /// Stop after this many seconds (default: Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
}

/// Runs a tool; `agent_exe` is the `edgestream` binary the demo and the bench start as the
/// agent (`std::env::current_exe()` of the binary that parsed the command).
pub fn run_tool(cmd: ToolCommand, agent_exe: PathBuf) -> anyhow::Result<()> {
    match cmd {
        ToolCommand::Demo { duration } => demo::main(duration, agent_exe),
        ToolCommand::Bench(opts) => bench::main(opts, agent_exe),
        ToolCommand::Simulate(args) => run_simulate(args),
    }
}

fn run_simulate(args: SimulateArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let mqtt_devices = match args.fleet.as_str() {
        "demo" => simulate::demo_fleet(),
        "uniform" => simulate::uniform_fleet(
            "sim",
            args.devices,
            &["temperature", "pressure"],
            (args.rate > 0.0).then_some(args.rate),
            1,
        ),
        other => anyhow::bail!("unknown fleet {other:?}: use demo or uniform"),
    };
    let mut opts = simulate::SimulateOptions::mqtt(args.host, args.port, mqtt_devices);
    if args.serial {
        opts.serial_devices.push(simulate::demo_serial_probe());
    }
    opts.modbus_port = args.modbus_port;
    opts.duration = args.duration.map(std::time::Duration::from_secs);
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

/// The tools' own logs, to stderr at `level` (`RUST_LOG` wins). A second call keeps the
/// first subscriber.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _already = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
