//! Lambda entry point: runs [`handle`] for every batch sluicegate sends.
//!
//! `RESPONSE_SHAPE` (`results`, the default, or `batch_item_failures`) is read once at
//! init: it is part of the function's configuration, not of an event.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use sluicegate_example_handler::{handle, Batch, Response, ResponseShape};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    // JSON logs to stdout, which Lambda ships to CloudWatch; level from AWS_LAMBDA_LOG_LEVEL
    // or RUST_LOG.
    lambda_runtime::tracing::init_default_subscriber();
    let shape = ResponseShape::from_env()?;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Batch>| async move {
        // An event that is not a batch never gets here: lambda_runtime reports the
        // deserialization error as a function error, which sluicegate answers with 502
        // for every record of the invoke.
        Ok::<Response, Error>(handle(event.payload, shape))
    }))
    .await
}
