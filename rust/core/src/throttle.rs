//! Throttles: everything that makes the broker do something *less often* than it is asked to.
//!
//! * [`TokenBucket`]: the per-client message rate limit (`client_rate_limit`,
//!   `client_rate_burst`). One per WebSocket connection, owned by its task: no locks, no timers —
//!   tokens are refilled from the elapsed time when a message arrives.
//! * [`Backoff`]: capped exponential reconnect delays with jitter (the cluster's Redis
//!   connections).
//! * [`LogLimit`] and [`ErrorLog`]: repeated warnings and bad backend lines are logged at most
//!   once per [`LOG_EVERY`] (per cause), with a count of what was held back, so a flood of bad
//!   input or a long Redis outage cannot flood the log.
//!
//! All of it is small, pure and synchronous: no I/O, no tasks, nothing of the rest of the broker.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Repeated log lines (per [`LogLimit`], per [`ErrorLog`] cause) are let through at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Message rate limit.
// ---------------------------------------------------------------------------------------------

/// Allows `rate` messages per second on average and bursts of up to `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when `rate` is 0 (no limit).
    pub(crate) fn new(rate: f64, burst: f64) -> Option<Self> {
        (rate > 0.0).then(|| TokenBucket { rate, burst, tokens: burst, last: Instant::now() })
    }

    /// Takes one token if there is one.
    pub(crate) fn allow(&mut self) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Reconnect delays.
// ---------------------------------------------------------------------------------------------

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling from
/// `first` to `cap`; [`reset`](Self::reset) after a success.
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(first: Duration, cap: Duration, seed: u64) -> Self {
        Backoff { first, cap, next: first, rng: seed | 1 }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.cap);
        // xorshift64: jitter only, so nodes that lost Redis together do not retry in lockstep.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d / 2;
        let span = (d - half).as_micros() as u64;
        half + Duration::from_micros(if span == 0 { 0 } else { self.rng % (span + 1) })
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A seed for [`Backoff`]'s jitter that differs between processes and runs.
pub(crate) fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ ((std::process::id() as u64) << 32)
}

// ---------------------------------------------------------------------------------------------
// Rate-limited logging.
// ---------------------------------------------------------------------------------------------

/// Lets a repeated warning through at most once per [`LOG_EVERY`], counting what it held back.
#[derive(Default)]
pub(crate) struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// `Some(suppressed since the last one)` when this occurrence should be logged.
    pub(crate) fn allow(&self, n: u64) -> Option<u64> {
        let mut st = self.state.lock();
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                st.1 += n;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }
}

/// Logs bad input from one backend connection at most once per cause per [`LOG_EVERY`], with
/// a count of what was suppressed, so a flood of garbage cannot flood the log.
pub(crate) struct ErrorLog {
    /// The backend connection it reports for (its id in the logs).
    backend: u64,
    causes: HashMap<&'static str, (Instant, u64)>,
}

impl ErrorLog {
    pub(crate) fn new(backend: u64) -> Self {
        ErrorLog { backend, causes: HashMap::new() }
    }

    pub(crate) fn report(&mut self, cause: &'static str, detail: &str) {
        let now = Instant::now();
        match self.causes.get_mut(cause) {
            Some((last, suppressed)) if now.duration_since(*last) < LOG_EVERY => *suppressed += 1,
            Some((last, suppressed)) => {
                tracing::error!(
                    backend = self.backend,
                    cause,
                    suppressed = *suppressed,
                    "bad line from backend: {detail}"
                );
                *last = now;
                *suppressed = 0;
            }
            None => {
                tracing::error!(backend = self.backend, cause, "bad line from backend: {detail}");
                self.causes.insert(cause, (now, 0));
            }
        }
    }

    /// Logs how many lines of each cause were held back since they were last logged.
    pub(crate) fn flush(&self) {
        for (cause, (_, suppressed)) in &self.causes {
            if *suppressed > 0 {
                tracing::error!(
                    backend = self.backend,
                    cause,
                    suppressed,
                    "more bad lines from backend were not logged"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut b = Backoff::new(first, cap, 12345);
        let mut nominal = first;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} outside [{:?}, {nominal:?}]", nominal / 2);
            nominal = (nominal * 2).min(cap);
        }
        assert!(b.next_delay() >= cap / 2);
        b.reset();
        assert!(b.next_delay() <= first);
        // Different seeds do not retry in lockstep.
        let mut other = Backoff::new(first, cap, 999);
        let mut b = Backoff::new(first, cap, 12345);
        let same = (0..8).filter(|_| b.next_delay() == other.next_delay()).count();
        assert!(same < 8);
    }

    #[test]
    fn log_limit_lets_one_through_and_counts_the_rest() {
        let l = LogLimit::default();
        assert_eq!(l.allow(1), Some(0));
        assert_eq!(l.allow(5), None);
        assert_eq!(l.allow(1), None);
        l.state.lock().0 = Some(Instant::now() - LOG_EVERY);
        assert_eq!(l.allow(1), Some(6));
    }
}
