//! Shared limits on a Redis Cluster (`limits.redis_cluster`, issue 17): each test starts a
//! three-master cluster on loopback (`redis-server --cluster-enabled yes` ×3 and
//! `redis-cli --cluster create`), then checks the single-node properties:
//!
//! - three replicas admit one shared burst, not three, with the global, route and key
//!   layers each in their own slot (one call per layer); a request the global layer refuses
//!   gives back the route token taken concurrently;
//! - a shared invoke quota bounds the invoke tokens of two replicas together;
//! - a master killed mid-run (no replicas: its slots fail) leaves every request answered by
//!   `on_backend_error`, none waiting past the deadline.

#[path = "redis_support/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::Duration;

use sluicegate::invoke::{Gate, GateConfig};
use sluicegate::limit::{Admission, Plans, Quota, RedisBackend, RedisOptions, TokioClock};
use tokio::time::Instant;

use self::cluster::RedisCluster;

/// One cluster at a time: three servers per test on two shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nothing refills during a test: one token per 1000 s.
fn slow(burst: u32) -> Quota {
    Quota { rate: 0.001, burst }
}

async fn backend(cluster: &RedisCluster, prefix: &str, timeout: Duration) -> RedisBackend {
    let options = RedisOptions {
        timeout,
        prefix: prefix.to_owned(),
        ..RedisOptions::cluster(cluster.urls())
    };
    let backend = RedisBackend::connect(options).await.expect("valid URLs");
    assert!(backend.is_cluster());
    assert!(backend.is_up(), "the cluster answers");
    backend
}

fn admission(
    backend: &RedisBackend,
    global: Quota,
    route: Quota,
    key: Quota,
) -> Arc<Admission<TokioClock>> {
    let routes = vec![("records".into(), Some(route))];
    Arc::new(
        Admission::new(
            Some(global),
            routes,
            Plans::new(key, vec![]),
            1000,
            TokioClock,
        )
        .with_backend(Some(backend.clone())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_one_shared_burst_across_slots() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    // Generous deadline: this test checks decisions, not speed.
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let backend = backend(&cluster, "burst", Duration::from_secs(2)).await;
        replicas.push(admission(&backend, slow(1000), slow(1000), slow(20)));
    }
    // The three layers' keys hash to slots on different masters (the hash of the whole key:
    // no tag), so the global layer is not one hot slot shared with every key.
    let masters: std::collections::HashSet<u16> = [
        "burst:g:1000000000000:1000:",
        "burst:r:1000000000000:1000:records",
        "burst:k:1000000000000:20:client",
    ]
    .iter()
    .map(|key| cluster.master_of(key))
    .collect();
    assert!(
        masters.len() >= 2,
        "layers spread over masters: {masters:?}"
    );

    // 20 requests through each replica at once, for one key with burst 20.
    let mut answers = Vec::new();
    for admission in &replicas {
        for _ in 0..20 {
            let admission = Arc::clone(admission);
            answers.push(tokio::spawn(
                async move { admission.admit(0, "client").await },
            ));
        }
    }
    let mut admitted = 0;
    for answer in answers {
        admitted += usize::from(answer.await.expect("task").is_ok());
    }
    assert_eq!(admitted, 20, "one shared key bucket, not three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_refusal_gives_back_the_route_token_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let backend = backend(&cluster, "giveback", Duration::from_secs(2)).await;
    // Global 5, route 8: ten requests, one at a time.
    let replica = admission(&backend, slow(5), slow(8), slow(100));
    let mut scopes = Vec::new();
    for i in 0..10 {
        match replica.admit(0, &format!("client-{i}")).await {
            Ok(_) => scopes.push("admitted".to_owned()),
            Err(rejected) => scopes.push(format!("{:?}", rejected.scope)),
        }
    }
    assert_eq!(
        scopes,
        [["admitted"; 5].as_slice(), ["Global"; 5].as_slice()].concat(),
        "the global layer refuses the sixth on"
    );
    // A second admission on the same backend with a roomy global layer: the route bucket
    // (same key: same quota) still has 8 - 5 = 3 tokens, because the five requests the
    // global layer refused gave theirs back.
    let roomy = admission(&backend, slow(1000), slow(8), slow(100));
    let mut admitted = 0;
    for i in 0..10 {
        // (Each give-back completed before its refusal was answered.)
        admitted += usize::from(roomy.admit(0, &format!("other-{i}")).await.is_ok());
    }
    assert_eq!(admitted, 3, "route tokens given back by global refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_invoke_quota_holds_across_replicas_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let config = GateConfig {
        max_concurrency: 10,
        rate: 20.0,
        burst: 2,
        adaptive: false,
    };
    let a = Gate::shared(
        config,
        backend(&cluster, "gate", Duration::from_secs(2)).await,
        "f",
    );
    let b = Gate::shared(
        config,
        backend(&cluster, "gate", Duration::from_secs(2)).await,
        "f",
    );
    let started = Instant::now();
    for i in 0..6 {
        let gate = if i % 2 == 0 { &a } else { &b };
        gate.acquire().await.mark_used();
    }
    // Burst 2, then one token per 50 ms for both replicas together: the 6th is ≥ 200 ms in
    // (three replicas each with its own bucket would take 100 ms).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(195) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_run_leaves_every_request_answered() {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let backend = backend(&cluster, "kill", Duration::from_millis(100)).await;
        replicas.push(admission(
            &backend,
            Quota {
                rate: 1000.0,
                burst: 1000,
            },
            Quota {
                rate: 1000.0,
                burst: 1000,
            },
            Quota {
                rate: 10.0,
                burst: 10,
            },
        ));
    }
    let victim = cluster.master_of("kill:k:100000000:10:client-0");
    let started = Instant::now();
    let mut killed = false;
    let (mut sent, mut answered, mut slowest) = (0, 0, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(3) {
        if !killed && started.elapsed() >= Duration::from_secs(1) {
            cluster.kill(victim);
            killed = true;
        }
        let mut round = Vec::new();
        for (i, admission) in replicas.iter().enumerate() {
            for key in 0..4 {
                let admission = Arc::clone(admission);
                sent += 1;
                round.push(tokio::spawn(async move {
                    let asked = Instant::now();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(2),
                        admission.admit(0, &format!("client-{}", (key + i) % 4)),
                    )
                    .await;
                    (answer.is_ok(), asked.elapsed())
                }));
            }
        }
        for task in round {
            let (in_time, took) = task.await.expect("task");
            answered += usize::from(in_time);
            slowest = slowest.max(took);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed);
    assert_eq!(answered, sent, "every request answered within 2 s");
    // The deadline is 100 ms; a request waits at most for two sequential calls.
    assert!(
        slowest < Duration::from_secs(1),
        "slowest answer {slowest:?}"
    );
}

#[test]
fn cluster_and_fleet_settings_have_defaults_and_bad_values_name_their_key() {
    use sluicegate::config::Config;
    let toml = |limits: &str| {
        format!(
            "[limits]\nbackend = \"redis\"\n{limits}\n\
             [[routes]]\nname = \"records\"\nfunction = \"f\"\n"
        )
    };
    let config = Config::from_toml(&toml("")).expect("defaults are valid");
    assert!(config.limits.redis_cluster.is_empty());
    assert_eq!(config.limits.expected_replicas, None);
    assert_eq!(config.limits.redis_down_after, 3);
    assert_eq!(config.limits.redis_up_after, 3);
    let config = Config::from_toml(&toml(
        "redis_cluster = [\"redis://10.0.0.1:6379\", \"redis://:pw@10.0.0.2:6379\"]\n\
         expected_replicas = 4\nredis_down_after = 5\nredis_up_after = 2",
    ))
    .expect("a cluster");
    assert_eq!(config.limits.redis_cluster.len(), 2);
    assert_eq!(config.limits.expected_replicas, Some(4));
    assert!(
        !config.to_toml().contains("pw"),
        "node passwords are masked when shown"
    );
    for (limits, key, says) in [
        (
            "redis_url = \"redis://a:6379\"\nredis_cluster = [\"redis://b:6379\"]",
            "limits.redis_cluster",
            "not both",
        ),
        (
            "redis_cluster = [\"http://b:6379\"]",
            "limits.redis_cluster",
            "not a usable Redis node URL",
        ),
        (
            "expected_replicas = 0",
            "limits.expected_replicas",
            "1..=10000",
        ),
        (
            "redis_down_after = 0",
            "limits.redis_down_after",
            "1..=1000",
        ),
        ("redis_up_after = 1001", "limits.redis_up_after", "1..=1000"),
    ] {
        let err = Config::from_toml(&toml(limits))
            .expect_err(limits)
            .to_string();
        assert!(err.contains(key) && err.contains(says), "{limits}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_usage_quota_is_a_quota_refusal_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let backend = backend(&cluster, "quota", Duration::from_secs(2)).await;
    let day = sluicegate::usage::UsageQuota {
        limit: 3,
        period: sluicegate::usage::Period::Day,
        offset: 0,
    };
    let plans = Plans::new(slow(1000), vec![]).with_usage_quotas(Some(day), []);
    let admission = Arc::new(
        Admission::new(
            Some(slow(1000)),
            vec![("records".into(), Some(slow(1000)))],
            plans,
            1000,
            TokioClock,
        )
        .with_backend(Some(backend.clone())),
    );
    for used in 1..=3 {
        let admitted = admission
            .admit(0, "client")
            .await
            .expect("within the quota");
        assert_eq!(admitted.usage.map(|u| u.used), Some(used));
    }
    let refused = admission
        .admit(0, "client")
        .await
        .expect_err("quota used up");
    assert_eq!(
        refused.scope,
        sluicegate::limit::Scope::Quota,
        "{refused:?}"
    );
    assert!(
        refused.wait > Duration::from_secs(1),
        "waits for the next period, not a bucket: {refused:?}"
    );
    assert_eq!(refused.usage.map(|u| u.used), Some(3));
}
