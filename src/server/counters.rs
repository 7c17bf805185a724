//! The data plane's request counters: `sluicegate_requests_total{route,status,scope}` and
//! `sluicegate_admission_rejections_total{scope}`, one fixed slot per [`Answer`]; and, for
//! bulk requests, `sluicegate_bulk_requests_total{route,status}` and
//! `sluicegate_bulk_records_total{route}`.
//!
//! `sluicegate_requests_total` counts answers about records: one per `/records` request,
//! one per entry of a bulk answer (as if the record had been sent alone), and one per bulk
//! request refused as a whole.

use std::sync::Arc;

use http::StatusCode;

use super::respond::{Answer, Response, ShedScope};

/// `sluicegate_requests_total{route,status,scope}` and admission rejections by scope.
///
/// Counter handles are looked up once per (status, scope) and cached per route: the label
/// strings are not rebuilt, and the registry not searched, on every request. Every
/// [`Answer`] has a fixed slot, read without a lock (both cores count at once); a response
/// that is none of them (none today) goes to a short locked list.
pub(super) struct RouteCounters {
    route: Arc<str>,
    slots: [std::sync::OnceLock<Cell>; COUNTER_SLOTS.len()],
    others: parking_lot::RwLock<Vec<(CounterKey, Cell)>>,
    /// `sluicegate_bulk_requests_total{route,status}`, by status; a bulk request is answered
    /// with few distinct statuses, so a short list.
    bulk_requests: parking_lot::RwLock<Vec<(StatusCode, metrics::Counter)>>,
    /// `sluicegate_bulk_records_total{route}`.
    bulk_records: std::sync::OnceLock<metrics::Counter>,
}

/// What a response is counted by: its status and, for a shed, its scope.
type CounterKey = (StatusCode, Option<ShedScope>);

/// One slot per [`Answer`], in the order of [`Answer::ALL`]: built from that list, so an
/// answer and its counter cannot drift apart.
const COUNTER_SLOTS: [CounterKey; Answer::ALL.len()] = {
    let mut slots = [(StatusCode::OK, None); Answer::ALL.len()];
    let mut i = 0;
    while i < slots.len() {
        slots[i] = (Answer::ALL[i].status(), Answer::ALL[i].scope());
        i += 1;
    }
    slots
};

#[derive(Clone)]
struct Cell {
    requests: metrics::Counter,
    /// `sluicegate_admission_rejections_total{scope}` for admission refusals.
    rejections: Option<metrics::Counter>,
}

impl RouteCounters {
    pub(super) fn new(route: &str) -> Self {
        RouteCounters {
            route: route.into(),
            slots: Default::default(),
            others: Default::default(),
            bulk_requests: Default::default(),
            bulk_records: Default::default(),
        }
    }

    pub(super) fn count(&self, response: &Response) {
        // An Invoke API answer names the `/records` answer it stands for: its own status is
        // Lambda's (an unknown outcome is a `200` there), the counters keep the contract's.
        let key = match response.extensions().get::<Answer>() {
            Some(answer) => (answer.status(), answer.scope()),
            None => (
                response.status(),
                response.extensions().get::<ShedScope>().copied(),
            ),
        };
        self.count_key(key);
    }

    /// Counts one record's answer given without a response of its own (a bulk entry).
    pub(super) fn count_answer(&self, answer: Answer) {
        self.count_key((answer.status(), answer.scope()));
    }

    /// Counts a bulk request answered with `status`, carrying `records` records (`0` when
    /// it was refused as a whole).
    pub(super) fn count_bulk(&self, status: StatusCode, records: usize) {
        let known = self
            .bulk_requests
            .read()
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, counter)| counter.clone());
        let requests = known.unwrap_or_else(|| {
            let counter = metrics::counter!(
                "sluicegate_bulk_requests_total",
                "route" => self.route.to_string(),
                "status" => status.as_u16().to_string()
            );
            self.bulk_requests.write().push((status, counter.clone()));
            counter
        });
        requests.increment(1);
        if records > 0 {
            self.bulk_records
                .get_or_init(|| {
                    metrics::counter!(
                        "sluicegate_bulk_records_total",
                        "route" => self.route.to_string()
                    )
                })
                .increment(records as u64);
        }
    }

    fn count_key(&self, key: CounterKey) {
        match COUNTER_SLOTS.iter().position(|slot| *slot == key) {
            Some(slot) => self.slots[slot].get_or_init(|| self.cell(key)).increment(),
            None => self.other(key).increment(),
        }
    }

    #[cold]
    fn other(&self, key: CounterKey) -> Cell {
        let known = self
            .others
            .read()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, cell)| cell.clone());
        known.unwrap_or_else(|| {
            let cell = self.cell(key);
            self.others.write().push((key, cell.clone()));
            cell
        })
    }

    fn cell(&self, (status, scope): CounterKey) -> Cell {
        Cell {
            requests: metrics::counter!(
                "sluicegate_requests_total",
                "route" => self.route.to_string(),
                "status" => status.as_u16().to_string(),
                "scope" => scope.map_or("none", ShedScope::as_str)
            ),
            rejections: match scope {
                Some(ShedScope::Limit(scope)) => Some(metrics::counter!(
                    "sluicegate_admission_rejections_total",
                    "scope" => scope.as_str()
                )),
                _ => None,
            },
        }
    }
}

impl Cell {
    fn increment(&self) {
        self.requests.increment(1);
        if let Some(rejections) = &self.rejections {
            rejections.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::respond;

    #[test]
    fn every_answer_has_its_own_counter_slot() {
        for (i, slot) in COUNTER_SLOTS.iter().enumerate() {
            assert!(!COUNTER_SLOTS[..i].contains(slot), "{slot:?} has two slots");
        }
        for scope in ShedScope::ALL {
            assert!(Answer::ALL.contains(&Answer::Shed(scope)), "{scope:?}");
        }
    }

    #[test]
    fn every_request_error_is_counted_in_its_answers_slot() {
        for (error, _, _) in respond::every_request_error() {
            let counters = RouteCounters::new("r");
            let answer = error.answer();
            counters.count(&error.into_response());
            let slot = Answer::ALL
                .iter()
                .position(|a| *a == answer)
                .expect("every answer is listed");
            assert!(counters.slots[slot].get().is_some(), "{answer:?}");
            assert!(counters.others.read().is_empty(), "{answer:?}");
        }
    }

    #[test]
    fn a_response_that_is_no_answer_is_still_counted() {
        let counters = RouteCounters::new("r");
        let mut teapot = respond::healthy();
        *teapot.status_mut() = StatusCode::IM_A_TEAPOT;
        counters.count(&teapot);
        assert!(counters.slots.iter().all(|slot| slot.get().is_none()));
        assert_eq!(counters.others.read().len(), 1);
    }
}
