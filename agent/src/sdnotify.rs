//! systemd readiness and watchdog notifications (`sd_notify(3)`), without libsystemd.
//!
//! The units ship with `Type=notify` and `WatchdogSec=`: systemd considers the service started
//! only when `READY=1` arrives on `$NOTIFY_SOCKET`, and restarts it when `WATCHDOG=1` stops
//! arriving for `$WATCHDOG_USEC`. Outside systemd (`NOTIFY_SOCKET` unset) every call is a
//! no-op. A failed notification is logged and otherwise ignored: it must never stop the agent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, ...). Returns whether it was
/// sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    match result {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, state, "systemd notification failed");
            false
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if systemd asked for it and the
/// request is for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        // The test owns this process's environment for the duration of the check; nothing
        // else in this test binary reads NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1"));
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify("READY=1"), "without NOTIFY_SOCKET nothing is sent");
    }
}
