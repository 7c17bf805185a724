//! The gate every invoke passes: a concurrency permit per in-flight invoke.
//!
//! A [`Slot`] is an owned permit; dropping it frees the slot, so a cancelled invoke
//! (its task dropped) never leaks capacity.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Capacity to invoke one function: `max_concurrency` permits.
#[derive(Clone, Debug)]
pub struct Gate {
    permits: Arc<Semaphore>,
    max_concurrency: usize,
}

/// The right to run one invoke; released on drop.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Gate {
    pub fn new(max_concurrency: usize) -> Self {
        Gate {
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
        }
    }

    /// Waits for a slot. Cancel-safe: dropping the future gives up its place in the
    /// semaphore's FIFO queue and takes nothing.
    pub async fn acquire(&self) -> Slot {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed");
        Slot { _permit: permit }
    }

    /// A slot if one is free right now.
    pub fn try_acquire(&self) -> Option<Slot> {
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .ok()
            .map(|permit| Slot { _permit: permit })
    }

    /// Invokes in flight.
    pub fn in_flight(&self) -> usize {
        self.max_concurrency - self.permits.available_permits()
    }

    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_capped_and_released_on_drop() {
        let gate = Gate::new(2);
        let a = gate.acquire().await;
        let _b = gate.try_acquire().expect("second slot free");
        assert!(gate.try_acquire().is_none(), "third slot must wait");
        assert_eq!(gate.in_flight(), 2);
        drop(a);
        assert!(gate.try_acquire().is_some());
    }
}
