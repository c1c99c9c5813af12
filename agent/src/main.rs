//! `edgestream`: run the gateway daemon, check its config, or try it with simulated devices.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgestream_agent::config::Config;
use edgestream_agent::pipeline::Agent;
use edgestream_agent::Metrics;
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
    /// `demo`, `bench` and `simulate` (the tools crate's commands).
    #[cfg(feature = "tools")]
    #[command(flatten)]
    Tool(edgestream_sim::ToolCommand),
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
        Command::Check { config } => match Config::load(&config).and_then(|c| {
            c.gateway
                .check_data_dir(false)
                .map_err(|p| edgestream_agent::config::ConfigErrors(vec![p]))
        }) {
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
        Command::Tool(cmd) => report(
            std::env::current_exe()
                .context("cannot find this executable")
                .and_then(|exe| edgestream_sim::run_tool(cmd, exe)),
        ),
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
            RulesCommand::Check { file } => report(edgestream_agent::rules_cli::check(&file)),
            RulesCommand::Test { file, input } => {
                report(edgestream_agent::rules_cli::test(&file, &input))
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
