//! Reconnect delays: exponential, capped, with jitter, so that a DaemonSet's agents that lost
//! etcd (or Cilium) together do not come back together.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// Per-process random keys: each agent draws different delays.
    random: std::collections::hash_map::RandomState,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0, random: Default::default() }
    }

    /// The next delay: uniform in [d/2, d] with d = base × 2^attempts, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let mut h = self.random.build_hasher();
        h.write_u32(self.attempt);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_nanos()));
        let frac = (h.finish() % 10_001) as f64 / 10_000.0;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_spread() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_millis(500).saturating_mul(1 << i).min(Duration::from_secs(30));
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?} outside [{:?}, {full:?}]", full / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
        // Two agents failing together draw different delays.
        let (mut x, mut y) = (Backoff::new(Duration::from_secs(2), Duration::from_secs(60)), Backoff::new(Duration::from_secs(2), Duration::from_secs(60)));
        let same = (0..5).filter(|_| x.next_delay() == y.next_delay()).count();
        assert!(same < 5, "no spread");
    }
}
