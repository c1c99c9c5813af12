//! Building blocks of the agent's `select!` loops: a deadline kept across turns, and a
//! channel that may not be there.

use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// The next message of `rx`, or never if there is no channel (a branch that stays quiet
/// instead of a `select!` precondition). `None` once the channel has closed.
pub async fn recv_or_pending<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A timer kept across the turns of a `select!` loop and re-armed only when its deadline
/// changes, instead of a fresh `tokio::time::sleep_until` (a timer-wheel insert and removal)
/// in every turn of loops that turn thousands of times a second under load.
#[derive(Debug)]
pub struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    at: Option<Instant>,
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

impl Deadline {
    /// A disarmed deadline.
    pub fn new() -> Self {
        // Never polled while disarmed, so the instant only has to be valid.
        let idle = tokio::time::sleep(Duration::from_secs(3600));
        Self {
            sleep: Box::pin(idle),
            at: None,
        }
    }

    /// Arms the deadline for `at`, or disarms it (`None`). Setting the instant it already
    /// has changes nothing, so a deadline that has passed stays passed.
    pub fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            if let Some(t) = at {
                self.sleep.as_mut().reset(t.into());
            }
            self.at = at;
        }
    }

    /// Resolves once the armed instant has passed (at once if it already has); never while
    /// disarmed. Cancel-safe: the timer outlives the future.
    pub async fn elapsed(&mut self) {
        if self.at.is_some() {
            self.sleep.as_mut().await
        } else {
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_when_armed_never_when_disarmed_and_follows_a_new_instant() {
        let mut d = Deadline::new();
        let quiet = tokio::time::timeout(Duration::from_millis(100), d.elapsed()).await;
        assert!(quiet.is_err(), "a disarmed deadline fired");
        let start = Instant::now();
        d.set(Some(start + Duration::from_secs(30)));
        d.set(Some(start + Duration::from_millis(20)));
        tokio::time::timeout(Duration::from_secs(10), d.elapsed())
            .await
            .expect("the deadline moved earlier fires");
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Passed, and set to the same instant again: still passed.
        d.set(Some(start + Duration::from_millis(20)));
        tokio::time::timeout(Duration::from_secs(1), d.elapsed())
            .await
            .expect("a passed deadline resolves at once");
        d.set(None);
        let quiet = tokio::time::timeout(Duration::from_millis(100), d.elapsed()).await;
        assert!(quiet.is_err(), "a disarmed deadline fired");
    }
}
