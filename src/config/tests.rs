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
    assert_eq!(config.routes[0].batch.max_records, 7);
    assert_eq!(
        config.limits.default,
        Quota {
            rate: 2.5,
            burst: 3
        }
    );
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
