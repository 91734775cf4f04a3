//! Exponential backoff with full jitter, bounded by a deadline.

use rand::Rng;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    deadline: Instant,
}

impl Backoff {
    /// `base` is the first sleep's upper bound, doubling up to `cap`; no sleep goes past `deadline`.
    pub fn new(base: Duration, cap: Duration, deadline: Instant) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
            deadline,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The next sleep, or `None` when the deadline has passed.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let upper = exp.min(self.cap).max(Duration::from_millis(1));
        self.attempt += 1;
        // Full jitter in [upper/2, upper]: spreads retries without starving progress.
        let half = upper / 2;
        let jitter = rand::thread_rng().gen_range(0..=(upper - half).as_micros() as u64);
        let d = half + Duration::from_micros(jitter);
        Some(d.min(self.deadline - now))
    }

    /// Sleeps for the next delay; `false` when the deadline has passed.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }

    /// Like [`wait`](Self::wait) but at least `min` (a server's backoff hint).
    pub async fn wait_at_least(&mut self, min: Duration) -> bool {
        match self.next_delay() {
            Some(d) => {
                let d = d
                    .max(min)
                    .min(self.deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stops_at_deadline() {
        let mut b = Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(80),
            Instant::now() + Duration::from_secs(60),
        );
        let mut last_upper = Duration::ZERO;
        for i in 0..8 {
            let d = b.next_delay().unwrap();
            let upper = Duration::from_millis(10 * (1 << i)).min(Duration::from_millis(80));
            assert!(
                d <= upper && d >= upper / 2,
                "attempt {i}: {d:?} vs {upper:?}"
            );
            last_upper = upper;
        }
        assert_eq!(last_upper, Duration::from_millis(80));
        let mut expired = Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(1),
            Instant::now(),
        );
        assert!(expired.next_delay().is_none());
    }
}
