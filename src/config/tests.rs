use std::time::Duration;

use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text)
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml_with_env(
        text,
        "<test>",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

const MINIMAL: &str = r#"
[[routes]]
name = "records"
function = "process-records"
"#;

#[test]
fn the_shipped_default_config_loads() {
    let config = load(DEFAULT_CONFIG_TOML).expect("config/sluicegate.toml is valid");
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.routes[0].path(), "/records");
    assert_eq!(
        config.lambda.endpoint_url.as_deref(),
        Some("http://127.0.0.1:9001")
    );
    assert!(config.emulator.enabled);
    assert_eq!(config.emulator.functions[0].name, "process-records");
}

#[test]
fn a_minimal_route_gets_documented_defaults() {
    let config = load(MINIMAL).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.path(), "/records");
    assert_eq!(route.max_records(), 20);
    assert_eq!(route.max_bytes(), 5 * 1024 * 1024);
    assert_eq!(route.batch.max_wait, Duration::from_millis(50));
    assert_eq!(route.batch.flush, Flush::Adaptive);
    assert_eq!(
        route.request_timeout(&config.server),
        Duration::from_secs(30)
    );
    assert_eq!(route.retry.jitter, Jitter::Equal);
    assert!(
        !config.emulator.enabled,
        "the emulator is only on when the file asks for it"
    );
}

#[test]
fn event_routes_default_to_lambdas_async_payload_limit() {
    let config = load(&format!("{MINIMAL}invocation = \"event\"\n")).unwrap();
    assert_eq!(config.routes[0].max_bytes(), ASYNC_PAYLOAD_LIMIT);
}

#[test]
fn unknown_keys_are_rejected_with_the_key_named() {
    let err = load(&format!("{MINIMAL}batch = {{ max_recrods = 5 }}\n")).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.key(), Some("routes[0].batch.max_recrods"), "{text}");
    assert!(text.contains("max_recrods"), "{text}");

    let err = load("[sever]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("sever"), "{err}");
}

#[test]
fn wrong_types_and_bad_units_name_the_key() {
    let err = load("[server]\nrequest_timeout = \"thirty\"\n").unwrap_err();
    assert_eq!(err.key(), Some("server.request_timeout"), "{err}");
    let err = load("[server]\nmax_record_bytes = \"5 parsecs\"\n").unwrap_err();
    assert_eq!(err.key(), Some("server.max_record_bytes"), "{err}");
    let err = load("[server]\nlisten = \"nowhere\"\n").unwrap_err();
    assert_eq!(err.key(), Some("server.listen"), "{err}");
}

#[test]
fn impossible_values_are_rejected_with_the_key_named() {
    let cases = [
        ("batch = { max_records = 0 }", "routes[0].batch.max_records"),
        (
            "batch = { max_bytes = \"7MiB\" }",
            "routes[0].batch.max_bytes",
        ),
        (
            "batch = { max_bytes = \"1KiB\" }",
            "routes[0].batch.max_bytes",
        ),
        ("queue = { max_pending = 0 }", "routes[0].queue.max_pending"),
        (
            "invoke = { max_concurrency = 0 }",
            "routes[0].invoke.max_concurrency",
        ),
        ("invoke = { rate = -1.0 }", "routes[0].invoke.rate"),
        ("retry = { budget = 1.5 }", "routes[0].retry.budget"),
        (
            "retry = { base = \"20s\", cap = \"1s\" }",
            "routes[0].retry.base",
        ),
        ("limit = { rate = -5.0, burst = 1 }", "routes[0].limit"),
        ("path = \"records\"", "routes[0].path"),
        ("path = \"/healthz\"", "routes[0].path"),
        (
            "path = \"/2015-03-31/functions/f/invocations\"",
            "routes[0].path",
        ),
        ("dlq = { }", "routes[0].dlq"),
    ];
    for (line, key) in cases {
        let err = load(&format!("{MINIMAL}{line}\n")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{line}: {err}");
    }
    let err = load(&format!(
        "{MINIMAL}\n[[routes]]\nname = \"records\"\nfunction = \"f\"\n"
    ))
    .unwrap_err();
    assert_eq!(err.key(), Some("routes[1].name"), "{err}");
    let err = load(&format!("[lambda]\nendpoint_url = \"ftp://x\"\n{MINIMAL}")).unwrap_err();
    assert_eq!(err.key(), Some("lambda.endpoint_url"), "{err}");
    for (line, key) in [
        ("header_read_timeout = \"0s\"", "server.header_read_timeout"),
        ("header_read_timeout = \"2h\"", "server.header_read_timeout"),
        (
            "request_timeout = \"300000000000h\"",
            "server.request_timeout",
        ),
    ] {
        let err = load(&format!("[server]\n{line}\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{line}: {err}");
    }
    let err = load(&format!("{MINIMAL}request_timeout = \"61m\"\n")).unwrap_err();
    assert_eq!(err.key(), Some("routes[0].request_timeout"), "{err}");
    assert!(load(&format!("{MINIMAL}request_timeout = \"1h\"\n")).is_ok());
}

#[test]
fn a_route_needs_name_and_function() {
    let err = load("[[routes]]\nname = \"r\"\n").unwrap_err();
    assert!(err.to_string().contains("function"), "{err}");
    let err = load("[server]\n").unwrap_err();
    assert_eq!(err.key(), Some("routes"), "{err}");
}

#[test]
fn env_overrides_set_nested_keys_and_array_entries() {
    let config = load_env(
        MINIMAL,
        &[
            ("SLUICEGATE_SERVER__LISTEN", "127.0.0.1:18080"),
            ("SLUICEGATE_ROUTES__0__FUNCTION", "other-fn"),
            ("SLUICEGATE_ROUTES__0__BATCH__MAX_RECORDS", "7"),
            ("SLUICEGATE_LIMITS__DEFAULT", "{ rate = 2.5, burst = 3 }"),
            ("SLUICEGATE_CONFIG", "ignored: not an override"),
        ],
    )
    .unwrap();
    assert_eq!(config.server.listen.port(), 18080);
    assert_eq!(config.routes[0].function, "other-fn");
    assert_eq!(config.routes[0].batch.max_records.get(), 7);
    assert_eq!(
        config.limits.default.throttle(),
        Quota {
            rate: 2.5,
            burst: 3
        }
    );
}

#[test]
fn env_override_of_a_secret_is_text_even_when_it_looks_like_a_number() {
    for token in ["12345678", "true", "1e9"] {
        let config = load_env(MINIMAL, &[("SLUICEGATE_SERVER__ADMIN_TOKEN", token)])
            .unwrap_or_else(|e| panic!("{token}: {e}"));
        assert_eq!(config.server.admin_token.as_deref(), Some(token));
    }
}

#[test]
fn an_invoke_bucket_slower_than_ten_years_to_fill_is_refused() {
    // rate 0.001 with burst 1,000,000 takes ~31 years to fill: the gate would have to clamp
    // its token interval and admit faster than configured.
    let err = load(&format!(
        "{MINIMAL}invoke = {{ rate = 0.001, burst = 1000000 }}\n"
    ))
    .unwrap_err();
    assert_eq!(err.key(), Some("routes[0].invoke.burst"), "{err}");
    assert!(err.to_string().contains("ten years"), "{err}");
    load(&format!(
        "{MINIMAL}invoke = {{ rate = 0.001, burst = 300 }}\n"
    ))
    .expect("300 tokens at 0.001/s fill in ~3.5 days");
}

#[test]
fn env_override_keeps_strings_that_look_like_numbers() {
    let text = "[[plans]]\nname = \"p\"\nrate = 1.0\nburst = 1\nkeys = [\"a\"]\n[[routes]]\nname = \"r\"\nfunction = \"123\"\n";
    let config = load_env(text, &[("SLUICEGATE_ROUTES__0__FUNCTION", "456")]).unwrap();
    assert_eq!(config.routes[0].function, "456");
}

#[test]
fn env_override_errors_name_the_variable_or_key() {
    let err = load_env(MINIMAL, &[("SLUICEGATE_SERVER__NOPE", "1")]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = load_env(MINIMAL, &[("SLUICEGATE_ROUTES__5__NAME", "x")]).unwrap_err();
    assert!(
        err.to_string().contains("SLUICEGATE_ROUTES__5__NAME"),
        "{err}"
    );
}

#[test]
fn effective_config_round_trips_through_toml() {
    let config = load(DEFAULT_CONFIG_TOML).unwrap();
    let again = load(&config.to_toml()).expect("printed config loads");
    assert_eq!(config, again);
}

#[test]
fn jitter_accepts_names_and_ratios() {
    let config = load(&format!("{MINIMAL}retry = {{ jitter = 0.3 }}\n")).unwrap();
    assert_eq!(config.routes[0].retry.jitter, Jitter::Ratio(0.3));
    let config = load(&format!("{MINIMAL}retry = {{ jitter = \"equal\" }}\n")).unwrap();
    assert_eq!(config.routes[0].retry.jitter, Jitter::Equal);
    let err = load(&format!("{MINIMAL}retry = {{ jitter = \"some\" }}\n")).unwrap_err();
    assert_eq!(err.key(), Some("routes[0].retry.jitter"), "{err}");
}

#[test]
fn omitting_the_global_layer_means_none() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.limits.global, None);
    let config = load(DEFAULT_CONFIG_TOML).unwrap();
    assert_eq!(
        config.limits.global,
        Some(Quota {
            rate: 1000.0,
            burst: 500
        })
    );
}

#[test]
fn records_are_checked_at_the_edge_and_bisected_by_default() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.server.max_json_depth, 128);
    assert!(config.routes[0].bisect_on_function_error);
    let shipped = load(DEFAULT_CONFIG_TOML).unwrap();
    assert_eq!(shipped.server.max_json_depth, 128);
    assert!(shipped.routes[0].bisect_on_function_error);
    for depth in ["0", "129", "100000"] {
        let err = load(&format!("[server]\nmax_json_depth = {depth}\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.key(), Some("server.max_json_depth"), "{depth}: {err}");
    }
    for depth in ["1", "128"] {
        load(&format!("[server]\nmax_json_depth = {depth}\n{MINIMAL}")).unwrap();
    }
}

#[test]
fn the_queue_is_bounded_in_bytes_that_hold_at_least_one_record() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.routes[0].queue.max_bytes, ByteSize::mib(64));
    assert_eq!(
        load(DEFAULT_CONFIG_TOML).unwrap().routes[0].queue.max_bytes,
        ByteSize::mib(64)
    );
    let err = load(&format!("{MINIMAL}queue = {{ max_bytes = \"100KiB\" }}\n")).unwrap_err();
    assert_eq!(err.key(), Some("routes[0].queue.max_bytes"), "{err}");
    let small = "[server]\nmax_record_bytes = \"1KiB\"\n";
    let config = load(&format!(
        "{small}{MINIMAL}queue = {{ max_bytes = \"100KiB\" }}\n"
    ))
    .unwrap();
    assert_eq!(config.routes[0].queue.max_bytes, ByteSize::kib(100));
}

#[test]
fn every_number_is_bounded_to_what_the_code_can_hold() {
    // Each case: a value that used to pass validation and break at run time (a panic in
    // `Duration` maths, an unbounded allocation), and the key the error must name.
    let route_cases = [
        ("invoke = { rate = 1e-30 }", "routes[0].invoke.rate"),
        ("invoke = { rate = 1e300 }", "routes[0].invoke.rate"),
        ("invoke = { burst = 4000000000 }", "routes[0].invoke.burst"),
        (
            "invoke = { max_concurrency = 4000000000 }",
            "routes[0].invoke.max_concurrency",
        ),
        (
            "batch = { max_records = 4000000000 }",
            "routes[0].batch.max_records",
        ),
        (
            "batch = { max_wait = \"300000000000h\" }",
            "routes[0].batch.max_wait",
        ),
        (
            "queue = { max_pending = 100000000000 }",
            "routes[0].queue.max_pending",
        ),
        (
            "retry = { max_attempts = 4000000000 }",
            "routes[0].retry.max_attempts",
        ),
        ("retry = { cap = \"300000000000h\" }", "routes[0].retry.cap"),
    ];
    for (line, key) in route_cases {
        let err = load(&format!("{MINIMAL}{line}\n")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{line}: {err}");
        assert!(
            err.to_string().contains("..="),
            "the message gives the range: {err}"
        );
    }
    let section_cases = [
        (
            "[server]\nshutdown_grace = \"300000000000h\"",
            "server.shutdown_grace",
        ),
        (
            "[server]\nmax_record_bytes = 9223372036854775807",
            "server.max_record_bytes",
        ),
        (
            "[lambda]\nread_timeout = \"300000000000h\"",
            "lambda.read_timeout",
        ),
        (
            "[lambda]\nconnect_timeout = \"300000000000h\"",
            "lambda.connect_timeout",
        ),
        (
            "[limits]\nreclaim_interval = \"300000000000h\"",
            "limits.reclaim_interval",
        ),
        ("[limits]\nmax_keys = 100000000000", "limits.max_keys"),
    ];
    for (section, key) in section_cases {
        let err = load(&format!("{section}\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{section}: {err}");
    }
    // The documented ends of each range are accepted (the slowest rate and the largest burst
    // each on its own: together the bucket would take ~31 years to fill, refused below).
    load(&format!(
        "{MINIMAL}invoke = {{ rate = 0.001, burst = 1 }}\n"
    ))
    .expect("rate 0.001");
    load(&format!(
        "{MINIMAL}invoke = {{ rate = 10.0, burst = 1000000, max_concurrency = 100000 }}\n\
         batch = {{ max_records = 10000, max_wait = \"1h\" }}\n\
         queue = {{ max_pending = 10000000 }}\n\
         retry = {{ max_attempts = 100, cap = \"1h\" }}\n"
    ))
    .expect("the documented bounds are valid");
    load(&format!("{MINIMAL}invoke = {{ rate = 1000000.0 }}\n")).expect("rate 1e6 is valid");
}

mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::invoke::{Gate, GateConfig};

    /// Numbers from the absurd to the ordinary, the way a typo or a hostile override
    /// writes them.
    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(1e-30),
            Just(1e300),
            Just(-1.0),
            1e-6f64..1.0,
            1.0f64..1e7,
        ]
    }

    fn int() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(u64::from(u32::MAX)),
            Just(u64::MAX),
            1u64..100,
            100u64..20_000_000,
        ]
    }

    fn millis() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(u64::MAX / 1_000_000),
            1u64..10_000,
            10_000u64..10_000_000_000,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn config_numbers_never_panic_and_valid_ones_build_a_working_gate(
            rate in float(),
            burst in int(),
            concurrency in int(),
            max_records in int(),
            max_pending in int(),
            attempts in int(),
            max_record_bytes in int(),
            (wait, base, cap, read) in (millis(), millis(), millis(), millis()),
        ) {
            let text = format!(
                "[server]\nmax_record_bytes = {max_record_bytes}\n\
                 [lambda]\nread_timeout = \"{read}ms\"\n\
                 [[routes]]\nname = \"r\"\nfunction = \"f\"\n\
                 invoke = {{ rate = {rate:e}, burst = {burst}, max_concurrency = {concurrency} }}\n\
                 batch = {{ max_records = {max_records}, max_wait = \"{wait}ms\" }}\n\
                 queue = {{ max_pending = {max_pending} }}\n\
                 retry = {{ max_attempts = {attempts}, base = \"{base}ms\", cap = \"{cap}ms\" }}\n"
            );
            let Ok(config) = load(&text) else {
                return Ok(());
            };
            let invoke = &config.routes[0].invoke;
            let gate = Gate::new(GateConfig {
                max_concurrency: invoke.max_concurrency.get() as usize,
                rate: invoke.rate,
                burst: invoke.burst.get(),
                adaptive: true,
            });
            for _ in 0..3 {
                if let Some(mut slot) = gate.try_acquire() {
                    slot.mark_used();
                }
            }
            let wait = gate.time_to_next_token();
            prop_assert!(wait <= MAX_TIMEOUT, "{wait:?}");
            gate.on_throttle("CallerRateLimitExceeded");
            gate.on_accepted();
            let _ = gate.time_to_next_token();
        }
    }
}

#[test]
fn the_embedded_emulator_is_the_target_only_when_endpoint_url_names_it() {
    let emulator = "[emulator]\nenabled = true\nlisten = \"127.0.0.1:9001\"\n";
    let mut named = load(&format!(
        "[lambda]\nendpoint_url = \"http://127.0.0.1:9001\"\n{emulator}{MINIMAL}"
    ))
    .unwrap();
    assert!(named.targets_embedded_emulator());
    assert!(named.retarget_embedded_emulator("http://127.0.0.1:40000"));
    assert_eq!(
        named.lambda.endpoint_url.as_deref(),
        Some("http://127.0.0.1:40000")
    );
    let mut omitted = load(&format!("{emulator}{MINIMAL}")).unwrap();
    assert!(
        !omitted.targets_embedded_emulator(),
        "no endpoint_url is real AWS"
    );
    assert!(!omitted.retarget_embedded_emulator("http://127.0.0.1:40000"));
    assert_eq!(omitted.lambda.endpoint_url, None);
    let elsewhere = load(&format!(
        "[lambda]\nendpoint_url = \"http://127.0.0.1:9002\"\n{emulator}{MINIMAL}"
    ))
    .unwrap();
    assert!(!elsewhere.targets_embedded_emulator());
    let disabled = load(&format!(
        "[lambda]\nendpoint_url = \"http://127.0.0.1:9001\"\n{MINIMAL}"
    ))
    .unwrap();
    assert!(
        !disabled.targets_embedded_emulator(),
        "an emulator that does not run is just a URL"
    );
    assert!(load(DEFAULT_CONFIG_TOML)
        .unwrap()
        .targets_embedded_emulator());
}

#[test]
fn aws_access_key_is_an_identity_source() {
    let config = load(&format!(
        "[identity]\nsource = \"aws_access_key\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.identity.source, IdentitySource::AwsAccessKey);
}

#[test]
fn queues_are_fair_per_key_by_default_and_plan_weights_are_bounded() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.routes[0].queue.fairness, Fairness::PerKey);
    let fifo = load(&format!("{MINIMAL}queue = {{ fairness = \"fifo\" }}\n")).unwrap();
    assert_eq!(fifo.routes[0].queue.fairness, Fairness::Fifo);
    let err = load(&format!("{MINIMAL}queue = {{ fairness = \"lifo\" }}\n")).unwrap_err();
    assert_eq!(err.key(), Some("routes[0].queue.fairness"), "{err}");

    let plan = |weight: &str| {
        format!(
            "[[plans]]\nname = \"gold\"\nrate = 1.0\nburst = 1\nkeys = [\"g\"]\n{weight}{MINIMAL}"
        )
    };
    assert_eq!(load(&plan("")).unwrap().plans[0].weight, 1);
    assert_eq!(
        load(&plan("weight = 1000\n")).unwrap().plans[0].weight,
        1000
    );
    for bad in ["weight = 0\n", "weight = 1001\n"] {
        let err = load(&plan(bad)).unwrap_err();
        assert_eq!(err.key(), Some("plans[0].weight"), "{bad}: {err}");
        assert!(err.to_string().contains("1..=1000"), "{err}");
    }
}

#[test]
fn usage_quotas_load_on_plans_and_the_default_and_bad_ones_name_their_key() {
    use crate::usage::{Period, UsageQuota};
    let config = load(&format!(
        "{MINIMAL}\n[limits]\ndefault = {{ rate = 5.0, burst = 10, quota = {{ limit = 1000, period = \"day\" }} }}\n\
         quota_state = \"/var/lib/sluicegate/quota.json\"\n\
         [[plans]]\nname = \"gold\"\nrate = 1.0\nburst = 1\nkeys = [\"g\"]\n\
         quota = {{ limit = 100000, period = \"MONTH\", offset = 14 }}\n"
    ))
    .expect("valid");
    assert_eq!(
        config.limits.default.quota,
        Some(UsageQuota {
            limit: 1000,
            period: Period::Day,
            offset: 0
        })
    );
    assert_eq!(
        config.plans[0].quota,
        Some(UsageQuota {
            limit: 100000,
            period: Period::Month,
            offset: 14
        })
    );
    assert_eq!(
        config.limits.quota_state,
        std::path::PathBuf::from("/var/lib/sluicegate/quota.json")
    );
    assert_eq!(
        load(MINIMAL).unwrap().limits.quota_state,
        std::path::PathBuf::from("data/quota-state.json")
    );
    let plan = |quota: &str| {
        load(&format!(
            "{MINIMAL}\n[[plans]]\nname = \"gold\"\nrate = 1.0\nburst = 1\nquota = {quota}\n"
        ))
        .unwrap_err()
        .to_string()
    };
    let week = plan("{ limit = 5, period = \"week\", offset = 7 }");
    assert!(
        week.contains("plans[0].quota") && week.contains("0 (Sunday) ..= 6"),
        "{week}"
    );
    let day = plan("{ limit = 5, period = \"day\", offset = 1 }");
    assert!(day.contains("day period takes no offset"), "{day}");
    let zero = plan("{ limit = 0, period = \"month\" }");
    assert!(
        zero.contains("plans[0].quota") && zero.contains("limit must be in 1..="),
        "{zero}"
    );
    let period = plan("{ limit = 5, period = \"year\" }");
    assert!(period.contains("year"), "{period}");
    let default = load(&format!(
        "{MINIMAL}\n[limits]\ndefault = {{ rate = 5.0, burst = 10, quota = {{ limit = 5, period = \"month\", offset = 28 }} }}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(default.contains("limits.default.quota"), "{default}");
}

#[test]
fn bulk_bounds_default_to_500_records_and_5_mib_and_are_range_checked() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.server.max_bulk_records, 500);
    assert_eq!(config.server.max_bulk_bytes.bytes(), 5 * 1024 * 1024);
    let shipped = load(DEFAULT_CONFIG_TOML).unwrap();
    assert_eq!(shipped.server.max_bulk_records, 500);
    assert_eq!(shipped.server.max_bulk_bytes.bytes(), 5 * 1024 * 1024);
    for (key, value) in [
        ("max_bulk_records", "0"),
        ("max_bulk_records", "10001"),
        ("max_bulk_bytes", "0"),
        ("max_bulk_bytes", "\"65MiB\""),
    ] {
        let err = load(&format!("[server]\n{key} = {value}\n{MINIMAL}")).unwrap_err();
        assert_eq!(
            err.key(),
            Some(format!("server.{key}").as_str()),
            "{value}: {err}"
        );
    }
    for (key, value) in [
        ("max_bulk_records", "1"),
        ("max_bulk_records", "10000"),
        ("max_bulk_bytes", "1"),
        ("max_bulk_bytes", "\"64MiB\""),
    ] {
        load(&format!("[server]\n{key} = {value}\n{MINIMAL}")).unwrap();
    }
}

#[test]
fn idempotency_is_on_by_default_with_documented_bounds_and_bad_bounds_are_named() {
    let config = load(MINIMAL).expect("minimal config loads");
    assert_eq!(config.idempotency, IdempotencyConfig::default());
    assert!(config.idempotency.enabled);
    assert_eq!(config.idempotency.ttl, Duration::from_secs(600));
    assert_eq!(config.idempotency.max_entries, 100_000);
    assert_eq!(config.idempotency.max_bytes, ByteSize(64 * 1024 * 1024));
    let set = load_env(
        MINIMAL,
        &[
            ("SLUICEGATE_IDEMPOTENCY__TTL", "1h"),
            ("SLUICEGATE_IDEMPOTENCY__ENABLED", "false"),
        ],
    )
    .expect("overrides load");
    assert_eq!(set.idempotency.ttl, Duration::from_secs(3600));
    assert!(!set.idempotency.enabled);
    for (section, key) in [
        ("ttl = \"500ms\"", "idempotency.ttl"),
        ("ttl = \"8d\"", "idempotency.ttl"),
        ("max_entries = 0", "idempotency.max_entries"),
        ("max_bytes = \"1KiB\"", "idempotency.max_bytes"),
        ("surprise = 1", "idempotency"),
    ] {
        let text = format!("{MINIMAL}\n[idempotency]\n{section}\n");
        let error = load(&text).expect_err(section).to_string();
        assert!(error.contains(key), "{section}: {error}");
    }
}

#[test]
fn linger_defaults_to_zero_and_may_not_pass_max_wait() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.routes[0].batch.linger, Duration::ZERO);
    let set = load(&format!(
        "{MINIMAL}batch = {{ max_wait = \"20ms\", linger = \"5ms\" }}\n"
    ))
    .unwrap();
    assert_eq!(set.routes[0].batch.linger, Duration::from_millis(5));
    let err = load(&format!(
        "{MINIMAL}batch = {{ max_wait = \"20ms\", linger = \"30ms\" }}\n"
    ))
    .unwrap_err();
    assert_eq!(err.key(), Some("routes[0].batch.linger"), "{err}");
    assert!(err.to_string().contains("max_wait"), "{err}");
}
