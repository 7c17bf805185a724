//! Whether the backend is up: a state machine with hysteresis, so a Redis that is merely
//! slow now and then is not declared down by one late answer, and a Redis that flaps is not
//! declared up by one good one.
//!
//! - **Up → down** after `down_after` consecutive failed calls (errors or missed deadlines),
//!   or when at least half of the calls of the current one-second window failed and there
//!   were at least [`RATIO_MIN_CALLS`] of them, or at once when the connection itself is
//!   lost (refused, reset, closed: Redis is gone, not slow, and waiting for more failures
//!   would only make more requests wait). Any other failed call while up is decided by the
//!   fallback policy on its own; it does not flip the backend.
//! - **Down → up** after `up_after` consecutive good probes (answered within the call
//!   deadline); a bad probe starts the run again.
//!
//! Pure and clock-free (the caller passes the instant), so its unit tests need no runtime.

use std::time::Duration;

use tokio::time::Instant;

/// The window of the error ratio.
const RATIO_WINDOW: Duration = Duration::from_secs(1);

/// Fewest calls in a window for its error ratio to decide (a quiet replica's two failures
/// out of three are the consecutive rule's business).
pub(crate) const RATIO_MIN_CALLS: u32 = 20;

/// A change of state the caller acts on (log, gauge) exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// No change.
    Stay,
    /// The backend was just declared down.
    Down,
    /// The backend was just declared up.
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up { failures: u32 },
    Down { good: u32 },
}

/// The backend's health (see the module docs).
#[derive(Debug)]
pub(crate) struct Health {
    state: State,
    down_after: u32,
    up_after: u32,
    window_start: Option<Instant>,
    window_calls: u32,
    window_failures: u32,
}

impl Health {
    /// A backend that starts down; `down_after` and `up_after` are clamped to at least 1.
    pub(crate) fn new(down_after: u32, up_after: u32) -> Health {
        Health {
            state: State::Down { good: 0 },
            down_after: down_after.max(1),
            up_after: up_after.max(1),
            window_start: None,
            window_calls: 0,
            window_failures: 0,
        }
    }

    /// Whether requests use Redis.
    pub(crate) fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Declares the backend up at once (a successful start-up probe: nothing to flap from).
    pub(crate) fn force_up(&mut self) -> Transition {
        let was_up = self.is_up();
        self.state = State::Up { failures: 0 };
        self.window_start = None;
        if was_up {
            Transition::Stay
        } else {
            Transition::Up
        }
    }

    /// The outcome of a call made while up (a request's script call, a heartbeat).
    pub(crate) fn call(&mut self, ok: bool, now: Instant) -> Transition {
        let State::Up { failures } = self.state else {
            // A call that started before the backend went down: already decided.
            return Transition::Stay;
        };
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < RATIO_WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.window_calls = 0;
                self.window_failures = 0;
            }
        }
        self.window_calls += 1;
        if ok {
            self.state = State::Up { failures: 0 };
            return Transition::Stay;
        }
        self.window_failures += 1;
        let failures = failures + 1;
        let ratio =
            self.window_calls >= RATIO_MIN_CALLS && self.window_failures * 2 >= self.window_calls;
        if failures >= self.down_after || ratio {
            self.state = State::Down { good: 0 };
            return Transition::Down;
        }
        self.state = State::Up { failures };
        Transition::Stay
    }

    /// A call failed because the connection is lost: down at once (when up).
    pub(crate) fn lost(&mut self) -> Transition {
        if !self.is_up() {
            return Transition::Stay;
        }
        self.state = State::Down { good: 0 };
        Transition::Down
    }

    /// The outcome of a probe made while down (`ok`: answered within the call deadline).
    pub(crate) fn probe(&mut self, ok: bool) -> Transition {
        let State::Down { good } = self.state else {
            return Transition::Stay;
        };
        if !ok {
            self.state = State::Down { good: 0 };
            return Transition::Stay;
        }
        if good + 1 >= self.up_after {
            self.state = State::Up { failures: 0 };
            self.window_start = None;
            return Transition::Up;
        }
        self.state = State::Down { good: good + 1 };
        Transition::Stay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(down_after: u32, up_after: u32) -> Health {
        let mut health = Health::new(down_after, up_after);
        assert_eq!(health.force_up(), Transition::Up);
        health
    }

    #[test]
    fn one_slow_call_does_not_flip_the_backend() {
        let t = Instant::now();
        let mut health = up(3, 3);
        for _ in 0..10 {
            assert_eq!(health.call(false, t), Transition::Stay);
            assert_eq!(health.call(true, t), Transition::Stay);
        }
        assert!(health.is_up());
    }

    #[test]
    fn consecutive_failures_declare_it_down_once() {
        let t = Instant::now();
        let mut health = up(3, 3);
        assert_eq!(health.call(false, t), Transition::Stay);
        assert_eq!(health.call(false, t), Transition::Stay);
        assert_eq!(health.call(false, t), Transition::Down);
        assert!(!health.is_up());
        // Calls in flight when it went down change nothing.
        assert_eq!(health.call(false, t), Transition::Stay);
        assert_eq!(health.call(true, t), Transition::Stay);
        assert!(!health.is_up());
    }

    #[test]
    fn an_error_ratio_over_the_window_declares_it_down() {
        let t = Instant::now();
        let mut health = up(3, 3);
        // Alternating failures never make three in a row, but half the window fails.
        let mut transitions = Vec::new();
        for i in 0..RATIO_MIN_CALLS {
            transitions.push(health.call(i % 2 == 0, t + Duration::from_millis(u64::from(i))));
        }
        assert_eq!(transitions.last(), Some(&Transition::Down));
        assert_eq!(
            transitions
                .iter()
                .filter(|t| **t == Transition::Down)
                .count(),
            1
        );
    }

    #[test]
    fn the_ratio_window_starts_again_after_a_second() {
        let t = Instant::now();
        let mut health = up(3, 3);
        for i in 0..(RATIO_MIN_CALLS - 1) {
            health.call(i % 2 == 0, t);
        }
        // A new window: the 19 calls above no longer count.
        let later = t + RATIO_WINDOW;
        assert_eq!(health.call(true, later), Transition::Stay);
        assert_eq!(health.call(false, later), Transition::Stay);
        assert!(health.is_up());
    }

    #[test]
    fn it_comes_back_only_after_a_run_of_good_probes() {
        let t = Instant::now();
        let mut health = up(1, 3);
        assert_eq!(health.call(false, t), Transition::Down);
        assert_eq!(health.probe(true), Transition::Stay);
        assert_eq!(health.probe(true), Transition::Stay);
        // A bad probe starts the run again.
        assert_eq!(health.probe(false), Transition::Stay);
        assert_eq!(health.probe(true), Transition::Stay);
        assert_eq!(health.probe(true), Transition::Stay);
        assert_eq!(health.probe(true), Transition::Up);
        assert!(health.is_up());
        // Probes while up change nothing.
        assert_eq!(health.probe(false), Transition::Stay);
        assert!(health.is_up());
    }

    #[test]
    fn a_lost_connection_takes_it_down_at_once() {
        let mut health = up(3, 3);
        assert_eq!(health.lost(), Transition::Down);
        assert_eq!(health.lost(), Transition::Stay);
        assert!(!health.is_up());
    }

    #[test]
    fn thresholds_of_zero_mean_one() {
        let t = Instant::now();
        let mut health = up(0, 0);
        assert_eq!(health.call(false, t), Transition::Down);
        assert_eq!(health.probe(true), Transition::Up);
    }
}
