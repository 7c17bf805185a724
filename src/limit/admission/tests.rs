//! Admission: plan lookup, layer order, the key cap, reclaim and reload carry-over, against
//! a fake clock.

use governor::clock::FakeRelativeClock;

use super::*;
use crate::limit::CLOSED_WAIT;

const DEFAULT: Quota = Quota {
    rate: 1.0,
    burst: 2,
};
const GOLD: Quota = Quota {
    rate: 10.0,
    burst: 5,
};

fn plans() -> Plans {
    Plans::new(
        DEFAULT,
        vec![("gold".into(), GOLD, vec!["gold-1".into(), "gold-2".into()])],
    )
}

fn admission(
    global: Option<Quota>,
    route: Option<Quota>,
    max_keys: usize,
) -> (Admission<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let a = Admission::new(
        global,
        vec![("records".into(), route), ("other".into(), None)],
        plans(),
        max_keys,
        clock.clone(),
    );
    (a, clock)
}

#[test]
fn plan_keys_get_their_plan_and_other_keys_the_default() {
    let (a, _clock) = admission(None, None, 100);
    let gold = a.check(0, "gold-1").expect("full bucket");
    assert_eq!(gold.quota, GOLD);
    assert_eq!(gold.remaining, 4);
    assert_eq!(gold.reset, Duration::from_millis(100));
    let anon = a.check(0, "someone").expect("full bucket");
    assert_eq!(
        anon,
        Admitted {
            usage: None,
            quota: DEFAULT,
            remaining: 1,
            reset: Duration::from_secs(1)
        }
    );
    assert_eq!(a.plan_of("gold-2"), Some("gold"));
    assert_eq!(a.plan_of("someone"), None);
    assert_eq!(a.tracked_keys(), 2);
}

#[test]
fn layers_are_checked_global_then_route_then_key() {
    let global = Quota {
        rate: 1.0,
        burst: 4,
    };
    let route = Quota {
        rate: 1.0,
        burst: 3,
    };
    let (a, clock) = admission(Some(global), Some(route), 100);
    // Key layer refuses first (default burst 2) …
    a.check(0, "k").expect("1st");
    a.check(0, "k").expect("2nd");
    let r = a.check(0, "k").expect_err("key bucket empty");
    assert_eq!(
        r,
        Rejected {
            usage: None,
            scope: Scope::Key,
            quota: DEFAULT,
            wait: Duration::from_millis(1000)
        }
    );
    // … and its refusal still spent route and global tokens (not returned, as in API
    // Gateway): route has 0 left, so another key is refused by the route layer.
    let r = a.check(0, "k2").expect_err("route bucket empty");
    assert_eq!(r.scope, Scope::Route);
    assert_eq!(r.quota, route);
    assert_eq!(r.wait, Duration::from_secs(1));
    // The second route has no route layer, but the global bucket is empty: each of the
    // four checks above took a global token, refused or not.
    let r = a.check(1, "k3").expect_err("global bucket empty");
    assert_eq!(
        r,
        Rejected {
            usage: None,
            scope: Scope::Global,
            quota: global,
            wait: Duration::from_secs(1)
        }
    );
    clock.advance(Duration::from_secs(1));
    assert!(a.check(1, "k3").is_ok());
}

#[test]
fn unknown_keys_checked_with_is_known_key_create_no_state() {
    let (a, _clock) = admission(None, None, 100);
    for i in 0..1000 {
        assert!(!a.is_known_key(&format!("intruder-{i}")));
        assert_eq!(a.plan_of(&format!("intruder-{i}")), None);
    }
    assert!(a.is_known_key("gold-1"));
    assert_eq!(a.tracked_keys(), 0);
}

#[test]
fn cap_holds_under_spraying_and_plan_keys_never_overflow() {
    let max_keys = 500;
    let (a, _clock) = admission(None, None, max_keys);
    for i in 0..10 * max_keys {
        let _ = a.check(0, &format!("{i:x}"));
        assert!(a.tracked_keys() <= max_keys);
    }
    assert_eq!(a.tracked_keys(), max_keys);
    assert_eq!(a.overflowed(), 9 * max_keys as u64);
    // Past the cap, new keys without a plan share one default-quota bucket, now empty …
    let r = a
        .check(0, "late-comer")
        .expect_err("overflow bucket drained by the spray");
    assert_eq!(r.quota, DEFAULT);
    // … but a paying key still gets its own full bucket.
    let gold = a
        .check(0, "gold-1")
        .expect("plan keys always get their own bucket");
    assert_eq!(gold.remaining, 4);
    assert_eq!(a.tracked_keys(), max_keys + 1);
}

#[test]
fn reclaim_covers_every_keyed_layer() {
    let (a, clock) = admission(None, None, 100);
    a.check(0, "gold-1").expect("full");
    a.check(0, "x").expect("full");
    assert_eq!(a.tracked_keys(), 2);
    clock.advance(Duration::from_secs(10));
    a.reclaim();
    assert_eq!(a.tracked_keys(), 0);
    let again = a.check(0, "x").expect("reclaimed key starts full");
    assert_eq!(again.remaining, DEFAULT.burst - 1);
}

#[test]
fn closed_layers_refuse_with_the_closed_wait() {
    let closed = Quota {
        rate: 0.0,
        burst: 10,
    };
    let (a, _clock) = admission(Some(closed), None, 100);
    assert_eq!(
        a.check(0, "k"),
        Err(Rejected {
            usage: None,
            scope: Scope::Global,
            quota: closed,
            wait: CLOSED_WAIT
        })
    );
    let clock = FakeRelativeClock::default();
    let a = Admission::new(
        None,
        vec![("r".into(), None)],
        Plans::new(
            Quota {
                rate: 5.0,
                burst: 0,
            },
            vec![],
        ),
        100,
        clock,
    );
    assert_eq!(
        a.check(0, "k").expect_err("closed default").wait,
        CLOSED_WAIT
    );
    assert_eq!(a.tracked_keys(), 0);
}

#[test]
fn route_index_finds_routes_by_name() {
    let (a, _clock) = admission(None, None, 1);
    assert_eq!(a.route_index("records"), Some(0));
    assert_eq!(a.route_index("other"), Some(1));
    assert_eq!(a.route_index("nope"), None);
}

fn reconfigure(
    a: &Admission<FakeRelativeClock>,
    global: Option<Quota>,
    route: Option<Quota>,
    gold: Quota,
    max_keys: usize,
) -> Admission<FakeRelativeClock> {
    a.reconfigured(
        global,
        vec![("records".into(), route), ("other".into(), None)],
        Plans::new(
            DEFAULT,
            vec![("gold".into(), gold, vec!["gold-1".into(), "gold-2".into()])],
        ),
        max_keys,
    )
}

#[test]
fn reconfigured_keeps_the_state_of_unchanged_layers_and_starts_changed_ones_full() {
    let global = Quota {
        rate: 1.0,
        burst: 100,
    };
    let route = Quota {
        rate: 1.0,
        burst: 3,
    };
    let (a, clock) = admission(Some(global), Some(route), 100);
    // Empty the route bucket, key "k"'s default bucket and gold-1's plan bucket.
    for key in ["x1", "x2", "x3"] {
        a.check(0, key).expect("route bucket has 3");
    }
    assert_eq!(
        a.check(0, "x4").expect_err("route empty").scope,
        Scope::Route
    );
    a.check(1, "k").expect("1st");
    a.check(1, "k").expect("2nd");
    assert_eq!(a.check(1, "k").expect_err("key empty").scope, Scope::Key);
    for _ in 0..GOLD.burst {
        a.check(1, "gold-1").expect("gold has 5");
    }
    let used_global = 3 + 1 + 3 + GOLD.burst;

    let gold = Quota {
        rate: 10.0,
        burst: 7,
    };
    let b = reconfigure(&a, Some(global), Some(route), gold, 100);
    // Unchanged: global, the route, the default key layer — same tokens as before.
    assert_eq!(
        b.check(0, "y").expect_err("still empty").scope,
        Scope::Route
    );
    let r = b.check(1, "k").expect_err("k's bucket carried over");
    assert_eq!((r.scope, r.wait), (Scope::Key, Duration::from_secs(1)));
    // Changed: the gold plan starts full, with its new quota.
    let g = b.check(1, "gold-1").expect("fresh plan bucket");
    assert_eq!((g.quota, g.remaining), (gold, gold.burst - 1));
    // The global bucket went on counting across the reload: of its 100 tokens, `a` took
    // `used_global` and `b` three so far.
    let mut more = 0;
    let refusal = loop {
        match b.check(1, &format!("fresh-{more}")) {
            Ok(_) => more += 1,
            Err(r) => break r,
        }
    };
    assert_eq!(refusal.scope, Scope::Global);
    assert_eq!(more, global.burst - used_global - 3);
    // Old and new draw from the same carried-over buckets, and share the clock's refill.
    clock.advance(Duration::from_secs(1));
    a.check(0, "y").expect("one route token refilled");
    assert_eq!(
        b.check(0, "y2").expect_err("a took it").scope,
        Scope::Global
    );
}

#[test]
fn reconfigured_matches_layers_by_name_and_quota() {
    let route = Quota {
        rate: 1.0,
        burst: 1,
    };
    let (a, _clock) = admission(None, Some(route), 100);
    a.check(0, "k").expect("route has 1");
    // Same quota, same name: carried over.
    let same = reconfigure(&a, None, Some(route), GOLD, 100);
    assert_eq!(
        same.check(0, "k2").expect_err("carried").scope,
        Scope::Route
    );
    // Changed quota: fresh.
    let faster = Quota {
        rate: 2.0,
        burst: 1,
    };
    let changed = reconfigure(&a, None, Some(faster), GOLD, 100);
    assert!(changed.check(0, "k3").is_ok());
    // A route that did not exist before, or lost its layer and got it back: fresh.
    let renamed = a.reconfigured(None, vec![("renamed".into(), Some(route))], plans(), 100);
    assert!(renamed.check(0, "k4").is_ok());
    // A new global layer starts full (its one token goes to the request the carried-over
    // route bucket then refuses).
    let with_global = reconfigure(&a, Some(route), Some(route), GOLD, 100);
    assert_eq!(
        with_global
            .check(0, "k5")
            .expect_err("route still empty")
            .scope,
        Scope::Route
    );
    assert_eq!(
        with_global.check(1, "k6").expect_err("global spent").scope,
        Scope::Global
    );
}

#[test]
fn reconfigured_shares_the_key_budget_with_its_new_bound() {
    let (a, clock) = admission(None, None, 3);
    a.check(0, "gold-1").expect("plan key");
    a.check(0, "x").expect("tracked");
    a.check(0, "y").expect("tracked");
    assert_eq!(a.tracked_keys(), 3);
    // Gold's quota changes: its layer (1 key) is replaced; the default layer is kept.
    let gold = Quota {
        rate: 1.0,
        burst: 1,
    };
    let b = reconfigure(&a, None, None, gold, 4);
    assert_eq!(
        b.tracked_keys(),
        3,
        "the old gold layer still exists in `a`"
    );
    drop(a);
    assert_eq!(b.tracked_keys(), 2, "dropping it gave its slot back");
    b.check(0, "z").expect("room under the new bound");
    b.check(0, "w").expect("room under the new bound");
    assert_eq!(b.tracked_keys(), 4);
    assert!(b.check(0, "v").is_ok(), "overflow bucket, not a new slot");
    assert_eq!(b.tracked_keys(), 4);
    assert_eq!(b.overflowed(), 1);
    // A lower bound evicts nobody; reclaim brings the count down.
    let c = reconfigure(&b, None, None, gold, 1);
    assert_eq!(c.tracked_keys(), 4);
    clock.advance(Duration::from_secs(60));
    c.reclaim();
    assert_eq!(c.tracked_keys(), 0);
    assert_eq!(c.overflowed(), 1, "the overflow count is carried over");
}

#[test]
fn admission_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Admission<FakeRelativeClock>>();
    assert_send_sync::<Admission>();
}

/// Usage quotas against a fake wall clock (periods) and governor's fake clock (buckets).
mod usage_quotas {
    use super::*;
    use crate::limit::WallClock;
    use crate::usage::{Period, UsageQuota};

    const DAY: u64 = 86_400;
    /// The gold plan's bucket here: never the layer that refuses.
    const ROOMY: Quota = Quota {
        rate: 1000.0,
        burst: 1000,
    };
    /// 2026-12-01 (a Tuesday) 04:00 UTC.
    const TUESDAY_4AM: u64 = 1_796_097_600;
    /// 2024-02-29 23:59:59 UTC: the last second of a leap February.
    const LEAP_DAY_END: u64 = 1_709_251_199;

    fn quota(limit: u64, period: Period, offset: u32) -> UsageQuota {
        UsageQuota {
            limit,
            period,
            offset,
        }
    }

    /// Gold keys: `gold` usage quota; other keys: `default`. Generous buckets unless said.
    fn admission(
        default_bucket: Quota,
        gold: Option<UsageQuota>,
        default: Option<UsageQuota>,
        at: u64,
    ) -> (Admission<FakeRelativeClock>, WallClock, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let wall = WallClock::fake(Duration::from_secs(at));
        let plans = Plans::new(
            default_bucket,
            vec![("gold".into(), ROOMY, vec!["gold-1".into()])],
        )
        .with_usage_quotas(default, [gold]);
        let a = Admission::new(
            None,
            vec![("records".into(), None)],
            plans,
            100,
            clock.clone(),
        )
        .with_wall_clock(wall.clone());
        (a, wall, clock)
    }

    #[test]
    fn the_quota_refuses_past_its_limit_until_the_next_period_starts() {
        // A week starting on Monday (offset 1): from Tuesday 04:00 the next period starts
        // on Monday 2026-12-07 00:00, 5 days and 20 hours away.
        let (a, wall, _clock) =
            admission(DEFAULT, Some(quota(3, Period::Week, 1)), None, TUESDAY_4AM);
        for used in 1..=3 {
            let admitted = a.check(0, "gold-1").expect("under the quota");
            let usage = admitted.usage.expect("gold has a quota");
            assert_eq!((usage.used, usage.left()), (used, 3 - used));
            assert_eq!(usage.period_secs, 7 * DAY);
        }
        let to_monday = Duration::from_secs(5 * DAY + 20 * 3600);
        let refused = a.check(0, "gold-1").expect_err("quota used up");
        assert_eq!(refused.scope, Scope::Quota);
        assert_eq!(
            refused.wait, to_monday,
            "Retry-After runs to the period's end"
        );
        assert_eq!(refused.quota, ROOMY);
        assert_eq!(
            refused.usage.map(|u| (u.used, u.reset)),
            Some((3, to_monday))
        );
        // One second before Monday: still refused; at Monday 00:00 a new period.
        wall.advance(to_monday - Duration::from_secs(1));
        assert_eq!(
            a.check(0, "gold-1").map_err(|r| (r.scope, r.wait)),
            Err((Scope::Quota, Duration::from_secs(1)))
        );
        wall.advance(Duration::from_secs(1));
        let admitted = a.check(0, "gold-1").expect("a new period");
        assert_eq!(admitted.usage.map(|u| u.used), Some(1));
        // Keys without a quota never count.
        assert_eq!(a.check(0, "someone").expect("bucket").usage, None);
        assert_eq!(a.usage_of("someone"), None);
    }

    #[test]
    fn only_requests_every_bucket_admitted_count_against_the_quota() {
        // Keys without a plan: a bucket of 2 that refills once an hour, a quota of 10 a day.
        let slow = Quota {
            rate: 1.0 / 3600.0,
            burst: 2,
        };
        let (a, _wall, clock) = admission(slow, None, Some(quota(10, Period::Day, 0)), TUESDAY_4AM);
        let outcomes: Vec<_> = (0..6)
            .map(|_| a.check(0, "k").map_err(|r| r.scope))
            .collect();
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 2);
        assert!(outcomes[2..].iter().all(|o| *o == Err(Scope::Key)));
        assert_eq!(
            a.usage_of("k").map(|u| u.used),
            Some(2),
            "shed requests used none"
        );
        clock.advance(Duration::from_secs(3600));
        assert_eq!(
            a.check(0, "k").expect("refilled").usage.map(|u| u.used),
            Some(3)
        );
    }

    #[test]
    fn a_month_resets_at_the_first_of_the_next_month_after_a_leap_day() {
        let (a, wall, _clock) = admission(
            DEFAULT,
            Some(quota(2, Period::Month, 0)),
            None,
            LEAP_DAY_END,
        );
        a.check(0, "gold-1").expect("1 of 2");
        a.check(0, "gold-1").expect("2 of 2");
        let refused = a.check(0, "gold-1").expect_err("used up");
        assert_eq!(
            refused.wait,
            Duration::from_secs(1),
            "March starts in a second"
        );
        assert_eq!(refused.usage.map(|u| u.period_secs), Some(29 * DAY));
        wall.advance(Duration::from_secs(1));
        let march = a.check(0, "gold-1").expect("March");
        assert_eq!(
            march.usage.map(|u| (u.used, u.period_secs)),
            Some((1, 31 * DAY))
        );
    }

    #[test]
    fn a_reload_that_changes_the_limit_keeps_the_used_count() {
        let (a, _wall, _clock) =
            admission(DEFAULT, Some(quota(3, Period::Day, 0)), None, TUESDAY_4AM);
        for _ in 0..3 {
            a.check(0, "gold-1").expect("under the quota");
        }
        assert_eq!(a.check(0, "gold-1").map_err(|r| r.scope), Err(Scope::Quota));
        let reload = |limit| {
            a.reconfigured(
                None,
                vec![("records".into(), None)],
                Plans::new(DEFAULT, vec![("gold".into(), ROOMY, vec!["gold-1".into()])])
                    .with_usage_quotas(None, [Some(quota(limit, Period::Day, 0))]),
                100,
            )
        };
        let raised = reload(5);
        assert_eq!(
            raised
                .check(0, "gold-1")
                .expect("4 of 5")
                .usage
                .map(|u| u.used),
            Some(4)
        );
        assert_eq!(
            raised
                .check(0, "gold-1")
                .expect("5 of 5")
                .usage
                .map(|u| u.used),
            Some(5)
        );
        let refused = raised.check(0, "gold-1").expect_err("5 of 5 used");
        assert_eq!(refused.usage.map(|u| (u.used, u.quota.limit)), Some((5, 5)));
        let lowered = raised.reconfigured(
            None,
            vec![("records".into(), None)],
            Plans::new(DEFAULT, vec![("gold".into(), ROOMY, vec!["gold-1".into()])])
                .with_usage_quotas(None, [Some(quota(2, Period::Day, 0))]),
            100,
        );
        assert_eq!(
            lowered.usage_of("gold-1").map(|u| (u.used, u.left())),
            Some((5, 0))
        );
        assert_eq!(
            lowered.check(0, "gold-1").map_err(|r| r.scope),
            Err(Scope::Quota)
        );
    }

    #[test]
    fn reclaim_drops_counts_of_past_periods() {
        let (a, wall, _clock) =
            admission(DEFAULT, None, Some(quota(5, Period::Day, 0)), TUESDAY_4AM);
        a.check(0, "a").expect("counted");
        a.check(0, "b").expect("counted");
        assert_eq!(a.usage_counters().len(), 2);
        a.reclaim();
        assert_eq!(a.usage_counters().len(), 2, "still this period");
        wall.advance(Duration::from_secs(DAY));
        a.reclaim();
        assert!(a.usage_counters().is_empty());
    }
}
