//! SigV4 for the direct transport's one request shape, with what does not change between
//! invokes computed once. `aws-sigv4`'s `sign` builds a general canonical request (it sorts
//! and normalises arbitrary headers, formats through `Display`) and derives the signing key
//! (four HMACs) for every request; an invoke differs from the next only in its time, its
//! payload hash and its invocation type.
//!
//! So, per function ([`Shape`]): the canonical URI (the path `%`-encoded again, as `aws-sigv4`
//! does for every service but S3; a path it would have to normalise gets no shape). Per
//! credentials and UTC day: the signing key ([`KeyCache`]). Per invoke: the date, the
//! payload's SHA-256, the canonical request, the string to sign and one HMAC.
//!
//! The result must be exactly what `aws-sigv4` computes: the direct client checks each
//! function's shape against it when it builds the function's target (for both invocation
//! types, with and without a session token), and signs a function whose shape does not agree
//! with `aws-sigv4` instead, as it does any invoke [`Shape::sign`] declines (a session token
//! with whitespace around it, a time before 1970; the client never signs past 9999, where
//! both signers' date formatting fails). The fault tests also recompute every signature on
//! the wire.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::sign::v4::{calculate_signature, generate_signing_key};
use http::HeaderValue;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// The service name Lambda is signed for.
const SERVICE: &str = "lambda";

/// What one request carries: the `content-type` and `x-amz-invocation-type` headers, `host`,
/// and the headers the signature adds.
const SIGNED: &str = "content-type;host;x-amz-date;x-amz-invocation-type";
const SIGNED_WITH_TOKEN: &str =
    "content-type;host;x-amz-date;x-amz-invocation-type;x-amz-security-token";

/// A function's fixed part of the canonical request.
pub(super) struct Shape {
    /// `POST\n<canonical URI>\n\ncontent-type:application/octet-stream\nhost:<host>\n`
    head: String,
}

/// The headers a signature adds to an invoke.
pub(super) struct Signed {
    pub(super) authorization: HeaderValue,
    pub(super) date: HeaderValue,
    pub(super) token: Option<HeaderValue>,
}

impl Signed {
    /// The headers as (name, value) pairs sorted by name, as `aws-sigv4`'s instructions are
    /// compared with them.
    pub(super) fn pairs(&self) -> Vec<(&'static str, &str)> {
        fn text(value: &HeaderValue) -> &str {
            value.to_str().unwrap_or_default()
        }
        let mut pairs = vec![
            ("authorization", text(&self.authorization)),
            ("x-amz-date", text(&self.date)),
        ];
        if let Some(token) = &self.token {
            pairs.push(("x-amz-security-token", text(token)));
        }
        pairs.sort_unstable();
        pairs
    }
}

/// One credentials' signing key for one UTC day.
#[derive(Default)]
pub(super) struct KeyCache(Mutex<Option<(u64, [u8; 32])>>);

impl KeyCache {
    fn key(&self, secret: &str, day: u64, time: SystemTime, region: &str) -> [u8; 32] {
        let mut cached = self.0.lock();
        if let Some((cached_day, key)) = *cached {
            if cached_day == day {
                return key;
            }
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(generate_signing_key(secret, time, region, SERVICE).as_ref());
        *cached = Some((day, key));
        key
    }
}

impl Shape {
    /// The shape of invokes to `path` (the Invoke URI's path, percent-encoded once) on `host`,
    /// if `path` needs no normalising (no `.` or `..` segment, no `//`).
    pub(super) fn new(path: &str, host: &str) -> Option<Shape> {
        if path.is_empty()
            || !path.starts_with('/')
            || path.contains("//")
            || path.split('/').any(|s| s == "." || s == "..")
        {
            return None;
        }
        let mut head = String::with_capacity(path.len() + host.len() + 64);
        head.push_str("POST\n");
        for c in path.chars() {
            // Double encoding: the path is encoded already; only its `%` is encoded again.
            if c == '%' {
                head.push_str("%25");
            } else {
                head.push(c);
            }
        }
        head.push_str("\n\ncontent-type:application/octet-stream\nhost:");
        head.push_str(host);
        head.push('\n');
        Some(Shape { head })
    }

    /// The signature headers of an invoke of `invocation_type` carrying `payload`, at `time`.
    pub(super) fn sign(
        &self,
        credentials: &Credentials,
        keys: &KeyCache,
        region: &str,
        invocation_type: &str,
        payload: &[u8],
        time: SystemTime,
    ) -> Option<Signed> {
        let secs = time.duration_since(UNIX_EPOCH).ok()?.as_secs();
        let day = secs / 86_400;
        let stamp = amz_date(secs);
        let date = &stamp[..8];
        let token = credentials.session_token();
        // `aws-sigv4` signs a token as it is, where a header value is trimmed: leave such a
        // token to it rather than guess which way the server reads it.
        if token.is_some_and(|token| token.trim() != token) {
            return None;
        }
        let signed_headers = if token.is_some() {
            SIGNED_WITH_TOKEN
        } else {
            SIGNED
        };

        let mut canonical =
            String::with_capacity(self.head.len() + 256 + token.map_or(0, str::len));
        canonical.push_str(&self.head);
        canonical.push_str("x-amz-date:");
        canonical.push_str(&stamp);
        canonical.push_str("\nx-amz-invocation-type:");
        canonical.push_str(invocation_type);
        canonical.push('\n');
        if let Some(token) = token {
            canonical.push_str("x-amz-security-token:");
            canonical.push_str(token);
            canonical.push('\n');
        }
        canonical.push('\n');
        canonical.push_str(signed_headers);
        canonical.push('\n');
        push_hex(&mut canonical, &Sha256::digest(payload));

        let mut to_sign = String::with_capacity(160);
        to_sign.push_str("AWS4-HMAC-SHA256\n");
        to_sign.push_str(&stamp);
        to_sign.push('\n');
        let scope_start = to_sign.len();
        let _ = write!(to_sign, "{date}/{region}/{SERVICE}/aws4_request");
        let scope_end = to_sign.len();
        to_sign.push('\n');
        push_hex(&mut to_sign, &Sha256::digest(canonical.as_bytes()));

        let key = keys.key(credentials.secret_access_key(), day, time, region);
        let signature = calculate_signature(key, to_sign.as_bytes());

        let mut authorization = String::with_capacity(200);
        authorization.push_str("AWS4-HMAC-SHA256 Credential=");
        authorization.push_str(credentials.access_key_id());
        authorization.push('/');
        authorization.push_str(&to_sign[scope_start..scope_end]);
        authorization.push_str(", SignedHeaders=");
        authorization.push_str(signed_headers);
        authorization.push_str(", Signature=");
        authorization.push_str(&signature);

        // Never shown in a debug print (`aws-sigv4` marks the token alone).
        let sensitive = |text: &str| {
            HeaderValue::from_str(text).ok().map(|mut value| {
                value.set_sensitive(true);
                value
            })
        };
        Some(Signed {
            authorization: sensitive(&authorization)?,
            date: HeaderValue::from_str(&stamp).ok()?,
            token: match token {
                Some(token) => Some(sensitive(token)?),
                None => None,
            },
        })
    }
}

/// `YYYYMMDDTHHMMSSZ` for `secs` since the epoch (UTC).
fn amz_date(secs: u64) -> String {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    let mut stamp = String::with_capacity(16);
    let _ = write!(
        stamp,
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    stamp
}

/// The proleptic Gregorian date of day `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
}
