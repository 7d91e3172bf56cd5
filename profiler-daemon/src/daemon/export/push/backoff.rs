//! Exponential back-off with jitter, and the small random source it needs.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exponential back-off with jitter.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    rng: Rng,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Backoff {
            base,
            cap: cap.max(base),
            rng: Rng::new(),
        }
    }

    /// `min(cap, base * 2^attempt)`, drawn uniformly from its upper half.
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let max = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap);
        let half = max / 2;
        let span = (max - half).as_nanos() as u64;
        let r = if span == 0 {
            0
        } else {
            self.rng.next_u64() % (span + 1)
        };
        half + Duration::from_nanos(r)
    }
}

/// xorshift64*: jitter and multipart boundaries need no more.
pub struct Rng(u64);

impl Default for Rng {
    fn default() -> Self {
        Rng(seed())
    }
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }

    /// A generator started from `seed` (made odd: zero would stay zero).
    pub fn seeded(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn seed() -> u64 {
    use std::hash::BuildHasher as _;
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    std::collections::hash_map::RandomState::new().hash_one(t) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_cap() {
        let mut s = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..50 {
            let d: Vec<Duration> = (0..8).map(|a| s.delay(a)).collect();
            for (a, d) in d.iter().enumerate() {
                let max = Duration::from_secs(1 << a).min(Duration::from_secs(30));
                assert!(*d >= max / 2 && *d <= max, "attempt {a}: {d:?}");
            }
        }
        assert!(s.delay(u32::MAX) <= Duration::from_secs(30));
        // Jitter actually varies.
        let xs: std::collections::HashSet<Duration> = (0..20).map(|_| s.delay(3)).collect();
        assert!(xs.len() > 1);
    }
}
