//! The fleet-aware fallback against a real `redis-server`: replicas count each other through
//! their heartbeats, the local fallback gives each its share of the limits, and what it
//! admitted is charged to the shared buckets when Redis returns.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tests::support::RedisServer;
use super::{RedisBackend, RedisOptions};
use crate::limit::{Admission, Plans, Quota, TokioClock};

/// One route without a route layer, `default` for every key, on `backend`.
fn admission(default: Quota, backend: &RedisBackend) -> Arc<Admission<TokioClock>> {
    let routes = vec![("r".into(), None)];
    Arc::new(
        Admission::new(None, routes, Plans::new(default, vec![]), 100, TokioClock)
            .with_backend(Some(backend.clone())),
    )
}

async fn connect(url: String, expected_replicas: Option<u32>) -> RedisBackend {
    let options = RedisOptions {
        // Generous: these tests check decisions, not speed, on a loaded machine.
        timeout: Duration::from_secs(2),
        prefix: "fleet".to_owned(),
        expected_replicas,
        ..RedisOptions::new(url)
    };
    RedisBackend::connect(options).await.expect("valid URL")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_count_each_other_through_their_heartbeats() {
    let server = RedisServer::start();
    let a = connect(server.url(), None).await;
    assert_eq!(a.fleet_share(), 1, "alone so far");
    let b = connect(server.url(), None).await;
    let c = connect(server.url(), None).await;
    assert_eq!(c.fleet_share(), 3, "its first heartbeat saw all three");
    until("a counts three", || a.fleet_share() == 3).await;
    until("b counts three", || b.fleet_share() == 3).await;
    // A floor above the count wins.
    let d = connect(server.url(), Some(10)).await;
    assert_eq!(d.fleet_share(), 10);
    // A replica that stops heartbeating drops out of the others' count (3 × 1 s later).
    drop((c, d));
    until("a counts two", || a.fleet_share() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_admits_a_share_and_charges_it_when_redis_returns() {
    let mut server = RedisServer::start();
    let port = server.port();
    // Three replicas expected; no refill to speak of (one token per 1000 s), burst 9.
    let backend = connect(server.url(), Some(3)).await;
    let quota = Quota {
        rate: 0.001,
        burst: 9,
    };
    let admission = admission(quota, &backend);

    server.kill();
    // burst / N = 3 tokens for this replica while Redis is gone.
    let mut admitted = 0;
    for _ in 0..20 {
        if admission.admit(0, "k").await.is_ok() {
            admitted += 1;
        }
    }
    assert!(!backend.is_up());
    assert_eq!(admitted, 3, "this replica's share of burst 9 among 3");

    // A restarted Redis is empty (k's shared bucket full), but the 3 local tokens are
    // charged to it once the backend is up: 6 left, not 9.
    let _server = RedisServer::start_on(port);
    until("backend up", || backend.is_up()).await;
    until("charges sent", || !admission.charges_pending()).await;
    let mut shared = 0;
    for _ in 0..20 {
        if admission.admit(0, "k").await.is_ok() {
            shared += 1;
        }
    }
    assert_eq!(shared, 6, "9 minus the 3 charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_empties_a_bucket_but_leaves_no_debt_and_a_give_back_never_overfills() {
    let server = RedisServer::start();
    let backend = connect(server.url(), None).await;
    let quota = Quota {
        rate: 0.001,
        burst: 4,
    };
    let gcra = super::Gcra::of(quota);
    let admission = admission(quota, &backend);
    let key =
        super::RedisBackend::client_key(&backend.layer_key(super::LayerKind::Key, quota, ""), "k");
    // Give back into a full bucket: still full, not fuller.
    backend.charge(&key, gcra, -5).await.expect("up");
    let mut n = 0;
    for _ in 0..10 {
        n += usize::from(admission.admit(0, "k").await.is_ok());
    }
    assert_eq!(n, 4, "full means burst");
    // Charge 100 to a fresh key: empty, no deeper (a bucket holds no debt beyond empty);
    // a give-back of one is then one token.
    let other =
        super::RedisBackend::client_key(&backend.layer_key(super::LayerKind::Key, quota, ""), "o");
    backend.charge(&other, gcra, 100).await.expect("up");
    backend.charge(&other, gcra, -1).await.expect("up");
    assert!(admission.admit(0, "o").await.is_ok(), "one token back");
    assert!(admission.admit(0, "o").await.is_err(), "empty again");
}
