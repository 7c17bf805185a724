//! The Redis backend against a real `redis-server` (each test starts its own on a free port):
//! the script decides exactly like the local engine, keys expire when full, a dead Redis is
//! bypassed at once under each fallback policy and found again, and invoke buckets are shared.
//!
//! These tests drive the backend through its two users — admission (`limit`) and the invoke
//! gate (`invoke`) — because its contract is theirs: the only arrows from `backend` up to
//! them are here, in test code.

#[path = "../../tests/redis_support/mod.rs"]
pub(super) mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tokio::time::Instant;

use self::support::RedisServer;
use super::{Fallback, RedisBackend, RedisOptions, DENY_WAIT};
use crate::invoke::{Gate, GateConfig};
use crate::limit::{Admission, Admit, Admitted, Plans, Rejected, Scope, TokioClock};
use crate::quota::{Decision, Quota, CLOSED_WAIT};

/// A backend on `server` whose keys start with a prefix no other backend of the test uses.
/// The deadline is generous: these tests check decisions, not speed, on a loaded machine.
async fn backend(server: &RedisServer, fallback: Fallback) -> RedisBackend {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let options = RedisOptions {
        timeout: Duration::from_secs(5),
        fallback,
        prefix: format!("test{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        ..RedisOptions::new(server.url())
    };
    RedisBackend::connect(options).await.expect("valid URL")
}

async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(server.url())
        .expect("valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers")
}

/// Local layers: `global`, one route without a route layer, `default` for every key.
fn one_route(global: Option<Quota>, default: Quota) -> Admission<TokioClock> {
    let routes = vec![("r".into(), None)];
    Admission::new(global, routes, Plans::new(default, vec![]), 100, TokioClock)
}

/// Rates from one token per 100 s to 100k/s, bursts up to 64; now and then a closed layer.
fn quota() -> impl Strategy<Value = Quota> {
    let rate = prop_oneof![0.01f64..1.0, 1.0f64..100.0, 100.0f64..100_000.0];
    prop_oneof![
        12 => (rate, 1u32..=64).prop_map(|(rate, burst)| Quota { rate, burst }),
        1 => Just(Quota { rate: 0.0, burst: 5 }),
        1 => Just(Quota { rate: 5.0, burst: 0 }),
    ]
}

/// `(gap before the request in ns, route index, key index)`: bursts, sub-millisecond and
/// longer gaps, on two routes (the first with a route layer), over two default keys, a
/// plan key and the anonymous key.
fn requests() -> impl Strategy<Value = Vec<(u64, usize, usize)>> {
    let gap = prop_oneof![
        3 => Just(0u64),
        3 => 0u64..2_000_000,
        2 => 0u64..200_000_000,
        1 => 0u64..5_000_000_000,
    ];
    prop::collection::vec((gap, 0usize..2, 0usize..4), 1..80)
}

const KEYS: [&str; 4] = ["a", "b", "gold-1", "-"];

/// The script's decisions equal the local engine's on the same request sequence.
///
/// Both are driven by one logical clock: the local engine by governor's fake clock, the
/// script by its `now` argument (the same instants, offset by a fixed epoch), so the
/// comparison is exact — admitted or not, which layer refused, `remaining`, `reset` and
/// `wait` to the nanosecond — rather than within a tolerance. Real time plays no part in
/// the decisions; Redis' own clock only expires keys, and with a logical clock keys live at
/// least ten minutes (longer than any case runs), so expiry never decides here. Expiry
/// itself is tested against the server clock below.
#[test]
fn script_decisions_equal_the_local_engines() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::option::of(quota()),
        proptest::option::of(quota()),
        quota(),
        quota(),
        requests(),
    );
    let epoch = Duration::from_secs(1_700_000_000);
    runner
        .run(&strategy, |(global, route, default, gold, requests)| {
            let routes = vec![("limited".to_owned(), route), ("open".to_owned(), None)];
            let plans = Plans::new(default, vec![("gold".into(), gold, vec!["gold-1".into()])]);
            let clock = FakeRelativeClock::default();
            let local = Admission::new(
                global,
                routes.clone(),
                plans.clone(),
                1_000_000,
                clock.clone(),
            );
            runtime.block_on(async {
                let backend = backend(&server, Fallback::Deny).await;
                prop_assert!(backend.is_up());
                let shared = Arc::new(
                    Admission::new(
                        global,
                        routes,
                        plans,
                        1_000_000,
                        FakeRelativeClock::default(),
                    )
                    .with_backend(Some(backend.clone())),
                );
                let mut now = Duration::ZERO;
                for (i, &(gap, route, key)) in requests.iter().enumerate() {
                    let gap = Duration::from_nanos(gap);
                    clock.advance(gap);
                    now += gap;
                    let expected = local.check(route, KEYS[key]);
                    let got = Arc::clone(&shared)
                        .check_shared(route, KEYS[key].to_owned(), Some(epoch + now))
                        .await;
                    prop_assert!(backend.is_up(), "request {i}: Redis failed");
                    prop_assert_eq!(
                        got,
                        expected,
                        "request {} ({:?} route {} key {})",
                        i,
                        now,
                        route,
                        KEYS[key]
                    );
                }
                Ok(())
            })
        })
        .expect("the script decides like the local engine");
}

#[tokio::test]
async fn keys_expire_when_the_bucket_is_full_again_and_refusals_write_nothing() {
    let server = RedisServer::start();
    let backend = backend(&server, Fallback::Deny).await;
    let mut conn = raw(&server).await;
    let quota = Quota {
        rate: 10.0,
        burst: 2,
    };
    let key = "expiry:k";
    assert_eq!(
        backend.take(key, quota).await,
        Ok(Decision::Allowed {
            remaining: 1,
            reset: Duration::from_millis(100)
        })
    );
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!((1..=100).contains(&ttl), "full again within 100 ms: {ttl}");
    // An empty bucket refuses and writes nothing: the refusing key layer of a three-layer
    // check keeps no state (only the layers above it took a token).
    let closed = "expiry:closed";
    let refused = backend
        .take(
            closed,
            Quota {
                rate: 0.0,
                burst: 1,
            },
        )
        .await;
    assert_eq!(refused, Ok(Decision::Limited { wait: CLOSED_WAIT }));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let exists: (i64, i64) = ::redis::pipe()
        .cmd("EXISTS")
        .arg(key)
        .cmd("EXISTS")
        .arg(closed)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(
        exists,
        (0, 0),
        "the full bucket expired; the refusal wrote nothing"
    );
}

#[tokio::test]
async fn upper_layers_keep_their_tokens_when_a_lower_layer_refuses() {
    let server = RedisServer::start();
    let global = Quota {
        rate: 1.0,
        burst: 3,
    };
    let default = Quota {
        rate: 1.0,
        burst: 1,
    };
    let admission = Arc::new(
        Admission::new(
            Some(global),
            vec![("r".into(), None)],
            Plans::new(default, vec![]),
            100,
            TokioClock,
        )
        .with_backend(Some(backend(&server, Fallback::Deny).await)),
    );
    admission.admit(0, "k").await.expect("first");
    let r = admission.admit(0, "k").await.expect_err("key empty");
    assert_eq!((r.scope, r.quota), (Scope::Key, default));
    assert!(r.wait > Duration::from_millis(900) && r.wait <= Duration::from_secs(1));
    admission.admit(0, "k2").await.expect("third global token");
    // The key layer's refusal still spent a global token, as in API Gateway.
    let r = admission.admit(0, "k3").await.expect_err("global empty");
    assert_eq!(r.scope, Scope::Global);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_bypassed_at_once_and_found_again_when_it_returns() {
    let mut server = RedisServer::start();
    let port = server.port();
    let backend = backend(&server, Fallback::Local).await;
    let admission = Arc::new(
        one_route(
            None,
            Quota {
                rate: 0.001,
                burst: 1,
            },
        )
        .with_backend(Some(backend.clone())),
    );
    admission.admit(0, "k").await.expect("shared bucket");
    admission
        .admit(0, "k")
        .await
        .expect_err("shared bucket empty");

    server.kill();
    // The first call after the kill notices (a lost connection: down at once) and falls back
    // to the local bucket, which is empty too: it mirrored the token "k" took from the
    // shared bucket, so falling back does not hand out a second one.
    let started = Instant::now();
    admission
        .admit(0, "k")
        .await
        .expect_err("local fallback, mirrored");
    assert!(!backend.is_up());
    // From now on nothing waits for Redis: decisions are ready at once.
    for _ in 0..100 {
        let admit = admission.admit(0, "k");
        assert!(matches!(admit, Admit::Ready(_)), "{admit:?}");
        admit.await.expect_err("the local bucket is empty");
    }
    assert!(started.elapsed() < Duration::from_secs(2));

    let _server = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backend.is_up() {
        assert!(Instant::now() < deadline, "Redis not found again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back on the shared buckets: a restarted Redis is empty, so "k" starts full there.
    let admit = admission.admit(0, "k");
    assert!(matches!(admit, Admit::Pending(_)));
    admit.await.expect("fresh shared bucket");
    admission.admit(0, "k").await.expect_err("shared again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_applies_the_allow_and_deny_policies() {
    // A port where nothing listens: start-up does not fail, the backend starts down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let quota = Quota {
        rate: 1.0,
        burst: 4,
    };
    for fallback in [Fallback::Allow, Fallback::Deny] {
        let options = RedisOptions {
            fallback,
            ..RedisOptions::new(format!("redis://127.0.0.1:{port}"))
        };
        let backend = RedisBackend::connect(options).await.expect("valid URL");
        assert!(!backend.is_up());
        let admission = Arc::new(one_route(Some(quota), quota).with_backend(Some(backend)));
        for _ in 0..10 {
            let admit = admission.admit(0, "k");
            assert!(matches!(admit, Admit::Ready(_)));
            match fallback {
                Fallback::Allow => assert_eq!(
                    admit.await,
                    Ok(Admitted {
                        usage: None,
                        quota,
                        remaining: quota.burst,
                        reset: Duration::ZERO
                    })
                ),
                _ => assert_eq!(
                    admit.await,
                    Err(Rejected {
                        usage: None,
                        scope: Scope::Global,
                        quota,
                        wait: DENY_WAIT
                    })
                ),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_of_two_replicas_share_one_invoke_rate_bucket() {
    let mut server = RedisServer::start();
    let config = GateConfig {
        max_concurrency: 10,
        rate: 20.0,
        burst: 2,
        adaptive: false,
    };
    // Two replicas: two connections to the same Redis, one bucket for function "f".
    let a = Gate::shared(config, backend_with_prefix(&server, "gate").await, "f");
    let b = Gate::shared(config, backend_with_prefix(&server, "gate").await, "f");
    assert!(
        a.try_acquire().is_none(),
        "a shared token needs a round trip"
    );
    let started = Instant::now();
    for i in 0..6 {
        let gate = if i % 2 == 0 { &a } else { &b };
        let mut slot = gate.acquire().await;
        slot.mark_used();
    }
    // Burst 2, then one token per 50 ms for both replicas together: the 6th is ≥ 200 ms in.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(195) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // Redis gone: the local bucket (burst 2, full) serves the `local` fallback.
    server.kill();
    let started = Instant::now();
    for _ in 0..2 {
        a.acquire().await.mark_used();
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

async fn backend_with_prefix(server: &RedisServer, prefix: &str) -> RedisBackend {
    let options = RedisOptions {
        timeout: Duration::from_secs(5),
        prefix: prefix.to_owned(),
        ..RedisOptions::new(server.url())
    };
    RedisBackend::connect(options).await.expect("valid URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layer_awaits_redis_and_calls_inner_only_for_admitted_requests() {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use tower::{Layer, ServiceExt};

    use crate::limit::{AdmissionLayer, ClientKey};

    let server = RedisServer::start();
    let admission = Arc::new(
        one_route(
            None,
            Quota {
                rate: 0.001,
                burst: 2,
            },
        )
        .with_backend(Some(backend(&server, Fallback::Deny).await)),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn({
        let calls = Arc::clone(&calls);
        move |req: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let remaining = req.extensions().get::<Admitted>().map(|a| a.remaining);
            async move { Ok::<_, Infallible>(Response::new(format!("{remaining:?}"))) }
        }
    });
    let reject = |rejected: Rejected| {
        let mut response = Response::new(rejected.scope.as_str().to_owned());
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
    };
    let service = AdmissionLayer::new(Arc::clone(&admission), 0, reject).layer(inner);
    let mut answers = Vec::new();
    for _ in 0..4 {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(ClientKey(Arc::from("layered")));
        let response = service.clone().oneshot(request).await.expect("infallible");
        answers.push((response.status(), response.into_body()));
    }
    assert_eq!(
        answers,
        vec![
            (StatusCode::OK, "Some(1)".to_owned()),
            (StatusCode::OK, "Some(0)".to_owned()),
            (StatusCode::TOO_MANY_REQUESTS, "key".to_owned()),
            (StatusCode::TOO_MANY_REQUESTS, "key".to_owned()),
        ]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "inner saw only the admitted"
    );
}

/// Usage quotas with the Redis backend: counted in the key layer's script call, under the
/// client key's hash tag, kept across "restarts" (new processes' admissions on the same
/// Redis), and followed by the local counters that decide while Redis is down.
mod usage_quotas {
    use super::*;
    use crate::limit::WallClock;
    use crate::usage::{Period, UsageQuota};

    const ROOMY: Quota = Quota {
        rate: 1000.0,
        burst: 1000,
    };

    /// A fresh process's admission on `backend`: plan `gold` (key `gold-1`) with a daily
    /// quota of `limit`, keys without a plan a bucket of `default` and a quota of 10.
    fn admission(
        backend: RedisBackend,
        limit: u64,
        default: Quota,
        wall: &WallClock,
    ) -> Arc<Admission<TokioClock>> {
        let day = |limit| UsageQuota {
            limit,
            period: Period::Day,
            offset: 0,
        };
        let plans = Plans::new(default, vec![("gold".into(), ROOMY, vec!["gold-1".into()])])
            .with_usage_quotas(Some(day(10)), [Some(day(limit))]);
        Arc::new(
            Admission::new(None, vec![("r".into(), None)], plans, 100, TokioClock)
                .with_wall_clock(wall.clone())
                .with_backend(Some(backend)),
        )
    }

    /// The wall clock at the real time (Redis expires counters on its own clock), frozen.
    fn wall() -> WallClock {
        WallClock::fake(WallClock::system().now())
    }

    #[tokio::test]
    async fn counts_live_in_redis_and_survive_restarts_under_the_keys_hash_tag() {
        let server = RedisServer::start();
        let wall = wall();
        let first = backend_with_prefix(&server, "quota").await;
        let a = admission(first, 5, ROOMY, &wall);
        for used in 1..=3 {
            let admitted = a.admit(0, "gold-1").await.expect("under the quota");
            assert_eq!(admitted.usage.map(|u| u.used), Some(used));
        }
        drop(a);

        // The counter and the key's bucket share the `{gold-1}` hash tag; the counter
        // expires at the period's end.
        let window = UsageQuota {
            limit: 5,
            period: Period::Day,
            offset: 0,
        }
        .window(wall.now());
        let counter = format!("quota:q:day0:{}:{{gold-1}}", window.start);
        let mut conn = raw(&server).await;
        let used: u64 = ::redis::cmd("GET")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(used, 3);
        // PTTL rather than PEXPIRETIME, which needs Redis 7: the README asks for 5.
        let ttl: u64 = ::redis::cmd("PTTL")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        let to_end = window.until_end(wall.now()).as_millis() as u64;
        assert!(
            (to_end.saturating_sub(60_000)..=to_end).contains(&ttl),
            "expires at the period's end: {ttl} ms, {to_end} ms to go"
        );
        // A restart: a new process, empty local counters, the same Redis.
        let second = backend_with_prefix(&server, "quota").await;
        let bucket = RedisBackend::client_key(
            &second.layer_key(super::super::LayerKind::Key, ROOMY, ""),
            "gold-1",
        );
        let tag = |key: &str| {
            let open = key.find('{').expect("a hash tag");
            key[open..=open + key[open..].find('}').expect("closed")].to_owned()
        };
        assert_eq!(tag(&bucket), "{gold-1}");
        assert_eq!(tag(&counter), tag(&bucket), "one Redis Cluster slot");
        let a = admission(second.clone(), 5, ROOMY, &wall);
        assert_eq!(a.usage_now("gold-1").await.map(|u| u.used), Some(3));
        a.admit(0, "gold-1").await.expect("4 of 5");
        a.admit(0, "gold-1").await.expect("5 of 5");
        let refused = a.admit(0, "gold-1").await.expect_err("used up");
        assert_eq!(refused.scope, Scope::Quota);
        assert_eq!(refused.wait, window.until_end(wall.now()));
        assert_eq!(refused.usage.map(|u| (u.used, u.quota.limit)), Some((5, 5)));
        // The local counters followed Redis, for the fallback.
        assert_eq!(a.usage_of("gold-1").map(|u| u.used), Some(5));

        // Another restart with a raised limit (a changed config): the count is kept.
        let third = backend_with_prefix(&server, "quota").await;
        let raised = admission(third, 6, ROOMY, &wall);
        raised.admit(0, "gold-1").await.expect("6 of 6");
        assert_eq!(
            raised.admit(0, "gold-1").await.map_err(|r| r.scope),
            Err(Scope::Quota)
        );

        // The admin API's UpdateUsage writes through to Redis.
        let state = raised.set_usage("gold-1", 1).await.expect("Redis took it");
        assert_eq!(state.map(|s| s.used), Some(1));
        let used: u64 = ::redis::cmd("GET")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(used, 1);
        assert_eq!(
            raised
                .admit(0, "gold-1")
                .await
                .expect("2 of 6")
                .usage
                .map(|u| u.used),
            Some(2)
        );
        drop(second);
    }

    #[tokio::test]
    async fn requests_a_bucket_refused_use_no_quota_in_redis() {
        let server = RedisServer::start();
        let wall = wall();
        let tight = Quota {
            rate: 0.001,
            burst: 2,
        };
        let a = admission(backend_with_prefix(&server, "shed").await, 5, ROOMY, &wall);
        let mut scopes = Vec::new();
        for _ in 0..5 {
            scopes.push(a.admit(0, "k").await.map(|_| ()).map_err(|r| r.scope));
        }
        drop(a);
        let a = admission(backend_with_prefix(&server, "shed").await, 5, tight, &wall);
        for _ in 0..4 {
            scopes.push(a.admit(0, "k").await.map(|_| ()).map_err(|r| r.scope));
        }
        assert_eq!(scopes[..5], [Ok(()); 5]);
        assert_eq!(
            scopes[5..],
            [Ok(()), Ok(()), Err(Scope::Key), Err(Scope::Key)],
            "a tighter bucket (a new key in Redis) sheds before the quota counts"
        );
        assert_eq!(a.usage_now("k").await.map(|u| u.used), Some(7));
        assert!(
            a.backend().is_some_and(RedisBackend::is_up),
            "no reply was misread"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_redis_is_down_the_local_counters_continue_from_the_shared_count() {
        let mut server = RedisServer::start();
        let wall = wall();
        let a = admission(backend_with_prefix(&server, "down").await, 4, ROOMY, &wall);
        for _ in 0..3 {
            a.admit(0, "gold-1").await.expect("shared count");
        }
        server.kill();
        // The first call after the kill notices, and the local counters decide from 3.
        a.admit(0, "gold-1").await.expect("4 of 4, locally");
        let refused = a.admit(0, "gold-1").await.expect_err("used up locally");
        assert_eq!(refused.scope, Scope::Quota);
        assert_eq!(refused.usage.map(|u| u.used), Some(4));
    }
}
