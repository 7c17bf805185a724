//! Records every function runtime can parse.
//!
//! `serde_json`'s `RawValue` — what the edge validates a record with — accepts JSON that
//! many runtimes refuse: arrays and objects nested thousands deep (`serde_json` itself stops
//! at 128 levels, .NET at 64, Python and Jackson near 1,000) and `\u` escapes of lone UTF-16
//! surrogates (`"\ud800"`), which name no character. Such a record passes the edge and then
//! fails the whole batch it shares with other callers' records. [`check`] finds both in one
//! pass over the bytes, so the edge can refuse that record alone (`400`).
//!
//! The scan allocates nothing and looks at each byte once: it is on the path of every
//! admitted record. It runs after the body was validated as JSON, but never panics and
//! never reads out of bounds on any input.

use crate::config::Envelope;

/// Why a record is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unparseable {
    #[error("the record nests arrays and objects more than {limit} levels deep: with the levels around it, the payload would reach server.max_json_depth, which the function's JSON parser refuses")]
    TooDeep { limit: u32 },
    #[error("the record has a lone UTF-16 surrogate escape (\\u{unit:04x}) at byte {offset}, which names no character")]
    LoneSurrogate { unit: u16, offset: usize },
}

/// Levels of nesting a route's envelope puts around each record: `{"records":[{"body":…`.
fn envelope_levels(envelope: Envelope) -> u32 {
    match envelope {
        Envelope::Batch => 3,
        Envelope::Raw => 0,
    }
}

/// The deepest nesting a route's records may have. `server.max_json_depth` counts the
/// payload as the function's parser sees it, envelope included, the way `serde_json` counts
/// its recursion limit: a payload that reaches it is refused (`serde_json`, and so Rust
/// runtimes, parse at most 127 levels with the default 128). So a batch record may nest
/// `max_json_depth - 1 - 3` levels, a raw one `max_json_depth - 1`.
pub(crate) fn record_depth_limit(max_json_depth: u32, envelope: Envelope) -> u32 {
    max_json_depth.saturating_sub(1 + envelope_levels(envelope))
}

/// Checks that `json` nests arrays and objects at most `max_depth` levels deep (a scalar
/// is depth 0, `[]` depth 1) and that no string escapes a lone surrogate.
pub(crate) fn check(json: &[u8], max_depth: u32) -> Result<(), Unparseable> {
    let mut depth: u32 = 0;
    let mut i = 0;
    while let Some(&byte) = json.get(i) {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(Unparseable::TooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => {
                i = string_end(json, i + 1)?;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Scans the string whose contents start at `i`; returns the index just past its closing
/// quote (or the end of the input).
fn string_end(json: &[u8], mut i: usize) -> Result<usize, Unparseable> {
    while let Some(&byte) = json.get(i) {
        match byte {
            b'"' => return Ok(i + 1),
            b'\\' if json.get(i + 1) == Some(&b'u') => {
                let at = i;
                let unit = hex4(json, i + 2);
                i += 6;
                match unit {
                    Some(high @ 0xD800..=0xDBFF) => {
                        // A high surrogate is a character only with a low one right after it.
                        let low = match json.get(i..i + 2) {
                            Some(b"\\u") => hex4(json, i + 2),
                            _ => None,
                        };
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Err(Unparseable::LoneSurrogate {
                                unit: high,
                                offset: at,
                            });
                        }
                        i += 6;
                    }
                    Some(low @ 0xDC00..=0xDFFF) => {
                        return Err(Unparseable::LoneSurrogate {
                            unit: low,
                            offset: at,
                        })
                    }
                    _ => {}
                }
            }
            // Any other escape is two bytes; skipping the second keeps `\"` inside the string.
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// The four hex digits at `i`, if there are four.
fn hex4(json: &[u8], i: usize) -> Option<u16> {
    let digits = json.get(i..i + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn the_deepest_record_allowed_still_parses_with_serde_json_in_its_envelope() {
        let batch = record_depth_limit(128, Envelope::Batch) as usize;
        let in_envelope = |depth: usize| {
            format!(
                r#"{{"records":[{{"id":"r1","key":"-","body":{}}}]}}"#,
                nested(depth)
            )
        };
        assert!(serde_json::from_str::<serde_json::Value>(&in_envelope(batch)).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&in_envelope(batch + 1)).is_err());
        let raw = record_depth_limit(128, Envelope::Raw) as usize;
        assert!(serde_json::from_str::<serde_json::Value>(&nested(raw)).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(raw + 1)).is_err());
        assert_eq!(
            record_depth_limit(1, Envelope::Batch),
            0,
            "scalars only, no panic"
        );
    }

    #[test]
    fn depth_counts_arrays_and_objects_but_not_brackets_in_strings() {
        assert_eq!(check(b"1", 0), Ok(()));
        assert_eq!(check(b"[]", 1), Ok(()));
        assert_eq!(check(b"[]", 0), Err(Unparseable::TooDeep { limit: 0 }));
        assert_eq!(check(br#"{"a":[{"b":[]}]}"#, 4), Ok(()));
        assert!(check(br#"{"a":[{"b":[]}]}"#, 3).is_err());
        assert_eq!(check(br#"["[[[[\"[[[", "\\", [1]]"#, 2), Ok(()));
        assert_eq!(check(br#"[[],[],[[]],[]]"#, 3), Ok(()));
        assert_eq!(check(nested(128).as_bytes(), 128), Ok(()));
        assert!(check(nested(129).as_bytes(), 128).is_err());
        assert!(check(nested(5_000).as_bytes(), 128).is_err());
    }

    #[test]
    fn lone_surrogates_are_found_and_pairs_pass() {
        assert_eq!(
            check(br#""\ud800""#, 8),
            Err(Unparseable::LoneSurrogate {
                unit: 0xd800,
                offset: 1
            })
        );
        assert!(check(br#""\uDC00""#, 8).is_err());
        assert!(check(br#"{"\udbff":1}"#, 8).is_err());
        assert!(check(br#""\ud800\u0041""#, 8).is_err());
        assert!(check(br#""\ud800\n""#, 8).is_err());
        assert!(check(br#""\udc00\ud800""#, 8).is_err());
        assert_eq!(check(br#""\ud83d\ude00""#, 8), Ok(()));
        assert_eq!(check(br#""\\ud800""#, 8), Ok(()), "an escaped backslash");
        assert_eq!(check(br#""\u0041\uffff\ue000""#, 8), Ok(()));
    }

    #[test]
    fn truncated_input_never_panics() {
        for text in [
            &b"\"\\u"[..],
            b"\"\\ud800\\u",
            b"\"\\ud8",
            b"\"\\",
            b"[[\"",
            b"\\u",
        ] {
            let _ = check(text, 4);
        }
    }

    /// JSON values with deep nesting and every kind of `\u` escape near the surrogates.
    fn json_text() -> impl Strategy<Value = String> {
        let escape = prop_oneof![
            (0xD7F0u32..0xE010).prop_map(|u| format!("\\u{u:04x}")),
            (0xD7F0u32..0xE010).prop_map(|u| format!("\\u{u:04X}")),
            Just("\\n".to_owned()),
            Just("\\\\".to_owned()),
            Just("\\\"".to_owned()),
            Just("[{".to_owned()),
            "[a-z]{0,3}",
        ];
        let string = proptest::collection::vec(escape, 0..4)
            .prop_map(|parts| format!("\"{}\"", parts.concat()));
        let leaf = prop_oneof![
            string.clone(),
            Just("1".to_owned()),
            Just("null".to_owned())
        ];
        leaf.prop_recursive(140, 400, 3, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                (string.clone(), inner).prop_map(|(k, v)| format!("{{{k}:{v}}}")),
            ]
        })
    }

    proptest! {
        /// `serde_json` parsing into a `Value` (as a Rust runtime does) accepts exactly what
        /// the scan accepts at depth 127: its recursion limit of 128 refuses the 128th level.
        #[test]
        fn agrees_with_serde_json(
            inner in json_text(),
            wrap in prop_oneof![Just(0usize), 100usize..140],
        ) {
            // Wrapped in `wrap` arrays so the depth limit itself is exercised too.
            let text = format!("{}{inner}{}", "[".repeat(wrap), "]".repeat(wrap));
            prop_assume!(serde_json::from_str::<&serde_json::value::RawValue>(&text).is_ok());
            let serde = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            prop_assert_eq!(check(text.as_bytes(), 127).is_ok(), serde, "{}", text);
        }

        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), depth in 0u32..200) {
            let _ = check(&bytes, depth);
        }
    }
}
