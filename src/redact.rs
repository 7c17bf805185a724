//! Secrets out of printed config and logs: URL passwords and the admin token.
//!
//! URLs are parsed (WHATWG rules, the `url` crate), not split on `@`: a password may itself
//! contain `@` or `:`, and only the parser knows where the user-info really ends.
//!
//! A leaf: the config (printing itself) and the Redis backend (logging its address) use it.

use serde::Serializer;

/// What a secret is shown as.
pub const MASK: &str = "***";

/// `url` with its user-info (user name and password) replaced by `***`; other parts stay
/// as they are. The user name goes too: some services take a token there
/// (`https://<token>@host`). Text that does not parse as a URL is shown only up to its
/// scheme, since it may still hold a secret.
pub fn url(text: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(text) else {
        return match text.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{MASK}"),
            None if text.is_empty() => String::new(),
            None => MASK.to_owned(),
        };
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return text.to_owned();
    }
    // The setters fail only for URLs that cannot carry user-info (no host), and those
    // have none to hide; on failure fall back to hiding everything after the scheme.
    if parsed.set_password(None).is_err() || parsed.set_username(MASK).is_err() {
        return format!("{}://{MASK}", parsed.scheme());
    }
    parsed.to_string()
}

/// Serializes a present secret as `***` (serde `serialize_with`).
pub fn secret<S: Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str(MASK),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn a_password_holding_at_signs_is_hidden_whole() {
        let shown = url("redis://user:p@ss@host:6379");
        assert_eq!(shown, "redis://***@host:6379");
        assert!(!shown.contains("ss@"), "{shown}");
    }

    #[test]
    fn user_info_is_hidden_and_the_rest_is_kept() {
        assert_eq!(
            url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            url("redis://:s3cret@cache:6380/2"),
            "redis://***@cache:6380/2"
        );
        assert_eq!(
            url("https://a:b%40c@sqs.example.com/1/q"),
            "https://***@sqs.example.com/1/q"
        );
        assert_eq!(
            url("https://t0ken@example.com/x"),
            "https://***@example.com/x"
        );
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        assert_eq!(url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(url("http://127.0.0.1:9001"), "http://127.0.0.1:9001");
    }

    #[test]
    fn text_that_is_not_a_url_shows_only_its_scheme() {
        assert_eq!(url("redis://user:pw@[bad"), "redis://***");
        assert_eq!(url("not a url"), "***");
    }
}
