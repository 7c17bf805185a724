//! Request ids for the `x-request-id` header, when the caller sent none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderValue;

/// Request ids `<process prefix>-<connection>-<request>` in hex: unique, and cheap (no
/// random draw, no formatting machinery, and no counter shared between cores per request).
#[derive(Clone)]
pub(super) struct RequestIds {
    prefix: u32,
    connections: Arc<AtomicU64>,
}

impl RequestIds {
    pub(super) fn new() -> Self {
        RequestIds {
            prefix: rand::random(),
            connections: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The ids of one new connection's requests.
    pub(super) fn connection(&self) -> ConnectionIds {
        ConnectionIds {
            prefix: self.prefix,
            connection: self.connections.fetch_add(1, Ordering::Relaxed),
            next: AtomicU64::new(1),
        }
    }
}

/// [`RequestIds`] for one connection. Its requests are answered one after another, so the
/// sequence is only ever touched by the core serving it.
pub(super) struct ConnectionIds {
    prefix: u32,
    connection: u64,
    next: AtomicU64,
}

impl ConnectionIds {
    pub(super) fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut text = [0u8; 8 + 1 + 16 + 1 + 16];
        let mut len = hex(u64::from(self.prefix), 8, &mut text);
        for part in [self.connection, n] {
            text[len] = b'-';
            len += 1;
            len += hex(part, 1, &mut text[len..]);
        }
        HeaderValue::from_bytes(&text[..len]).expect("hex digits are a valid header value")
    }
}

/// Writes `n` in lower-case hex, at least `min_digits` long; returns the digits written.
fn hex(n: u64, min_digits: usize, out: &mut [u8]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - n.leading_zeros() as usize / 4).max(min_digits);
    for (i, byte) in out[..digits].iter_mut().enumerate() {
        *byte = DIGITS[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_pads_to_the_minimum_and_grows_past_it() {
        let mut out = [0u8; 16];
        let n = hex(0xab, 8, &mut out);
        assert_eq!(&out[..n], b"000000ab");
        let n = hex(0, 1, &mut out);
        assert_eq!(&out[..n], b"0");
        let n = hex(u64::MAX, 1, &mut out);
        assert_eq!(&out[..n], b"ffffffffffffffff");
        let n = hex(0x1_0000_0000, 8, &mut out);
        assert_eq!(&out[..n], b"100000000");
    }

    #[test]
    fn request_ids_are_unique_and_share_the_process_prefix() {
        let ids = RequestIds::new();
        let (one, two) = (ids.connection(), ids.clone().connection());
        let all = [one.next(), one.next(), two.next(), two.next()];
        let all: Vec<&str> = all.iter().map(|id| id.to_str().unwrap()).collect();
        for (i, a) in all.iter().enumerate() {
            let parts: Vec<&str> = a.split('-').collect();
            assert_eq!(parts.len(), 3, "{a}");
            assert_eq!(parts[0].len(), 8, "{a}");
            assert!(
                parts.iter().all(|p| u64::from_str_radix(p, 16).is_ok()),
                "{a}"
            );
            assert_eq!(parts[0], all[0].split('-').next().unwrap());
            assert!(all[i + 1..].iter().all(|b| a != b), "{all:?}");
        }
    }
}
