//! sluicegate
#![forbid(unsafe_code)]
