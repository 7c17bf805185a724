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
