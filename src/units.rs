//! Human units in config values: durations (`"250ms"`, `"3s"`, `"1m 30s"`) and byte
//! sizes (`"256KiB"`, `"5MiB"`, `"6MB"`, or a plain integer number of bytes).
//!
//! Both are parsed with messages that say what was expected, so a config error can name
//! the key and the value that was wrong.
//!
//! A leaf: the proxy's config and the emulator's config both use it, and it uses neither.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Parses a duration such as `"250ms"`, `"3s"`, `"2m"` or `"1h 5m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "invalid duration {text:?} ({e}); use a number with a unit, e.g. \"250ms\" or \"3s\""
        )
    })
}

/// Formats a duration the way it is written in config files.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A size in bytes, written `"256KiB"`, `"5MiB"`, `"1GiB"`, `"6MB"` (decimal) or a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` kibibytes (`n × 1024` bytes), for defaults written in code.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    /// `n` mebibytes (`n × 1024²` bytes), for defaults written in code.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// The size as `usize`; config sizes are bounded far below `usize::MAX` by validation.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let bad = || {
            format!("invalid size {text:?}; use an integer with a unit, e.g. \"256KiB\", \"5MiB\" or \"6MB\"")
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (mult, unit) in UNITS {
            if self.0 >= mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256KiB\" or an integer number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `#[serde(with = "crate::units::duration")]` for `std::time::Duration` fields.
pub mod duration {
    use super::*;

    /// Writes the duration in human units (`"250ms"`), as a config file would.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Reads a duration string in human units (`"3s"`, `"1m 30s"`); a bare number is an
    /// error, so a unit is never guessed.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(de::Error::custom)
    }
}

/// `#[serde(with = "crate::units::opt_duration")]` for `Option<Duration>` fields.
pub mod opt_duration {
    use super::*;

    /// Writes a present duration in human units and an absent one as none.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    /// Reads a duration string in human units; an absent key is `None` through the field's
    /// `#[serde(default)]`, not through this function.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(Some).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_binary_and_decimal_units() {
        assert_eq!("256KiB".parse::<ByteSize>(), Ok(ByteSize(262_144)));
        assert_eq!("5MiB".parse::<ByteSize>(), Ok(ByteSize(5 * 1024 * 1024)));
        assert_eq!("6MB".parse::<ByteSize>(), Ok(ByteSize(6_000_000)));
        assert_eq!("1024".parse::<ByteSize>(), Ok(ByteSize(1024)));
        assert!("5 furlongs"
            .parse::<ByteSize>()
            .unwrap_err()
            .contains("5 furlongs"));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::mib(5).to_string(), "5MiB");
        assert_eq!(ByteSize::kib(256).to_string(), "256KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn parses_durations_and_rejects_bare_numbers() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("30").unwrap_err().contains("\"30\""));
    }
}
