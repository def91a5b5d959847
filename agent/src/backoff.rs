//! The one retry schedule of the agent: exponential backoff (first, 2x first, 4x first, ...
//! capped) with jitter, so a fleet of agents that failed together does not retry in step.
//! Container restarts, release polls, adoption, deploy retries and the fleet's AWS calls all
//! wait on a [`Backoff`]; nothing else counts failures or adds jitter by hand.

use std::time::Duration;

use tokio::time::Instant;

/// Failures counted since the last success, and when the next attempt may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    pub const fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            failures: 0,
            until: None,
        }
    }

    /// The wait after failure number `failures` (1-based) before jitter: `first * 2^(n-1)`,
    /// at most `cap`. Pure, for the table test and for schedules kept elsewhere.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.first.saturating_mul(1u32 << exp).min(self.cap)
    }

    /// Count a failure (or an attempt that must be spaced) and start its wait; returns the
    /// jittered wait.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = jitter(self.delay(self.failures));
        self.until = Some(Instant::now() + wait);
        wait
    }

    /// A success: the next failure waits `first` again, and nothing waits now.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.until = None;
    }

    /// The wait of the last failure has not passed yet.
    pub fn is_waiting(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Spread `d` over [d, 1.2 d): never sooner than the schedule says, and agents that failed at
/// the same moment drift apart.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(1.0..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let s = Duration::from_secs;
        let table = [
            (s(1), s(60), 0, s(1)),
            (s(1), s(60), 1, s(1)),
            (s(1), s(60), 2, s(2)),
            (s(1), s(60), 6, s(32)),
            (s(1), s(60), 7, s(60)),
            (s(1), s(60), u32::MAX, s(60)),
            (s(1), s(10), 5, s(10)),
            (Duration::from_millis(500), s(60), 3, s(2)),
            (s(3600), s(7200), 40, s(7200)),
        ];
        for (first, cap, failures, want) in table {
            assert_eq!(
                Backoff::new(first, cap).delay(failures),
                want,
                "{first:?} {cap:?} {failures}"
            );
        }
    }

    #[test]
    fn jitter_never_shortens_and_stays_within_a_fifth() {
        let d = Duration::from_secs(10);
        for _ in 0..1000 {
            let j = jitter(d);
            assert!(j >= d && j < Duration::from_secs(12), "{j:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fail_waits_and_reset_clears() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert!(!b.is_waiting());
        let w1 = b.fail();
        let w2 = b.fail();
        assert_eq!(b.failures(), 2);
        assert!(w1 >= Duration::from_secs(1) && w2 >= Duration::from_secs(2));
        assert!(b.is_waiting());
        tokio::time::sleep(w2).await;
        assert!(!b.is_waiting());
        b.fail();
        b.reset();
        assert_eq!((b.failures(), b.is_waiting()), (0, false));
    }
}
