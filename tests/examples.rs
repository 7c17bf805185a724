//! The packaging and the examples, checked the way CI can without a container engine or a
//! cluster: the Python example's unit tests, `docker-compose config` over
//! `docker-compose.yml`, the deploy configs loaded by sluicegate's own config code (and the
//! compose pair actually serving a record), the Kubernetes manifests' cross-references,
//! the Grafana dashboard against the metric names, and the Dockerfile against the files it
//! copies and edits. (The Rust example's own tests run with `cargo test --workspace`.)
//!
//! External tools: `python3` with PyYAML (Debian `python3-yaml`) and Debian's
//! `docker-compose` (or the `docker compose` plugin).

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluicegate::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Stands in for the admin-token secret file that deploy configs name but that exists only
/// where they are deployed (a token given directly wins over the file).
const STAND_IN_TOKEN: (&str, &str) = ("SLUICEGATE_SERVER__ADMIN_TOKEN", "stand-in-token");

/// Loads a deploy config that reads its admin token from a mounted secret, with the token
/// given instead; the file path is checked against the mounts by the caller.
fn load_deploy_config(text: &str, origin: &str) -> Config {
    let env = [(STAND_IN_TOKEN.0.to_owned(), STAND_IN_TOKEN.1.to_owned())];
    Config::from_toml_with_env(text, origin, env)
        .unwrap_or_else(|e| panic!("{origin} does not load: {e}"))
}

fn describe(output: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// examples/python-handler

#[test]
fn python_handler_unit_tests_pass() {
    let output = run(
        Command::new("python3")
            .args([
                "-m",
                "unittest",
                "discover",
                "-s",
                "examples/python-handler",
                "-v",
            ])
            // No __pycache__ left in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "python3 (CI machines have Python 3)",
    );
    assert!(
        output.status.success(),
        "examples/python-handler unit tests failed\n{}",
        describe(&output)
    );
    // unittest reports on stderr; make sure it ran something rather than nothing.
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        report.contains("Ran ") && !report.contains("Ran 0 tests"),
        "no Python test ran\n{}",
        describe(&output)
    );
}

// ---------------------------------------------------------------------------------------
// docker-compose.yml and deploy/compose

/// `docker-compose` (Debian's package, v1) or the `docker compose` plugin, whichever works.
fn compose_command() -> Command {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works("docker-compose", &["version"]) {
        Command::new("docker-compose")
    } else if works("docker", &["compose", "version"]) {
        let mut cmd = Command::new("docker");
        cmd.arg("compose");
        cmd
    } else {
        panic!(
            "neither `docker-compose` nor `docker compose` is available to validate \
             docker-compose.yml: install Debian's package with `apt-get install -y docker-compose`"
        );
    }
}

#[test]
fn docker_compose_file_is_valid() {
    // `config -q` parses and validates the file against the compose schema without an engine.
    let output = run(
        compose_command().args(["-f", "docker-compose.yml", "config", "-q"]),
        "docker-compose",
    );
    assert!(
        output.status.success(),
        "docker-compose.yml does not validate\n{}",
        describe(&output)
    );
}

#[test]
fn docker_compose_bind_mounts_exist() {
    // A missing source would be created as an empty directory by the engine at `up` time,
    // and the container would then fail on a directory where it expects a file.
    let compose = read("docker-compose.yml");
    let sources: Vec<&str> = compose
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("- ./"))
        .filter_map(|mount| mount.split(':').next())
        .collect();
    assert!(
        sources.len() >= 5,
        "expected the config, prometheus and grafana mounts, found {sources:?}"
    );
    for source in sources {
        assert!(
            repo().join(source).exists(),
            "docker-compose.yml mounts ./{source}, which does not exist"
        );
    }
}

#[test]
fn compose_configs_load_with_the_listeners_compose_needs() {
    let path = "deploy/compose/sluicegate.toml";
    let config = load_deploy_config(&read(path), path);
    // Other containers and published ports reach a container on its own interface.
    assert_eq!(config.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.server.admin_listen, "0.0.0.0:9090".parse().unwrap());
    // ...so the admin API needs a token, read from the compose secret.
    let no_token = Config::from_toml_with_env(&read(path), path, std::iter::empty());
    assert!(
        no_token.is_err(),
        "without its secret file the compose config must refuse to start"
    );
    let secret = "sluicegate-admin-token";
    assert_eq!(
        config.server.admin_token_file.as_deref(),
        Some(std::path::Path::new(&format!("/run/secrets/{secret}")))
    );
    let compose: Value = yaml_documents(&["docker-compose.yml"]).remove(0).1;
    assert!(
        compose["services"]["sluicegate"]["secrets"]
            .as_array()
            .is_some_and(|s| s.contains(&Value::from(secret))),
        "the sluicegate service does not get the {secret} secret"
    );
    let file = compose["secrets"][secret]["file"]
        .as_str()
        .expect("the secret comes from a file");
    assert!(repo().join(file).is_file(), "{file} does not exist");
    assert!(!config.emulator.enabled, "the emulator is its own service");
    assert_eq!(
        config.lambda.endpoint_url.as_deref(),
        Some("http://emulator:9001")
    );

    let emulator_path = repo().join("deploy/compose/emulator.toml");
    let emulator = Config::load_for_emulator(&emulator_path)
        .unwrap_or_else(|e| panic!("deploy/compose/emulator.toml does not load: {e}"));
    assert_eq!(emulator.listen, "0.0.0.0:9001".parse().unwrap());
    for route in &config.routes {
        assert!(
            emulator.functions.iter().any(|f| f.name == route.function),
            "route {} invokes {}, which the compose emulator does not host",
            route.name,
            route.function
        );
    }

    // `emulator:9001` is not a loopback endpoint, so `credentials = "auto"` falls back to
    // the default chain, which needs keys from somewhere: the compose file supplies dummies.
    let compose = read("docker-compose.yml");
    assert!(
        compose.contains("AWS_ACCESS_KEY_ID:") && compose.contains("AWS_SECRET_ACCESS_KEY:"),
        "the sluicegate service needs placeholder AWS keys for a non-loopback emulator"
    );
}

/// Kills the child when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// One HTTP/1.0 exchange (the server closes the connection after answering):
/// the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `GET path` until it answers 200; the deadline only bounds a broken start.
// Wall time on purpose: blocking code (no tokio runtime) waiting on another process.
#[allow(clippy::disallowed_methods)]
fn wait_for_200(addr: SocketAddr, path: &str, child: &mut Process) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http(addr, "GET", path, "") {
            return;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the process serving {addr} exited with {status} before {path} answered 200");
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} did not answer 200 within 30s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn compose_configs_serve_a_record_through_the_standalone_emulator() {
    // The compose pair as processes on this machine: only the addresses change (free
    // loopback ports instead of container names), the files are the ones compose mounts.
    let dir = tempfile::tempdir().expect("temp dir");
    let emulator_addr = free_addr();
    let mut emulator = Process(
        Command::new(BIN)
            .args(["emulate", "--config", "deploy/compose/emulator.toml"])
            .current_dir(repo())
            .env("SLUICEGATE_EMULATOR__LISTEN", emulator_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluicegate emulate"),
    );
    wait_for_200(emulator_addr, "/emulator/stats", &mut emulator);
    let endpoint = format!("http://{emulator_addr}");

    // Discovery against the compose emulator: the route's timeouts and concurrency fit
    // the function it hosts (strict turns any finding into a failure).
    let discovery = run(
        Command::new(BIN)
            .args([
                "check-config",
                "--discover",
                "deploy/compose/sluicegate.toml",
            ])
            .env("SLUICEGATE_LAMBDA__ENDPOINT_URL", &endpoint)
            .env("SLUICEGATE_LAMBDA__STRICT", "true")
            .env(STAND_IN_TOKEN.0, STAND_IN_TOKEN.1)
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        "sluicegate check-config --discover",
    );
    assert!(
        discovery.status.success(),
        "deploy/compose/sluicegate.toml does not fit the compose emulator's function\n{}",
        describe(&discovery)
    );

    let (data, admin) = (free_addr(), free_addr());
    let mut proxy = Process(
        Command::new(BIN)
            .args(["serve", "--config", "deploy/compose/sluicegate.toml"])
            .current_dir(repo())
            .env("SLUICEGATE_SERVER__LISTEN", data.to_string())
            .env("SLUICEGATE_SERVER__ADMIN_LISTEN", admin.to_string())
            .env(STAND_IN_TOKEN.0, STAND_IN_TOKEN.1)
            .env("SLUICEGATE_LAMBDA__ENDPOINT_URL", &endpoint)
            // No Redis here; the compose file's shared limits fall back to local ones anyway.
            .env("SLUICEGATE_LIMITS__BACKEND", "local")
            .env(
                "SLUICEGATE_ROUTES__0__DLQ",
                format!("{{ file = {:?} }}", dir.path().join("dlq.jsonl")),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluicegate serve"),
    );
    wait_for_200(data, "/readyz", &mut proxy);

    let (status, body) = http(data, "POST", "/records", r#"{"n":41}"#).expect("POST /records");
    assert_eq!(status, 200, "POST /records answered {status}: {body}");
    let body: Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(body["status"], "success");
    assert_eq!(body["body"], serde_json::json!({"n": 41}));
}

// ---------------------------------------------------------------------------------------
// deploy/kubernetes

/// Every YAML document of `files`, as JSON, through PyYAML (`safe_load_all`).
fn yaml_documents(files: &[&str]) -> Vec<(String, Value)> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        print(json.dumps([[path, doc] for path in sys.argv[1:]\n\
                          for doc in yaml.safe_load_all(open(path)) if doc is not None]))";
    let output = run(
        Command::new("python3").args(["-c", SCRIPT]).args(files),
        "python3",
    );
    assert!(
        output.status.success(),
        "YAML does not parse, or PyYAML is missing (Debian: apt-get install -y python3-yaml)\n{}",
        describe(&output)
    );
    let docs: Vec<(String, Value)> =
        serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    docs
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn kubernetes_manifests_fit_together() {
    let files = [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/serviceaccount.yaml",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/prometheus/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/sluicegate.yml",
        "docker-compose.yml",
    ];
    let docs = yaml_documents(&files);

    // The ConfigMap holds a real sluicegate config for real AWS.
    let configmap = kind(&docs, "ConfigMap");
    let toml = configmap["data"]["sluicegate.toml"]
        .as_str()
        .expect("data.sluicegate.toml");
    let config = load_deploy_config(toml, "configmap.yaml");
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.server.admin_listen, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(
        config.lambda.endpoint_url, None,
        "a sidecar targets real AWS"
    );
    // The checks `lambda.strict = true` applies before any AWS call (the retry attempts
    // fit the caller's deadline): a finding here would stop every sidecar at start-up.
    let findings = sluicegate::invoke::discover::static_findings(&config);
    assert!(
        findings.is_empty(),
        "configmap.yaml would not start: {findings:?}"
    );
    assert!(!config.emulator.enabled);

    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > config.server.shutdown_grace,
        "terminationGracePeriodSeconds ({grace}s) must exceed server.shutdown_grace ({:?})",
        config.server.shutdown_grace
    );

    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[k].as_array())
        .flatten()
        .collect();
    let sidecar = containers
        .iter()
        .find(|c| c["name"] == "sluicegate")
        .expect("a sluicegate container");
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsUser"], 10001, "the image's uid");
    let probe_path = |probe: &str| sidecar[probe]["exec"]["command"][3].clone();
    assert_eq!(probe_path("readinessProbe"), "/readyz");
    assert_eq!(probe_path("livenessProbe"), "/healthz");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let command = sidecar[probe]["exec"]["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{probe} is an exec probe"));
        assert_eq!(
            command[..3],
            [
                Value::from("http-probe"),
                Value::from("127.0.0.1"),
                Value::from(config.server.listen.port().to_string())
            ],
            "{probe} must probe the data-plane listener"
        );
    }

    // The admin token file is inside a Secret volume mounted into the sidecar.
    let token_file = config
        .server
        .admin_token_file
        .as_deref()
        .expect("the public admin listener reads its token from a file");
    let mount = sidecar["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|dir| token_file.starts_with(dir))
        })
        .unwrap_or_else(|| panic!("nothing is mounted where {} is", token_file.display()));
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume is declared");
    let file_name = token_file
        .file_name()
        .and_then(|f| f.to_str())
        .expect("a file name");
    assert!(
        volume["secret"]["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["path"] == file_name)),
        "the token's volume is not a Secret that provides {file_name}: {volume}"
    );

    // Names that must agree across files.
    let mounted_config = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("a configMap volume");
    assert_eq!(configmap["metadata"]["name"], mounted_config);
    let account = kind(&docs, "ServiceAccount");
    assert_eq!(account["metadata"]["name"], pod["serviceAccountName"]);
    assert!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|arn| arn.starts_with("arn:aws:iam::")),
        "IRSA role annotation"
    );
    let kustomized: HashSet<&str> = kind(&docs, "Kustomization")["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for file in ["configmap.yaml", "deployment.yaml", "serviceaccount.yaml"] {
        assert!(kustomized.contains(file), "kustomization.yaml lacks {file}");
    }

    // The IAM policy grants what sluicegate calls, on the function the config names.
    let policy: Value = serde_json::from_str(&read("deploy/kubernetes/iam-policy.json"))
        .expect("iam-policy.json is JSON");
    let statements = policy["Statement"].as_array().expect("Statement");
    let granted = |action: &str, resource: &str| {
        statements.iter().any(|s| {
            let as_list = |v: &Value| match v {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            s["Effect"] == "Allow"
                && as_list(&s["Action"]).contains(&Value::from(action))
                && as_list(&s["Resource"]).contains(&Value::from(resource))
        })
    };
    for route in &config.routes {
        for action in [
            "lambda:InvokeFunction",
            "lambda:GetFunctionConfiguration",
            "lambda:GetFunctionConcurrency",
        ] {
            assert!(
                granted(action, &route.function),
                "iam-policy.json does not grant {action} on {}",
                route.function
            );
        }
        if let Some(url) = route.dlq.as_ref().and_then(|d| d.sqs_queue_url.as_deref()) {
            let queue = url.rsplit('/').next().expect("queue name");
            assert!(
                statements.iter().any(|s| s["Action"] == "sqs:SendMessage"
                    && s["Resource"].as_str().is_some_and(|r| r.ends_with(queue))),
                "iam-policy.json does not grant sqs:SendMessage on {queue}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// deploy/grafana

/// The metric names the metrics code exports; the dashboard may use nothing else.
const METRICS: &[&str] = &[
    "sluicegate_requests_total",
    "sluicegate_admission_rejections_total",
    "sluicegate_queue_depth",
    "sluicegate_queue_bytes",
    "sluicegate_batch_records",
    "sluicegate_batch_bytes",
    "sluicegate_invoke_duration_seconds",
    "sluicegate_lambda_throttles_total",
    "sluicegate_retries_total",
    "sluicegate_dead_letters_total",
    "sluicegate_invoke_rate_limit",
    "sluicegate_invoke_concurrency_limit",
    "sluicegate_invokes_in_flight",
    "sluicegate_tracked_keys",
    "sluicegate_limit_backend_errors_total",
    "sluicegate_queue_displaced_total",
    "sluicegate_quota_keys_at_limit",
    "sluicegate_quota_exhausted_total",
    "sluicegate_idempotency_replays_total",
    "sluicegate_idempotency_joins_total",
    "sluicegate_idempotency_conflicts_total",
    "sluicegate_idempotency_evictions_total",
    "sluicegate_idempotency_refusals_total",
    "sluicegate_bulk_requests_total",
    "sluicegate_bulk_records_total",
    "sluicegate_limit_backend_replicas",
    "sluicegate_limit_backend_uncharged_total",
];
const HISTOGRAMS: &[&str] = &[
    "sluicegate_batch_records",
    "sluicegate_batch_bytes",
    "sluicegate_invoke_duration_seconds",
];

/// Every `sluicegate_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("sluicegate_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn grafana_dashboard_uses_exactly_the_metric_contract() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/sluicegate-dashboard.json"))
        .expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = HashSet::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("<untitled>");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id at {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: panels use the datasource variable so the JSON imports anywhere"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            for name in metric_names(expr) {
                let base = HISTOGRAMS
                    .iter()
                    .find(|h| {
                        name.strip_prefix(**h)
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
                    })
                    .map_or(name.as_str(), |h| h);
                assert!(
                    METRICS.contains(&base),
                    "{title} queries {name}, which is not an exported metric"
                );
                assert!(
                    !HISTOGRAMS.contains(&name.as_str()),
                    "{title} queries histogram {name} without _bucket/_sum/_count"
                );
                used.insert(base.to_owned());
            }
        }
    }
    let unused: Vec<_> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    assert!(unused.is_empty(), "no panel shows {unused:?}");
}

// ---------------------------------------------------------------------------------------
// Dockerfile

#[test]
fn dockerfile_copies_what_exists_and_edits_the_default_config() {
    let dockerfile = read("Dockerfile");
    let ignored = read(".dockerignore");
    // Every COPY from the build context names a file that exists and is not ignored.
    let mut copied: Vec<String> = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                repo().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
            assert!(
                !ignored.lines().any(|p| {
                    let p = p.trim().trim_end_matches('/');
                    !p.is_empty() && !p.starts_with('#') && source.starts_with(p)
                }),
                ".dockerignore excludes {source}, which the Dockerfile copies"
            );
            copied.push(source.to_string());
        }
    }
    // Cargo loads every workspace member's manifest, so the dependency layer must copy it.
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members");
    for member in members
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".")
    {
        assert!(
            dockerfile.contains(&format!("COPY {member}/Cargo.toml")),
            "the Dockerfile's dependency layer does not copy {member}/Cargo.toml"
        );
    }
    // Cargo also refuses a manifest whose explicitly declared targets are missing, so the
    // image must copy the file of every [[bench]], [[example]] and [[test]] entry.
    for (section, dir) in [
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
    ] {
        let targets = manifest.get(section).and_then(|t| t.as_array());
        for target in targets.into_iter().flatten() {
            let path = match (target.get("path"), target.get("name")) {
                (Some(path), _) => path.as_str().expect("target path").to_owned(),
                (None, Some(name)) => format!("{dir}/{}.rs", name.as_str().expect("target name")),
                (None, None) => continue,
            };
            assert!(
                copied.iter().any(|c| path.starts_with(c.as_str())),
                "Cargo.toml declares a {section} target at {path}, which the Dockerfile does not copy"
            );
        }
    }

    // The image rewrites the default config's loopback listeners with sed; if the lines it
    // matches change, the edit would stop applying (the build's grep would then fail).
    // Apply the same edit here and check the result.
    let default = read("config/sluicegate.toml");
    let edited: String = default
        .lines()
        .map(|line| {
            if let Some(rest) = line.strip_prefix(r#"listen = "127.0.0.1:8080""#) {
                format!(r#"listen = "0.0.0.0:8080"{rest}"#)
            } else if let Some(rest) = line.strip_prefix(r#"admin_listen = "127.0.0.1:9090""#) {
                // The sed's `a` command: the token file's line follows the edited one.
                format!(
                    "admin_listen = \"0.0.0.0:9090\"{rest}\nadmin_token_file = \"/run/secrets/sluicegate-admin-token\""
                )
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = load_deploy_config(&edited, "image config");
    assert_eq!(
        config.server.admin_token_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/sluicegate-admin-token"))
    );
    assert!(
        dockerfile.contains(r#"/a admin_token_file = "/run/secrets/sluicegate-admin-token"'"#),
        "the Dockerfile no longer adds the admin token file to the image's config"
    );
    assert_eq!(
        config.server.listen,
        "0.0.0.0:8080".parse().unwrap(),
        "config/sluicegate.toml no longer has the `listen = \"127.0.0.1:8080\"` line the Dockerfile edits"
    );
    assert_eq!(
        config.server.admin_listen,
        "0.0.0.0:9090".parse().unwrap(),
        "config/sluicegate.toml no longer has the `admin_listen = \"127.0.0.1:9090\"` line the Dockerfile edits"
    );
    for expected in [
        r#"ENTRYPOINT ["sluicegate"]"#,
        r#"CMD ["serve", "--config", "/etc/sluicegate/sluicegate.toml"]"#,
        "USER 10001:10001",
        "EXPOSE 8080 9090",
    ] {
        assert!(
            dockerfile.contains(expected),
            "Dockerfile lacks `{expected}`"
        );
    }
    // The probe the compose healthchecks and the Kubernetes probes run.
    let probe = std::fs::metadata(repo().join("deploy/docker/http-probe")).expect("http-probe");
    assert!(probe.is_file());
}

#[test]
fn the_image_ships_the_stripped_binary() {
    let dockerfile = read("Dockerfile");
    let (builder, runtime) = dockerfile
        .split_once("AS runtime")
        .expect("a builder stage and a runtime stage");
    // The builder strips what it installs; the runtime stage copies exactly that file.
    assert!(
        builder.contains("objcopy --strip-debug") && builder.contains("/usr/local/bin/sluicegate"),
        "the builder no longer strips the binary it installs"
    );
    assert!(
        runtime.contains("COPY --from=builder /usr/local/bin/sluicegate /usr/local/bin/sluicegate"),
        "the runtime stage no longer copies the stripped binary"
    );
    assert!(
        !runtime.contains("target/release/sluicegate"),
        "the runtime stage copies the unstripped build output"
    );
}
