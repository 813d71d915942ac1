//! A token bucket for the per-client message rate limit (`client_rate_limit`,
//! `client_rate_burst`). One per WebSocket connection, owned by its task: no locks, no timers —
//! tokens are refilled from the elapsed time when a message arrives.

use std::time::Instant;

/// Allows `rate` messages per second on average and bursts of up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when `rate` is 0 (no limit).
    pub fn new(rate: f64, burst: f64) -> Option<Self> {
        (rate > 0.0).then(|| TokenBucket { rate, burst, tokens: burst, last: Instant::now() })
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let mut b = TokenBucket::new(10.0, 3.0).unwrap();
        let t0 = b.last;
        assert!((0..3).all(|_| b.allow_at(t0)));
        assert!(!b.allow_at(t0), "burst used up");
        assert!(!b.allow_at(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.allow_at(t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.allow_at(later)));
        assert!(!b.allow_at(later));
    }

    #[test]
    fn zero_rate_means_no_limit() {
        assert!(TokenBucket::new(0.0, 1.0).is_none());
    }
}
