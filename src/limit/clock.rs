//! The production clocks: tokio's monotonic clock, seen through governor's `Clock` trait,
//! for the token buckets; and the wall clock ([`WallClock`]) for usage-quota periods, which
//! are calendar days, weeks and months in UTC.

use std::ops::Add;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use governor::clock::{Clock, ReasonablyRealtime, Reference};
use governor::nanos::Nanos;

/// The clock admission uses unless told otherwise.
pub type DefaultClock = TokioClock;

/// Reads [`tokio::time::Instant::now`].
///
/// In production this is `std::time::Instant::now()` (a vDSO call, no syscall). Using tokio's
/// instant rather than governor's TSC-based `QuantaClock` means `tokio::time::pause()` and
/// `advance()` drive admission in black-box tests of the whole server, just as they drive the
/// coalescer's timers. Unit tests of the limiter use `governor::clock::FakeRelativeClock`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

/// A [`tokio::time::Instant`] that governor can do arithmetic on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(pub tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        self.0
            .checked_sub(duration.into())
            .map_or(*self, TokioInstant)
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

impl ReasonablyRealtime for TokioClock {}

/// UTC time since the Unix epoch, for usage-quota periods: the system's clock, or in tests
/// a fake one that only moves when told.
///
/// The token buckets use a monotonic clock; quota periods cannot, because they are named
/// by the calendar (a day starts at 00:00 UTC) and must survive restarts. A step of the
/// system clock moves the current period with it, as it would for API Gateway.
#[derive(Clone, Debug, Default)]
pub struct WallClock {
    /// Nanoseconds since the epoch when fake; `None` for the system clock.
    fake: Option<Arc<AtomicU64>>,
}

impl WallClock {
    /// The system clock.
    pub fn system() -> WallClock {
        WallClock { fake: None }
    }

    /// A fake clock at `since_epoch`; clones share it.
    pub fn fake(since_epoch: Duration) -> WallClock {
        WallClock {
            fake: Some(Arc::new(AtomicU64::new(nanos(since_epoch)))),
        }
    }

    /// Moves a fake clock forward by `by`; does nothing to the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(fake) = &self.fake {
            fake.fetch_add(nanos(by), Ordering::Relaxed);
        }
    }

    /// Sets a fake clock to `since_epoch`; does nothing to the system clock.
    pub fn set(&self, since_epoch: Duration) {
        if let Some(fake) = &self.fake {
            fake.store(nanos(since_epoch), Ordering::Relaxed);
        }
    }

    /// Now, since the Unix epoch (zero for a system clock set before 1970).
    pub fn now(&self) -> Duration {
        match &self.fake {
            Some(fake) => Duration::from_nanos(fake.load(Ordering::Relaxed)),
            None => SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }
}

/// `d` in nanoseconds, saturating (u64 nanoseconds reach the year 2554).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paused_tokio_time_drives_the_clock() {
        let clock = TokioClock;
        let start = clock.now();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(
            clock.now().duration_since(start),
            Nanos::from(Duration::from_millis(1500))
        );
        assert_eq!(
            start + Nanos::from(7),
            TokioInstant(start.0 + Duration::from_nanos(7))
        );
        let later = clock.now();
        assert_eq!(
            later.saturating_sub(Nanos::from(Duration::from_millis(1500))),
            start
        );
    }
}
