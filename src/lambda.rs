//! What AWS Lambda itself allows, where both the proxy (its batch bounds) and the emulator
//! (what it refuses) need the same figure. A leaf: it depends on nothing in the crate.

/// Lambda's payload limit for synchronous (RequestResponse) invokes, request and response:
/// 6 MB.
pub const SYNC_PAYLOAD_LIMIT: u64 = 6_291_456;
/// Lambda's payload limit for asynchronous (Event) invokes: 1 MB.
pub const ASYNC_PAYLOAD_LIMIT: u64 = 1_048_576;
