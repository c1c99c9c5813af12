//! Jittered exponential backoff for reconnect loops (rumqttc reconnects in a tight loop on its
//! own after a failed `poll`).

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay: doubles each time up to `max`, with "full jitter" between half and all
    /// of it so that a fleet of gateways does not reconnect in lockstep after a broker restart.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// Waits the next delay before a retry, cut short when `stop` is cancelled. `false` when
    /// `stop` was cancelled already: the attempt just made was the last one.
    pub async fn wait_unless_stopped(&mut self, stop: &CancellationToken) -> bool {
        if stop.is_cancelled() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(self.next_delay()) => {}
            _ = stop.cancelled() => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(101));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(2001)));
        assert!(
            delays[9] >= Duration::from_secs(1),
            "should have reached the cap: {delays:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(101));
    }
}
