//! The `[server]` section (listeners, record and request bounds, timeouts, the admin token)
//! and the `[identity]` section (how a request's client key is found).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::redact;
use crate::units::{self, ByteSize};

/// The `[server]` section: listeners, record and request bounds, timeouts and the admin
/// token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data-plane listener (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/admin/*`); default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// Largest accepted record body (default `256KiB`, at most Lambda's 6 MB); larger
    /// ones are answered `413`.
    pub max_record_bytes: ByteSize,
    /// A caller's deadline, unless the route sets its own (default `30s`; `504` after it).
    #[serde(with = "units::duration")]
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, time allowed for in-flight work to finish (default `20s`).
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head (request line and headers)
    /// before its connection is closed, and the longest a keep-alive connection may sit
    /// idle (default `30s`); keeps slow clients from holding connections.
    #[serde(with = "units::duration")]
    pub header_read_timeout: Duration,
    /// Deepest nesting of arrays and objects a record may have; deeper records are refused
    /// with `400` before they can fail a batch in a runtime that cannot parse them
    /// (default and largest [`DEFAULT_MAX_JSON_DEPTH`]).
    pub max_json_depth: u32,
    /// How long a client may take to send a record's body once its head has arrived (never
    /// past the caller's deadline); a body that does not arrive in time is answered `408`
    /// and its connection closed (default `10s`).
    #[serde(with = "units::duration")]
    pub body_read_timeout: Duration,
    /// Data-plane connections open at once (default `10000`, `1..=1000000`). At the cap the
    /// listener stops accepting (new connections wait in the kernel's backlog) until one
    /// closes. Lowered at start-up when the open-files limit could not hold this many plus
    /// a reserve for Lambda, Redis, the dead-letter sink and the admin listener.
    pub max_connections: u32,
    /// Most records one bulk (`application/x-ndjson`) request may carry (default `500`,
    /// `1..=`[`MAX_BULK_RECORDS`]); a request with more is answered `413` as a whole.
    pub max_bulk_records: u32,
    /// Largest bulk request body (default `5MiB`, at most [`MAX_BULK_BYTES`]); a larger
    /// one is answered `413` as a whole. A slow bulk body holds at most this much memory.
    pub max_bulk_bytes: ByteSize,
    /// Bearer token every `/admin/*` request must carry (`/metrics` and `/healthz` stay
    /// open). Required when `admin_listen` is not a loopback address. Never printed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "redact::secret"
    )]
    pub admin_token: Option<String>,
    /// A file holding the admin token (a mounted secret), read when the config is loaded
    /// (and on every reload); surrounding whitespace is ignored. `admin_token`, when also
    /// set, wins and the file is not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The token read from `admin_token_file`.
    #[serde(skip)]
    pub admin_token_from_file: Option<String>,
}

impl ServerConfig {
    /// The admin token in force: `admin_token`, or the one read from `admin_token_file`.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token
            .as_deref()
            .or(self.admin_token_from_file.as_deref())
    }

    /// Reads `admin_token_file` into `admin_token_from_file`, unless `admin_token` is set:
    /// a token given directly (often `SLUICEGATE_SERVER__ADMIN_TOKEN`) overrides the file,
    /// so an image whose config names a secret file can still be run with the variable.
    pub(super) fn read_admin_token_file(&mut self) -> Result<(), ConfigError> {
        let (None, Some(path)) = (&self.admin_token, &self.admin_token_file) else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(
                "server.admin_token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        self.admin_token_from_file = Some(text.trim().to_owned());
        Ok(())
    }
}

/// The largest `server.max_bulk_records`: every record of a bulk request waits for its
/// outcome at once, so this bounds the tickets and entries one request holds.
pub const MAX_BULK_RECORDS: u32 = 10_000;

/// The largest `server.max_bulk_bytes` (64 MiB): a bulk body is held in memory until its
/// records are queued.
pub const MAX_BULK_BYTES: ByteSize = ByteSize::mib(64);

/// The largest `server.max_connections`: past this the open-files limit, not the setting,
/// is what bounds connections on any usual system.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_record_bytes: ByteSize::kib(256),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            header_read_timeout: Duration::from_secs(30),
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            body_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_bulk_records: 500,
            max_bulk_bytes: ByteSize::mib(5),
            admin_token: None,
            admin_token_file: None,
            admin_token_from_file: None,
        }
    }
}

/// `identity.source`: what identifies a request's client for the per-key layers (default
/// `api_key`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The API key header (`identity.header`, default `x-api-key`).
    ApiKey,
    /// The client IP: the socket peer, or `X-Forwarded-For` when the peer is a trusted proxy.
    Ip,
    /// The value of a named header (`identity.header`).
    Header,
    /// The access key id of the request's AWS Signature Version 4 `Authorization` header
    /// (`Credential=AKID/...`), as AWS SDK clients send it. The signature is not verified.
    AwsAccessKey,
}

/// The `[identity]` section: how a request's client key is found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// What identifies the client (default `api_key`).
    pub source: IdentitySource,
    /// The header carrying the key for `api_key` and `header` (default `x-api-key`).
    pub header: String,
    /// Peers whose `X-Forwarded-For` is believed for `ip` (default none).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Refuse requests without a key (`401`) or with a key on no plan (`403`) (default
    /// `false`).
    pub require_known_key: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            source: IdentitySource::ApiKey,
            header: "x-api-key".to_owned(),
            trusted_proxies: Vec::new(),
            require_known_key: false,
        }
    }
}

/// Where the data plane serves the Lambda Invoke API
/// (`POST /2015-03-31/functions/{FunctionName}/invocations`); no route path may lie under it.
pub const LAMBDA_INVOKE_PREFIX: &str = "/2015-03-31/functions/";

/// `server.max_json_depth`'s default and largest value: `serde_json`'s recursion limit.
pub const DEFAULT_MAX_JSON_DEPTH: u32 = 128;
