//! The batcher against a real `redis-server`: requests made together share one script call
//! and each gets the verdict a call of its own would have given; a late batch is each
//! caller's own missed deadline.

#[path = "../../tests/redis_support/delay_proxy.rs"]
mod delay_proxy;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use self::delay_proxy::DelayProxy;
use super::tests::support::RedisServer;
use super::{Fallback, RedisBackend, RedisOptions, DENY_WAIT};
use crate::limit::{Admission, Plans, Quota, Rejected, Scope, TokioClock, WallClock};
use crate::usage::{Period, UsageQuota};

const WIDE: Quota = Quota {
    rate: 1e6,
    burst: 1_000_000,
};

/// A backend on `url` with prefix `prefix`, a generous deadline (decisions, not speed, on a
/// loaded machine) unless `timeout` says otherwise.
async fn connect(url: String, prefix: &str, timeout: Option<Duration>) -> RedisBackend {
    let options = RedisOptions {
        timeout: timeout.unwrap_or(Duration::from_secs(5)),
        fallback: Fallback::Deny,
        prefix: prefix.to_owned(),
        down_after: 6,
        ..RedisOptions::new(url)
    };
    RedisBackend::connect(options).await.expect("valid URL")
}

/// Runs `calls` as tasks of this (current-thread) runtime, which first polls them in the
/// order given — so they queue their script calls in that order, all before the batching
/// task runs — and returns their answers in that order.
async fn in_order<F>(calls: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    join_all(tasks)
        .await
        .into_iter()
        .map(|answer| answer.expect("the call does not panic"))
        .collect()
}

/// The requests all queue before the batching task runs (see [`in_order`]): the batches
/// are cut at exactly 256, 256 and 88.
#[tokio::test]
async fn concurrent_admits_on_one_key_admit_exactly_the_burst_in_batched_calls() {
    let server = RedisServer::start();
    let backend = connect(server.url(), "burst", None).await;
    let burst = 37u32;
    let plans = Plans::new(Quota { rate: 0.001, burst }, vec![]);
    let admission = Arc::new(
        Admission::new(
            Some(WIDE),
            vec![("r".into(), Some(WIDE))],
            plans,
            100,
            TokioClock,
        )
        .with_backend(Some(backend.clone())),
    );
    // Loads the batch script: three batches meeting its `NOSCRIPT` at once would each load
    // it and retry, and the retries need not keep their order.
    let warm = in_order((0..2).map(|_| admission.admit(0, "warm-up"))).await;
    assert!(warm.iter().all(Result::is_ok));
    assert_eq!(
        backend.batch_stats(),
        Some((1, 2)),
        "(calls, largest batch)"
    );

    let decisions = in_order((0..600).map(|_| admission.admit(0, "k"))).await;
    assert_eq!(backend.batch_stats(), Some((4, 256)));
    // In queue order: the first `burst` take the key's tokens, counting down; every other
    // is refused by the key layer (not the fallback, which would say `global`).
    for (i, decision) in decisions.iter().enumerate() {
        match decision {
            Ok(admitted) if i < burst as usize => {
                assert_eq!(admitted.remaining, burst - 1 - i as u32, "request {i}")
            }
            Err(Rejected { scope, wait, .. }) if i >= burst as usize => {
                assert_eq!(*scope, Scope::Key, "request {i}");
                assert!(*wait > Duration::from_secs(900), "request {i}: {wait:?}");
            }
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert!(backend.is_up());
}

/// A daily usage quota of `limit`.
fn day(limit: u64) -> UsageQuota {
    UsageQuota {
        limit,
        period: Period::Day,
        offset: 0,
    }
}

/// Global and route layers (route 0 limited, route 1 open), default keys with a bucket of 3
/// and a quota of 4, plan `gold` (key `gold-1`) with a bucket of 4 and a quota of 3, plan
/// `shut` (key `shut-1`) a closed layer.
fn mixed(backend: RedisBackend, wall: &WallClock) -> Arc<Admission<TokioClock>> {
    let plans = Plans::new(
        Quota {
            rate: 0.5,
            burst: 3,
        },
        vec![
            (
                "gold".into(),
                Quota {
                    rate: 10.0,
                    burst: 4,
                },
                vec!["gold-1".into()],
            ),
            (
                "shut".into(),
                Quota {
                    rate: 0.0,
                    burst: 4,
                },
                vec!["shut-1".into()],
            ),
        ],
    )
    .with_usage_quotas(Some(day(4)), [Some(day(3)), None]);
    let routes = vec![
        (
            "limited".into(),
            Some(Quota {
                rate: 2.0,
                burst: 5,
            }),
        ),
        ("open".into(), None),
    ];
    Arc::new(
        Admission::new(
            Some(Quota {
                rate: 8.0,
                burst: 12,
            }),
            routes,
            plans,
            100,
            TokioClock,
        )
        .with_wall_clock(wall.clone())
        .with_backend(Some(backend)),
    )
}

/// Every key and its value in `server`.
async fn dump(server: &RedisServer) -> Vec<(String, String)> {
    let mut conn = ::redis::Client::open(server.url())
        .expect("valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    let mut keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("mixed:*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    keys.retain(|k| !k.ends_with(":replicas"));
    keys.sort();
    let mut dump = Vec::new();
    for key in keys {
        let value: String = ::redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        dump.push((key, value));
    }
    dump
}

/// One batch of requests over several keys, both routes, usage counters (used up), a closed
/// layer and refusals at every layer, at logical instants 37 ms apart (buckets refill
/// between them), against the same requests one at a time on a fresh Redis: the same
/// answers, to the nanosecond, and the same state left in Redis.
#[tokio::test]
async fn a_batch_mixing_keys_and_usage_counters_decides_as_lone_calls() {
    const KEYS: [&str; 5] = ["a", "b", "gold-1", "shut-1", "-"];
    let requests: Vec<(usize, &str)> = (0..90usize)
        .map(|i| ((i / 3) % 2, KEYS[(i * 7 + i / 5) % KEYS.len()]))
        .collect();
    let epoch = Duration::from_secs(1_700_000_000);
    let at = |i: usize| Some(epoch + Duration::from_millis(37) * i as u32);
    let wall = WallClock::fake(WallClock::system().now());

    let batched_server = RedisServer::start();
    let batched_backend = connect(batched_server.url(), "mixed", None).await;
    let batched = mixed(batched_backend.clone(), &wall);
    let together = in_order(
        requests
            .iter()
            .enumerate()
            .map(|(i, &(route, key))| Arc::clone(&batched).check_shared(route, key.into(), at(i))),
    )
    .await;
    assert_eq!(batched_backend.batch_stats(), Some((1, requests.len())));

    let lone_server = RedisServer::start();
    let lone_backend = connect(lone_server.url(), "mixed", None).await;
    let lone = mixed(lone_backend.clone(), &wall);
    let mut alone = Vec::new();
    for (i, &(route, key)) in requests.iter().enumerate() {
        alone.push(
            Arc::clone(&lone)
                .check_shared(route, key.into(), at(i))
                .await,
        );
    }
    assert_eq!(lone_backend.batch_stats(), Some((requests.len() as u64, 1)));

    for (i, (batched, lone)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(batched, lone, "request {i}: {:?}", requests[i]);
    }
    // The sequence covers what it claims to.
    let scopes: Vec<_> = alone
        .iter()
        .filter_map(|d| d.err().map(|r| r.scope))
        .collect();
    for scope in [Scope::Global, Scope::Route, Scope::Key, Scope::Quota] {
        assert!(
            scopes.contains(&scope),
            "{scope:?} never refused: {scopes:?}"
        );
    }
    assert!(alone.iter().any(|d| d.is_ok_and(|a| a.usage.is_some())));
    let admitted = alone.iter().filter(|d| d.is_ok()).count();
    assert!(admitted >= 10, "{admitted} admitted, refused: {scopes:?}");

    let state = dump(&batched_server).await;
    assert!(
        state.iter().any(|(k, _)| k.starts_with("mixed:q:")),
        "{state:?}"
    );
    assert_eq!(state, dump(&lone_server).await);
    assert!(batched_backend.is_up() && lone_backend.is_up());
}

/// Five callers whose batch is later than `redis_timeout`: each is answered by the fallback
/// at its own deadline and counts one failure — with `redis_down_after = 6` the backend stays
/// up after five, and the sixth takes it down.
#[tokio::test]
async fn callers_of_a_late_batch_each_fall_back_and_count_one_failure() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(server.port()).await;
    let timeout = Duration::from_millis(100);
    let backend = connect(proxy.url(), "late", Some(timeout)).await;
    assert!(backend.is_up());
    let admission = Arc::new(
        Admission::new(
            None,
            vec![("r".into(), None)],
            Plans::new(WIDE, vec![]),
            100,
            TokioClock,
        )
        .with_backend(Some(backend.clone())),
    );
    proxy.set_delay(Duration::from_millis(400));
    let denied = Err(Rejected {
        scope: Scope::Global,
        quota: WIDE,
        wait: DENY_WAIT,
        usage: None,
    });

    let started = tokio::time::Instant::now();
    let decisions = join_all((0..5).map(|_| admission.admit(0, "k"))).await;
    let waited = started.elapsed();
    assert_eq!(decisions, vec![denied; 5]);
    assert!(
        (timeout..Duration::from_millis(400)).contains(&waited),
        "each caller waited its own deadline: {waited:?}"
    );
    assert_eq!(backend.batch_stats(), Some((1, 5)));
    assert!(backend.is_up(), "five failures of six");

    assert_eq!(admission.admit(0, "k").await, denied);
    assert!(!backend.is_up(), "the sixth consecutive failure");
}
