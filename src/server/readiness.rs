//! `/readyz`: every route's function answers `GetFunctionConfiguration`.
//!
//! Checked at most once per [`CACHE_FOR`] so a probe storm does not become a Lambda
//! control-plane storm. An answer that is an error about permissions still proves Lambda
//! is reachable; an unknown function or no answer at all is not ready. Answers name the
//! endpoint asked (`"emulator"`, `"aws"` or the configured URL).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};
use tokio::sync::Mutex;
use tokio::time::Instant;

const CACHE_FOR: Duration = Duration::from_secs(5);

/// The `/readyz` probe for one generation of routes: the functions to ask and the last
/// answer, cached for [`CACHE_FOR`].
pub(crate) struct Readiness {
    client: aws_sdk_lambda::Client,
    functions: Vec<String>,
    /// Where the functions are asked (`"emulator"`, `"aws"` or a URL), shown in answers.
    endpoint: Arc<str>,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    /// A probe of `functions` (duplicates asked once) through `client`.
    pub(crate) fn new(
        client: aws_sdk_lambda::Client,
        mut functions: Vec<String>,
        endpoint: Arc<str>,
    ) -> Self {
        functions.sort();
        functions.dedup();
        Readiness {
            client,
            functions,
            endpoint,
            last: Mutex::new(None),
        }
    }

    /// Where the data plane's invokes go: `"emulator"`, `"aws"` or the configured URL.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `Ok` when Lambda answers for every function and none is unknown; otherwise the first
    /// that failed and why. An answer at most [`CACHE_FOR`] old is reused.
    pub(crate) async fn check(&self) -> Result<(), String> {
        // Held across the probe so concurrent probes wait for one answer instead of each
        // asking Lambda.
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return result.clone();
            }
        }
        let result = self.probe().await;
        *last = Some((Instant::now(), result.clone()));
        result
    }

    async fn probe(&self) -> Result<(), String> {
        for function in &self.functions {
            let answer = self
                .client
                .get_function_configuration()
                .function_name(function)
                .send()
                .await;
            match answer {
                Ok(_) => {}
                Err(SdkError::ServiceError(e)) => {
                    let code = e.err().code().unwrap_or("Unknown");
                    if code == "ResourceNotFoundException" {
                        return Err(format!(
                            "function {function} does not exist at {}",
                            self.endpoint
                        ));
                    }
                    // AccessDenied and the like: Lambda answered, so it is reachable.
                }
                Err(e) => {
                    return Err(format!(
                        "Lambda ({}) unreachable for {function}: {e}",
                        self.endpoint
                    ))
                }
            }
        }
        Ok(())
    }
}
