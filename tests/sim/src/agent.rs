//! The agent under test or on show: the `edgestream` binary's `run` command as a child
//! process, with its log (stderr) in a file. The bench and the demo start it this way, so
//! the tools crate never links the agent's code, and its CPU, memory and disk figures are
//! its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Logged by the agent's MQTT source once it takes readings.
const READY_LINE: &str = "subscribed to local topics";
/// Logged by the agent's Prometheus endpoint with its address (`[metrics] port = 0` lets
/// the operating system pick the port).
const METRICS_LINE: &str = "metrics endpoint listening";

/// The end of every config the tools write for the agent: what [`AgentChild`] watches for.
/// The Prometheus endpoint on a port the operating system picks (the agent logs it), and the
/// agent's own info lines (its ready line among them), rare events all, in its log.
pub const CONFIG_TAIL: &str = r#"
[metrics]
prometheus = true
port = 0

[log]
level = "warn,edgestream_agent=info"
"#;

/// A running agent; killed when dropped.
#[derive(Debug)]
pub struct AgentChild {
    child: Option<Child>,
    log: PathBuf,
    /// Started in its own process group (under a wrapper): signals go to the group.
    own_group: bool,
}

impl AgentChild {
    /// Starts `exe run --config config`, its stderr into `log`. `wrapper` (words split on
    /// spaces, e.g. `heaptrack -o /tmp/agent`) runs the agent under a tool for diagnosis;
    /// the tool runs the agent as its own child, so it is then started in a process group of
    /// its own and stopped through the group.
    pub fn start(
        exe: &Path,
        config: &Path,
        log: &Path,
        wrapper: Option<&str>,
    ) -> anyhow::Result<AgentChild> {
        let wrapper = wrapper.filter(|w| !w.trim().is_empty());
        let mut cmd = match wrapper {
            Some(w) => {
                let mut words = w.split_whitespace();
                let mut c = Command::new(words.next().unwrap_or_default());
                c.args(words).arg(exe);
                std::os::unix::process::CommandExt::process_group(&mut c, 0);
                c
            }
            None => Command::new(exe),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).context("agent log")?)
            .spawn()
            .with_context(|| format!("cannot start the agent {}", exe.display()))?;
        Ok(AgentChild {
            child: Some(child),
            log: log.to_path_buf(),
            own_group: wrapper.is_some(),
        })
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The agent's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The port of the agent's Prometheus endpoint, from its log.
    pub fn metrics_port(&self) -> Option<u16> {
        metrics_port_in(&self.logs())
    }

    /// The exit status, if the agent has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits until the log contains `line`; an error if the agent exits or `timeout` passes
    /// first (with the log).
    pub async fn wait_log(&mut self, line: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(line) {
            if let Some(status) = self.exited() {
                anyhow::bail!("the agent exited ({status}):\n{}", self.logs());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the agent did not log {line:?} in time:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until the agent has subscribed to the local broker.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_log(READY_LINE, timeout).await
    }

    /// Waits until the agent's Prometheus endpoint listens, and returns its port.
    pub async fn wait_metrics_port(&mut self, timeout: Duration) -> anyhow::Result<u16> {
        self.wait_log(METRICS_LINE, timeout).await?;
        self.metrics_port()
            .context("the agent logged its metrics endpoint without a port")
    }

    /// Waits up to `grace` for the agent to exit by itself (it was signalled already, as by
    /// Ctrl-C in its terminal: a second signal would make it exit at once), then [`Self::stop`].
    pub fn wait_exit(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop(Duration::ZERO)
    }

    /// SIGTERM, a wait of up to `grace`, then SIGKILL. The exit status, unless it was killed
    /// or had been stopped already.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.signal(&child, "-TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.signal(&child, "-KILL");
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Sends `signal` to the agent, or to its whole process group under a wrapper.
    fn signal(&self, child: &Child, signal: &str) {
        let target = if self.own_group {
            format!("-{}", child.id())
        } else {
            child.id().to_string()
        };
        let _ = Command::new("kill")
            .arg(signal)
            .arg("--")
            .arg(target)
            .status();
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.own_group {
                self.signal(&c, "-KILL");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The port in the agent's `metrics endpoint listening addr=127.0.0.1:PORT` line.
pub fn metrics_port_in(logs: &str) -> Option<u16> {
    let line = logs.lines().find(|l| l.contains(METRICS_LINE))?;
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_metrics_port_in_the_log() {
        let log = "2026-01-01T00:00:00Z  INFO edgestream_agent::prometheus: metrics endpoint \
                   listening addr=127.0.0.1:40123\n";
        assert_eq!(super::metrics_port_in(log), Some(40123));
        assert_eq!(super::metrics_port_in("nothing\n"), None);
    }
}
