//! The gate every invoke attempt passes: a concurrency permit, then an invoke-rate token.
//!
//! - Concurrency: `max_concurrency` permits; an [`InvokePermit`] holds one for the whole attempt and
//!   releases it on drop, so a cancelled attempt never leaks capacity.
//! - Rate: a token bucket (`rate` tokens per second, `burst` capacity, starts full) taken
//!   *after* the permit, so no token is spent while an attempt still waits for concurrency.
//!   Retries pass the gate too: Lambda counts every attempt against its quota.
//! - Adaptive (`invoke.adaptive = true`): AIMD on both. A throttle whose `Reason` names
//!   concurrency lowers the concurrency cap; a rate reason lowers the rate to at most what
//!   Lambda accepted over the last second (and at most 0.7× the current rate) and empties the
//!   bucket (Lambda's own bucket is empty, so ours should be too). Both climb back slowly
//!   while throttles stay away: the rate by 2% of the configured rate per quiet second after
//!   2 s without a rate throttle, the concurrency cap by one per 5 quiet seconds. Neither ever
//!   exceeds its configured value. The current values are [`Gate::limits`].
//! - Reconfiguring ([`Gate::reconfigure`], on reload): one gate serves a function for the
//!   life of the process, so a batcher draining after a reload and its replacement share the
//!   same permits. New limits apply in place: permits are added, or withdrawn as debt when
//!   they are out (as an adaptive decrease does); the rate bucket keeps its tokens, capped
//!   at the new burst.
//! - The rate bucket is the crate's one adjustable token bucket
//!   ([`AdjustableBucket`](crate::quota::AdjustableBucket): integer GCRA, the admission
//!   layers' rounding), which can change its quota in place, refund and empty itself.
//! - No arithmetic here can panic: the bucket's maths is saturating integers, every wait is
//!   clamped to [`MAX_WAIT`], and the locks (`parking_lot`, held for a few arithmetic
//!   operations and never across an await) do not poison.
//!
//! # Shared invoke rate (`[limits] backend = "redis"`)
//!
//! A function's invoke quota belongs to the AWS account and Region, not to one sidecar. With
//! a Redis backend ([`Gate::shared`]) the rate token comes from one Redis bucket per function
//! (`<prefix>:i:<function>`, the same GCRA script as admission, one round trip), so N
//! replicas' invokes *together* stay within `invoke.rate`. Each replica passes its current
//! rate — the configured one, or what adaptive AIMD lowered it to — with every call, so a
//! throttled replica slows the shared bucket down for everyone at once. While Redis cannot
//! be reached the `on_backend_error` policy applies to the token: `local` takes it from this
//! replica's own bucket (the configured rate per replica: N replicas may then invoke up to
//! N× the rate), `allow` grants it, `deny` waits for Redis (callers' deadlines bound the
//! wait). Concurrency permits stay per replica: set `max_concurrency` to the function's
//! reserved concurrency divided by the number of replicas.
//!
//! Two local-bucket details do not carry over to the shared bucket: a slot dropped unused
//! does not give its shared token back (conservative: a token lost, never an extra invoke),
//! and a rate throttle does not empty the shared bucket (lowering the rate passed to the
//! script already caps the bucket's debt at the new quota). Cancelling [`Gate::acquire`]
//! during its Redis round trip may spend a shared token for nothing, for the same reason.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::backend::{Fallback, RedisBackend, DENY_WAIT};
use crate::quota::{AdjustableBucket, Decision, Quota, Refusal};

/// Throttle reasons Lambda gives for concurrency, as opposed to invoke rate.
const CONCURRENCY_REASONS: [&str; 2] = [
    "ReservedFunctionConcurrentInvocationLimitExceeded",
    "ConcurrentInvocationLimitExceeded",
];

/// Longest a waiter sleeps before it looks at the bucket again.
const RECHECK: Duration = Duration::from_secs(1);

const DECREASE: f64 = 0.7;
const RATE_COOLDOWN: Duration = Duration::from_millis(100);
const RATE_QUIET: Duration = Duration::from_secs(2);
const RATE_STEP_EVERY: Duration = Duration::from_secs(1);
const RATE_STEP: f64 = 0.02;
const MIN_RATE: f64 = 0.1;
const CONCURRENCY_COOLDOWN: Duration = Duration::from_millis(500);
const CONCURRENCY_STEP_EVERY: Duration = Duration::from_secs(5);

/// The longest wait for a rate token the gate reports. Validation keeps `invoke.rate` at
/// or above 0.001/s (a token per 1000 s); this bound keeps waits sensible for any input
/// (a closed bucket, a rate validation would refuse). A caller's deadline ends a wait far
/// sooner.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The wait a refused take reports, at most [`MAX_WAIT`]. The bucket's waits are never
/// zero (at least 1 ns), so a caller sleeping on them cannot spin.
fn clamped(refusal: Refusal) -> Duration {
    match refusal {
        Refusal::Wait(wait) => wait.min(MAX_WAIT),
        Refusal::Closed => MAX_WAIT,
    }
}

/// The gate's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateConfig {
    /// `invoke.max_concurrency`: invokes of the function in flight at once, at most.
    pub max_concurrency: usize,
    /// `invoke.rate`: invokes per second the rate bucket refills.
    pub rate: f64,
    /// `invoke.burst`: invokes the rate bucket holds when full.
    pub burst: u32,
    /// `invoke.adaptive`: lower concurrency and rate on throttles, raise them back on successes.
    pub adaptive: bool,
}

/// The gate's current limits (equal to the configured ones unless adaptive lowered them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Invokes allowed in flight now.
    pub concurrency: usize,
    /// Invokes per second the rate bucket refills at now.
    pub rate: f64,
    /// Invokes holding a concurrency permit now.
    pub in_flight: usize,
}

/// Capacity to invoke one function. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Gate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The configured limits; replaced by [`Gate::reconfigure`].
    config: Mutex<GateConfig>,
    /// With a Redis backend: the function's shared invoke-rate bucket. Swappable because
    /// a reload may change `[limits]` while the gate (and its permits) live on.
    shared: ArcSwapOption<SharedRate>,
    permits: Arc<Semaphore>,
    /// Guarded together: the cap and the permits still to be withdrawn after a decrease.
    concurrency: Mutex<Concurrency>,
    rate: Mutex<Rate>,
}

#[derive(Debug)]
struct SharedRate {
    backend: RedisBackend,
    /// The function's bucket: `<prefix>:i:<function>`.
    key: String,
}

#[derive(Debug)]
struct Concurrency {
    cap: usize,
    /// Permits to forget as they come back, because the cap was lowered while they were out.
    debt: usize,
    last_decrease: Option<Instant>,
    last_change: Instant,
}

#[derive(Debug)]
struct Rate {
    /// `rate` is the current (possibly lowered) invoke rate, `burst` the configured one.
    bucket: AdjustableBucket,
    last_decrease: Option<Instant>,
    last_increase: Instant,
    /// Invokes Lambda accepted in the current and the previous one-second window.
    window_start: Instant,
    accepted_now: u32,
    accepted_prev: u32,
}

impl Rate {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.bucket.try_take(now).map_err(clamped)
    }

    fn rate(&self) -> f64 {
        self.bucket.quota().rate
    }

    /// Moves the bucket to `rate`, keeping its tokens.
    fn set_rate(&mut self, rate: f64, now: Instant) {
        let burst = self.bucket.quota().burst;
        self.bucket.set_quota(Quota { rate, burst }, now);
    }

    fn roll_window(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_secs(2) {
            self.accepted_prev = 0;
            self.accepted_now = 0;
            self.window_start = now;
        } else if elapsed >= Duration::from_secs(1) {
            self.accepted_prev = self.accepted_now;
            self.accepted_now = 0;
            self.window_start += Duration::from_secs(1);
        }
    }
}

/// The right to run one invoke attempt; gives its permit back (or withdraws it, after an
/// adaptive decrease) on drop.
#[derive(Debug)]
pub struct InvokePermit {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Inner>,
    /// Set when an invoke attempt was sent with this slot. A slot dropped unused (its
    /// batch emptied while it waited) gives its rate token back: Lambda never saw it.
    used: bool,
    /// Whether the token came from the local bucket (only those are given back).
    local_token: bool,
}

impl InvokePermit {
    /// Marks the slot as spent on a real invoke attempt.
    pub fn mark_used(&mut self) {
        self.used = true;
    }
}

impl Drop for InvokePermit {
    fn drop(&mut self) {
        if !self.used && self.local_token {
            self.gate.lock_rate().bucket.refund(Instant::now());
        }
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut c = self.gate.lock_concurrency();
        if c.debt > 0 {
            c.debt -= 1;
            permit.forget();
        }
    }
}

impl Gate {
    /// A gate whose invoke-rate bucket is local to this process.
    pub fn new(config: GateConfig) -> Self {
        Gate::build(config, None)
    }

    /// A gate whose invoke-rate token comes from `function`'s bucket in Redis, shared with
    /// every replica (see the gate module's docs); the local bucket serves the `local`
    /// fallback.
    pub fn shared(config: GateConfig, backend: RedisBackend, function: &str) -> Self {
        let key = backend.invoke_key(function);
        Gate::build(config, Some(SharedRate { backend, key }))
    }

    /// Sets where the invoke-rate token comes from: `function`'s bucket in Redis through
    /// `backend`, or (`None`) the local bucket. For a reload that changed `[limits]`.
    pub fn set_backend(&self, backend: Option<RedisBackend>, function: &str) {
        let shared = backend.map(|backend| {
            let key = backend.invoke_key(function);
            Arc::new(SharedRate { backend, key })
        });
        self.inner.shared.store(shared);
    }

    fn build(config: GateConfig, shared: Option<SharedRate>) -> Self {
        let now = Instant::now();
        Gate {
            inner: Arc::new(Inner {
                config: Mutex::new(config),
                shared: ArcSwapOption::from(shared.map(Arc::new)),
                permits: Arc::new(Semaphore::new(config.max_concurrency)),
                concurrency: Mutex::new(Concurrency {
                    cap: config.max_concurrency,
                    debt: 0,
                    last_decrease: None,
                    last_change: now,
                }),
                rate: Mutex::new(Rate {
                    bucket: AdjustableBucket::new(
                        Quota {
                            rate: config.rate,
                            burst: config.burst,
                        },
                        now,
                    ),
                    last_decrease: None,
                    last_increase: now,
                    window_start: now,
                    accepted_now: 0,
                    accepted_prev: 0,
                }),
            }),
        }
    }

    /// A gate with only a concurrency cap (an effectively unlimited rate); for tests.
    pub fn concurrency_only(max_concurrency: usize) -> Self {
        Gate::new(GateConfig {
            max_concurrency,
            rate: 1e9,
            burst: u32::MAX,
            adaptive: false,
        })
    }

    /// Waits for a concurrency permit, then an invoke-rate token. Cancel-safe: dropping the
    /// future releases a permit it holds and has taken no local token (a shared token may
    /// be in flight; see the module docs).
    pub async fn acquire(&self) -> InvokePermit {
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed");
        // `used: true` until a token is taken, so a cancelled wait refunds nothing.
        let mut slot = InvokePermit {
            permit: Some(permit),
            gate: Arc::clone(&self.inner),
            used: true,
            local_token: false,
        };
        loop {
            let wait = match self.take_token().await {
                Ok(local_token) => {
                    slot.used = false;
                    slot.local_token = local_token;
                    return slot;
                }
                Err(wait) => wait,
            };
            // Looked at again at least once a second: a reload may raise the rate (the gate
            // outlives reloads), and a waiter holding a permit must not sleep out a wait
            // computed from the old, slower rate.
            tokio::time::sleep(wait.min(RECHECK)).await;
        }
    }

    /// Takes an invoke-rate token: `Ok(true)` from the local bucket, `Ok(false)` from the
    /// shared one (or granted by `allow`), `Err(wait)` when none is there yet.
    async fn take_token(&self) -> Result<bool, Duration> {
        let Some(shared) = self.inner.shared.load_full() else {
            return self.inner.lock_rate().take(Instant::now()).map(|()| true);
        };
        let quota = Quota {
            // The locks are released at the end of each statement, before any await.
            rate: self.inner.lock_rate().rate(),
            burst: self.inner.lock_config().burst,
        };
        match shared.backend.take(&shared.key, quota).await {
            Ok(Decision::Allowed { .. }) => Ok(false),
            Ok(Decision::Limited { wait }) => Err(wait),
            Err(_unavailable) => match shared.backend.fallback() {
                Fallback::Local => self.inner.lock_rate().take(Instant::now()).map(|()| true),
                Fallback::Allow => Ok(false),
                Fallback::Deny => Err(DENY_WAIT),
            },
        }
    }

    /// A slot if a permit and a *local* token are both available right now.
    ///
    /// A shared (Redis) token cannot be taken without a round trip, so a gate built with
    /// [`Gate::shared`] answers `None` here; use [`acquire`](Self::acquire).
    pub fn try_acquire(&self) -> Option<InvokePermit> {
        if self.inner.shared.load().is_some() {
            return None;
        }
        let permit = Arc::clone(&self.inner.permits).try_acquire_owned().ok()?;
        // `used: true` until a token is taken, so a failed take refunds nothing.
        let mut slot = InvokePermit {
            permit: Some(permit),
            gate: Arc::clone(&self.inner),
            used: true,
            local_token: true,
        };
        self.inner.lock_rate().take(Instant::now()).ok()?;
        slot.used = false;
        Some(slot)
    }

    /// The limits in force now and the invokes in flight (for the admin API and metrics).
    pub fn limits(&self) -> Limits {
        let concurrency = self.inner.lock_concurrency();
        let rate = self.inner.lock_rate().rate();
        let available = self.inner.permits.available_permits();
        Limits {
            concurrency: concurrency.cap,
            rate,
            in_flight: concurrency.cap.saturating_sub(available),
        }
    }

    /// The configuration the gate was built or last reconfigured with.
    pub fn config(&self) -> GateConfig {
        *self.inner.lock_config()
    }

    /// How long until the local bucket has a token (zero when it has one now); at most
    /// [`MAX_WAIT`].
    pub fn time_to_next_token(&self) -> Duration {
        match self.inner.lock_rate().bucket.peek(Instant::now()) {
            Ok(()) => Duration::ZERO,
            Err(refusal) => clamped(refusal),
        }
    }

    /// Applies new limits to this gate in place (a reload): the concurrency cap moves to
    /// `config.max_concurrency` — permits added, or withdrawn as they come back when they
    /// are out — and the rate bucket takes the new rate and burst, keeping its tokens up to
    /// the new burst. With `adaptive`, a cap or rate that throttles had lowered stays
    /// lowered (if below the new value) and recovers as usual.
    pub fn reconfigure(&self, config: GateConfig) {
        let old = std::mem::replace(&mut *self.inner.lock_config(), config);
        if old == config {
            return;
        }
        let now = Instant::now();
        {
            let mut c = self.inner.lock_concurrency();
            let target = if config.adaptive && c.cap < old.max_concurrency {
                c.cap.min(config.max_concurrency)
            } else {
                config.max_concurrency
            };
            if target > c.cap {
                // Debt first: permits still owed from an earlier decrease cancel out.
                let added = target - c.cap;
                let repaid = added.min(c.debt);
                c.debt -= repaid;
                self.inner.permits.add_permits(added - repaid);
            } else {
                let withdrawn = c.cap - target;
                let forgotten = self.inner.permits.forget_permits(withdrawn);
                c.debt += withdrawn - forgotten;
            }
            c.cap = target;
            c.last_change = now;
        }
        let mut r = self.inner.lock_rate();
        let rate = if config.adaptive && r.rate() < old.rate {
            r.rate().min(config.rate)
        } else {
            config.rate
        };
        r.bucket.set_quota(
            Quota {
                rate,
                burst: config.burst,
            },
            now,
        );
        tracing::info!(
            concurrency = config.max_concurrency,
            rate = config.rate,
            burst = config.burst,
            adaptive = config.adaptive,
            "invoke gate reconfigured"
        );
    }

    /// Lambda accepted an attempt: counts toward the accepted rate, and lets adaptive
    /// limits climb back when throttles have stayed away.
    pub fn on_accepted(&self) {
        let now = Instant::now();
        let config = self.config();
        {
            let mut r = self.inner.lock_rate();
            r.roll_window(now);
            r.accepted_now = r.accepted_now.saturating_add(1);
            if config.adaptive && r.rate() < config.rate {
                let quiet = r
                    .last_decrease
                    .is_none_or(|t| now.saturating_duration_since(t) >= RATE_QUIET);
                if quiet && now.saturating_duration_since(r.last_increase) >= RATE_STEP_EVERY {
                    let raised = (r.rate() + RATE_STEP * config.rate).min(config.rate);
                    r.set_rate(raised, now);
                    r.last_increase = now;
                }
            }
        }
        if config.adaptive {
            let mut c = self.inner.lock_concurrency();
            if c.cap < config.max_concurrency
                && now.saturating_duration_since(c.last_change) >= CONCURRENCY_STEP_EVERY
            {
                c.cap += 1;
                c.last_change = now;
                if c.debt > 0 {
                    c.debt -= 1;
                } else {
                    self.inner.permits.add_permits(1);
                }
            }
        }
    }

    /// Lambda throttled an attempt with `reason`; with `adaptive`, lowers the matching limit.
    pub fn on_throttle(&self, reason: &str) {
        let config = self.config();
        if !config.adaptive {
            return;
        }
        let now = Instant::now();
        if CONCURRENCY_REASONS.contains(&reason) {
            let mut c = self.inner.lock_concurrency();
            if c.last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < CONCURRENCY_COOLDOWN)
            {
                return;
            }
            let lowered = ((c.cap as f64 * DECREASE).floor() as usize)
                .min(c.cap.saturating_sub(1))
                .max(1);
            let withdrawn = c.cap - lowered;
            c.cap = lowered;
            c.last_decrease = Some(now);
            c.last_change = now;
            // Take back what is free now; the rest is withdrawn as slots come back.
            let forgotten = self.inner.permits.forget_permits(withdrawn);
            c.debt += withdrawn - forgotten;
            tracing::warn!(
                reason,
                concurrency = lowered,
                "Lambda throttled for concurrency: lowering the concurrency cap"
            );
        } else {
            let mut r = self.inner.lock_rate();
            if r.last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < RATE_COOLDOWN)
            {
                return;
            }
            r.roll_window(now);
            let accepted = f64::from(r.accepted_prev.max(r.accepted_now));
            let mut lowered = r.rate() * DECREASE;
            if accepted > 0.0 {
                lowered = lowered.min(accepted * 0.95);
            }
            // Never raised by the floor: a configured rate below it stays the ceiling.
            r.set_rate(lowered.max(MIN_RATE.min(config.rate)), now);
            r.bucket.empty(now);
            r.last_decrease = Some(now);
            r.last_increase = now;
            tracing::warn!(
                reason,
                rate = r.rate(),
                "Lambda throttled the invoke rate: lowering the invoke rate"
            );
        }
    }
}

// `parking_lot` locks: each is held for a few arithmetic operations, never across an await,
// and does not poison — a panic elsewhere while one was held (each update is a few
// assignments of plain numbers) must not make every later invoke of the function panic too.
impl Inner {
    fn lock_config(&self) -> MutexGuard<'_, GateConfig> {
        self.config.lock()
    }

    fn lock_concurrency(&self) -> MutexGuard<'_, Concurrency> {
        self.concurrency.lock()
    }

    fn lock_rate(&self) -> MutexGuard<'_, Rate> {
        self.rate.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_concurrency: usize, rate: f64, burst: u32, adaptive: bool) -> Gate {
        Gate::new(GateConfig {
            max_concurrency,
            rate,
            burst,
            adaptive,
        })
    }

    /// Releases a slot as an invoke attempt would: its token stays spent.
    fn spend(mut slot: InvokePermit) {
        slot.mark_used();
    }

    #[tokio::test]
    async fn slots_are_capped_and_released_on_drop() {
        let gate = Gate::concurrency_only(2);
        let a = gate.acquire().await;
        let _b = gate.try_acquire().expect("second slot free");
        assert!(gate.try_acquire().is_none(), "third slot must wait");
        assert_eq!(gate.limits().in_flight, 2);
        drop(a);
        assert!(gate.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_bucket_allows_burst_then_rate() {
        let gate = gate(100, 10.0, 5, false);
        let start = Instant::now();
        for _ in 0..5 {
            spend(gate.try_acquire().expect("burst tokens"));
        }
        assert!(
            gate.try_acquire().is_none(),
            "bucket is empty after the burst"
        );
        for _ in 0..10 {
            spend(gate.acquire().await);
        }
        // Ten more tokens at 10/s take one second.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(999) && elapsed <= Duration::from_millis(1001),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_not_spent_while_waiting_for_concurrency() {
        let gate = gate(1, 1.0, 1, false);
        let held = gate.acquire().await;
        assert!(gate.try_acquire().is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(held);
        // One token accrued while the permit was busy (capacity 1): available at once.
        let start = Instant::now();
        spend(gate.acquire().await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_throttles_lower_the_rate_to_what_lambda_accepted_and_it_recovers() {
        let gate = gate(10, 50.0, 1, true);
        for _ in 0..10 {
            gate.on_accepted();
        }
        gate.on_throttle("CallerRateLimitExceeded");
        let lowered = gate.limits().rate;
        assert!(lowered <= 10.0 * 0.95 + 1e-9, "lowered to {lowered}");
        // A second throttle inside the cooldown is the same burst: no further decrease.
        gate.on_throttle("CallerRateLimitExceeded");
        assert_eq!(gate.limits().rate, lowered);
        // Quiet time: it climbs back, never past the configured rate.
        for _ in 0..200 {
            tokio::time::advance(Duration::from_secs(1)).await;
            gate.on_accepted();
        }
        assert_eq!(gate.limits().rate, 50.0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_throttles_lower_the_cap_and_withdraw_busy_permits() {
        let gate = gate(10, 1e9, u32::MAX, true);
        let slots: Vec<InvokePermit> = (0..10).map(|_| gate.try_acquire().expect("free")).collect();
        gate.on_throttle("ReservedFunctionConcurrentInvocationLimitExceeded");
        assert_eq!(gate.limits().concurrency, 7);
        drop(slots);
        let held: Vec<InvokePermit> = std::iter::from_fn(|| gate.try_acquire()).collect();
        assert_eq!(
            held.len(),
            7,
            "only the lowered cap is available once slots return"
        );
        drop(held);
        for _ in 0..4 {
            tokio::time::advance(CONCURRENCY_STEP_EVERY).await;
            gate.on_accepted();
        }
        assert_eq!(
            gate.limits().concurrency,
            10,
            "recovers to the configured cap"
        );
        let held: Vec<InvokePermit> = std::iter::from_fn(|| gate.try_acquire()).collect();
        assert_eq!(held.len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_slot_gives_its_token_back() {
        let gate = gate(2, 1.0, 1, false);
        let slot = gate.try_acquire().expect("the one token");
        drop(slot);
        let mut slot = gate.try_acquire().expect("the token came back");
        slot.mark_used();
        drop(slot);
        assert!(gate.try_acquire().is_none(), "a used token is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_moves_permits_in_place_and_withdraws_busy_ones_as_debt() {
        let gate = gate(2, 1e6, 1000, false);
        let held: Vec<InvokePermit> = std::iter::from_fn(|| gate.try_acquire()).collect();
        assert_eq!(held.len(), 2);
        // Lowered while both permits are out: nothing is free, one is owed.
        gate.reconfigure(GateConfig {
            max_concurrency: 1,
            rate: 1e6,
            burst: 1000,
            adaptive: false,
        });
        assert_eq!(gate.limits().concurrency, 1);
        drop(held);
        let held: Vec<InvokePermit> = std::iter::from_fn(|| gate.try_acquire()).collect();
        assert_eq!(held.len(), 1, "the returning permit paid the debt");
        // Raised: the same gate (and its holders) gains permits.
        gate.reconfigure(GateConfig {
            max_concurrency: 3,
            rate: 1e6,
            burst: 1000,
            adaptive: false,
        });
        let more: Vec<InvokePermit> = std::iter::from_fn(|| gate.try_acquire()).collect();
        assert_eq!(more.len(), 2, "three in all, one already held");
        assert_eq!(gate.limits().in_flight, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_keeps_the_buckets_tokens_capped_at_the_new_burst() {
        let gate = gate(100, 1.0, 10, false);
        for _ in 0..4 {
            spend(gate.try_acquire().expect("burst tokens"));
        }
        // Six tokens left; a burst of 3 caps them at 3, and the new rate refills.
        gate.reconfigure(GateConfig {
            max_concurrency: 100,
            rate: 2.0,
            burst: 3,
            adaptive: false,
        });
        for _ in 0..3 {
            spend(gate.try_acquire().expect("capped tokens"));
        }
        assert!(gate.try_acquire().is_none());
        assert_eq!(gate.time_to_next_token(), Duration::from_millis(500));
        assert_eq!(gate.config().burst, 3);
        assert_eq!(gate.limits().rate, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_sees_a_rate_raised_by_reload_within_a_second() {
        // One token per 100 s: the second acquire would wait that long at the old rate.
        let gate = gate(1, 0.01, 1, false);
        spend(gate.try_acquire().expect("the burst token"));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.reconfigure(GateConfig {
            max_concurrency: 1,
            rate: 10.0,
            burst: 1,
            adaptive: false,
        });
        let started = Instant::now();
        let slot = waiter.await.expect("the waiter gets its slot");
        assert!(
            started.elapsed() <= RECHECK,
            "took {:?} after the rate was raised",
            started.elapsed()
        );
        drop(slot);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_rates_give_clamped_waits_instead_of_panics() {
        for rate in [1e-30, 0.0, -1.0, f64::NAN, f64::MIN_POSITIVE, 1e300] {
            let gate = gate(1, rate, 1, true);
            if let Some(slot) = gate.try_acquire() {
                spend(slot);
            }
            assert!(gate.time_to_next_token() <= MAX_WAIT, "{rate}");
            gate.on_throttle("CallerRateLimitExceeded");
            gate.on_accepted();
            let waited = tokio::time::timeout(Duration::from_secs(7200), gate.acquire()).await;
            if let Ok(slot) = waited {
                spend(slot);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_throttle_empties_the_bucket_and_refills_at_the_lowered_rate() {
        let gate = gate(10, 10.0, 5, true);
        gate.on_throttle("CallerRateLimitExceeded");
        // Nothing accepted yet: the rate drops to 0.7x, and the five tokens are gone.
        assert_eq!(gate.limits().rate, 7.0);
        assert!(gate.try_acquire().is_none());
        // One token at 7/s: 1/7 s, rounded up to whole nanoseconds.
        assert_eq!(gate.time_to_next_token(), Duration::from_nanos(142_857_143));
        tokio::time::advance(Duration::from_nanos(142_857_143)).await;
        spend(
            gate.try_acquire()
                .expect("the first token after the throttle"),
        );
    }

    #[tokio::test]
    async fn non_adaptive_gates_ignore_throttles() {
        let gate = gate(4, 8.0, 15, false);
        gate.on_throttle("CallerRateLimitExceeded");
        gate.on_throttle("ReservedFunctionConcurrentInvocationLimitExceeded");
        assert_eq!(
            gate.limits(),
            Limits {
                concurrency: 4,
                rate: 8.0,
                in_flight: 0
            }
        );
    }
}
