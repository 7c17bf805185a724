//! The production clock: tokio's monotonic clock, seen through governor's `Clock` trait.

use std::ops::Add;
use std::time::Duration;

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
