//! Start-up discovery: does the config fit the function it targets?
//!
//! Reads `GetFunctionConfiguration` (the function's `Timeout`) and `GetFunctionConcurrency`
//! (its reserved concurrency) when the credentials allow, and reports:
//! - `lambda.read_timeout` at or below the function's timeout: a slow invoke would be
//!   abandoned while the function still runs (and, retried, collide with itself);
//! - `invoke.max_concurrency` above the reserved concurrency: the excess is throttled;
//! - reserved concurrency 0: the function is switched off;
//! - `retry.max_attempts × (connect_timeout + read_timeout)` above the route's
//!   `request_timeout`: the retries cannot all happen inside a caller's deadline
//!   (this one needs no AWS call).
//!
//! `serve` logs each finding as a warning, or refuses to start with `lambda.strict = true`;
//! `sluicegate check-config --discover` prints them.

use std::time::Duration;

use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};

use crate::config::Config;

/// One thing about the config that does not fit the function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The route (`routes[].name`) whose config does not fit.
    pub route: String,
    /// What does not fit and what it leads to, naming the config keys involved.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "route {}: {}", self.route, self.message)
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What discovery learned about a function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FunctionFacts {
    /// The function's `Timeout` (whole seconds); `None` when it could not be read.
    pub timeout: Option<Duration>,
    /// The function's reserved concurrency; `None` when none is set or it could not be
    /// read. `Some(0)` means the function is switched off.
    pub reserved_concurrency: Option<u32>,
}

/// Checks that need no AWS call.
pub fn static_findings(config: &Config) -> Vec<Finding> {
    let lambda = &config.lambda;
    config
        .routes
        .iter()
        .filter_map(|route| {
            let per_attempt = lambda.connect_timeout.saturating_add(lambda.read_timeout);
            let worst = per_attempt.saturating_mul(route.retry.max_attempts);
            let deadline = route.request_timeout(&config.server);
            (worst > deadline).then(|| Finding {
                route: route.name.clone(),
                message: format!(
                    "retry.max_attempts ({}) × (lambda.connect_timeout + lambda.read_timeout) = {} exceeds the request_timeout of {}: late attempts cannot answer their callers",
                    route.retry.max_attempts,
                    crate::units::format_duration(worst),
                    crate::units::format_duration(deadline),
                ),
            })
        })
        .collect()
}

/// Findings for one route given what is known about its function.
pub fn check(config: &Config, route: usize, facts: FunctionFacts) -> Vec<Finding> {
    let r = &config.routes[route];
    let mut findings = Vec::new();
    let finding = |message: String| Finding {
        route: r.name.clone(),
        message,
    };
    if let Some(timeout) = facts.timeout {
        if config.lambda.read_timeout <= timeout {
            findings.push(finding(format!(
                "lambda.read_timeout ({}) is not above {}'s timeout ({}): a slow invoke is abandoned while the function still runs",
                crate::units::format_duration(config.lambda.read_timeout),
                r.function,
                crate::units::format_duration(timeout),
            )));
        }
    }
    match facts.reserved_concurrency {
        Some(0) => findings.push(finding(format!("{} has reserved concurrency 0: every invoke is throttled", r.function))),
        Some(reserved) if r.invoke.max_concurrency.get() > reserved => findings.push(finding(format!(
            "invoke.max_concurrency ({}) exceeds {}'s reserved concurrency ({reserved}): the excess is throttled",
            r.invoke.max_concurrency, r.function
        ))),
        _ => {}
    }
    findings
}

/// Asks Lambda about a function. Errors that mean "not allowed to ask" yield no facts;
/// an unknown function or an unreachable Lambda is an error.
pub async fn facts(
    client: &aws_sdk_lambda::Client,
    function: &str,
) -> Result<FunctionFacts, String> {
    let mut facts = FunctionFacts::default();
    let configuration = tokio::time::timeout(
        CALL_TIMEOUT,
        client
            .get_function_configuration()
            .function_name(function)
            .send(),
    )
    .await;
    match configuration {
        Err(_) => {
            return Err(format!(
                "GetFunctionConfiguration({function}) did not answer within {CALL_TIMEOUT:?}"
            ))
        }
        Ok(Ok(out)) => {
            facts.timeout = out
                .timeout()
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
        }
        Ok(Err(SdkError::ServiceError(e)))
            if e.err().code() == Some("ResourceNotFoundException") =>
        {
            return Err(format!("function {function} does not exist"))
        }
        Ok(Err(SdkError::ServiceError(e))) => {
            tracing::info!(
                function,
                code = e.err().code(),
                "GetFunctionConfiguration not allowed; skipping the timeout check"
            );
        }
        Ok(Err(e)) => {
            return Err(format!(
                "GetFunctionConfiguration({function}): {}",
                aws_sdk_lambda::error::DisplayErrorContext(e)
            ))
        }
    }
    let concurrency = tokio::time::timeout(
        CALL_TIMEOUT,
        client
            .get_function_concurrency()
            .function_name(function)
            .send(),
    )
    .await;
    match concurrency {
        Ok(Ok(out)) => {
            facts.reserved_concurrency = out
                .reserved_concurrent_executions()
                .and_then(|n| u32::try_from(n).ok())
        }
        Ok(Err(e)) => {
            tracing::info!(function, error = %aws_sdk_lambda::error::DisplayErrorContext(e), "GetFunctionConcurrency failed; skipping the concurrency check")
        }
        Err(_) => tracing::info!(
            function,
            "GetFunctionConcurrency did not answer; skipping the concurrency check"
        ),
    }
    Ok(facts)
}

/// Every finding for `config`: the static ones, then per route what Lambda says.
pub async fn discover(client: &aws_sdk_lambda::Client, config: &Config) -> Vec<Finding> {
    let mut findings = static_findings(config);
    for (index, route) in config.routes.iter().enumerate() {
        match facts(client, &route.function).await {
            Ok(facts) => findings.extend(check(config, index, facts)),
            Err(message) => findings.push(Finding {
                route: route.name.clone(),
                message,
            }),
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[lambda]\nconnect_timeout = \"1s\"\nread_timeout = \"5s\"\n[[routes]]\nname = \"r\"\nfunction = \"f\"\n{extra}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_read_timeout_below_the_function_timeout_is_reported() {
        let c = config("");
        let findings = check(
            &c,
            0,
            FunctionFacts {
                timeout: Some(Duration::from_secs(60)),
                reserved_concurrency: None,
            },
        );
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0].message.contains("read_timeout"),
            "{}",
            findings[0]
        );
        assert!(check(
            &c,
            0,
            FunctionFacts {
                timeout: Some(Duration::from_secs(3)),
                reserved_concurrency: None
            }
        )
        .is_empty());
    }

    #[test]
    fn concurrency_above_reserved_is_reported() {
        let c = config("invoke = { max_concurrency = 10 }");
        let findings = check(
            &c,
            0,
            FunctionFacts {
                timeout: None,
                reserved_concurrency: Some(1),
            },
        );
        assert!(
            findings[0].message.contains("reserved concurrency (1)"),
            "{}",
            findings[0]
        );
        let findings = check(
            &c,
            0,
            FunctionFacts {
                timeout: None,
                reserved_concurrency: Some(0),
            },
        );
        assert!(
            findings[0].message.contains("reserved concurrency 0"),
            "{}",
            findings[0]
        );
        assert!(check(
            &c,
            0,
            FunctionFacts {
                timeout: None,
                reserved_concurrency: Some(10)
            }
        )
        .is_empty());
    }

    #[test]
    fn retries_that_cannot_fit_the_deadline_are_reported() {
        let c = config("retry = { max_attempts = 6 }");
        let findings = static_findings(&c);
        assert_eq!(findings.len(), 1, "6 × 6s > 30s");
        assert!(
            findings[0].message.contains("max_attempts (6)"),
            "{}",
            findings[0]
        );
        assert!(
            static_findings(&config("retry = { max_attempts = 5 }")).is_empty(),
            "5 × 6s = 30s fits"
        );
    }
}
