//! The usage-plan quota vocabulary: at most `limit` requests per key per day, week or month
//! ([`UsageQuota`]), the UTC period an instant falls in ([`UsageQuota::window`]), and what a
//! key has used of it ([`UsageState`]).
//!
//! Not to be confused with [`crate::quota::Quota`], a *throttle* (token bucket, `rate` and
//! `burst`). API Gateway usage plans have both: throttling (`ThrottleSettings`) and a quota
//! (`QuotaSettings`: `limit`, `period` = `DAY` | `WEEK` | `MONTH`, `offset`). This module
//! holds the second; admission (`limit`) counts against it and the config names it
//! `quota = { limit, period, offset }` on a plan or on `limits.default`.
//!
//! # Periods
//!
//! Periods start at 00:00 UTC, as API Gateway's do, and tile time with no gap or overlap:
//!
//! - `day`: every day; `offset` must be 0.
//! - `week`: seven days starting on weekday `offset`, `0` = Sunday … `6` = Saturday (the
//!   SDKs' `QuotaSettings.offset`: "with a time period of WEEK, an offset of 0 starts on
//!   Sunday, and an offset of 1 starts on Monday").
//! - `month`: from day `offset + 1` of one month to the same day of the next; `offset`
//!   `0..=27`, so the start day exists in every month, February of common years included.
//!
//! The arithmetic is plain civil-from-days over Unix seconds (proleptic Gregorian, leap
//! years included), so there is no date library and no time zone database: UTC has neither
//! daylight saving nor, in Unix time, leap seconds.
//!
//! A leaf like [`crate::quota`]: the config, admission and the server speak these types.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Seconds in a day.
const DAY: u64 = 86_400;

/// The largest `limit` accepted: far beyond any real plan, and within what Redis' 64-bit
/// counters and JSON numbers hold exactly.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// The length of a usage-quota period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// One UTC day.
    #[serde(alias = "DAY")]
    Day,
    /// Seven UTC days from the weekday named by the offset (0 = Sunday).
    #[serde(alias = "WEEK")]
    Week,
    /// One calendar month from the day named by the offset (0 = the 1st).
    #[serde(alias = "MONTH")]
    Month,
}

impl Period {
    /// The name used in the config and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The largest offset this period takes.
    pub fn max_offset(self) -> u32 {
        match self {
            Period::Day => 0,
            Period::Week => 6,
            Period::Month => 27,
        }
    }
}

/// A usage plan's quota: at most `limit` requests per key in each period.
///
/// The config writes it `quota = { limit = 100000, period = "month", offset = 0 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuota {
    /// Requests a key may make per period (`1..=`[`MAX_LIMIT`]).
    pub limit: u64,
    /// The period's length.
    pub period: Period,
    /// Where the period starts: weekday for `week` (0 = Sunday), day of the month minus one
    /// for `month`; must be 0 for `day`. Default 0.
    #[serde(default)]
    pub offset: u32,
}

/// One period: `[start, end)` in whole seconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// The period's first second.
    pub start: u64,
    /// The next period's first second.
    pub end: u64,
}

impl Window {
    /// The period's length in seconds (28 to 31 days for a month).
    pub fn secs(&self) -> u64 {
        self.end - self.start
    }

    /// Time from `now` (since the Unix epoch) until the next period starts; zero once it has.
    pub fn until_end(&self, now: Duration) -> Duration {
        Duration::from_secs(self.end).saturating_sub(now)
    }
}

impl UsageQuota {
    /// Checks `limit` and the offset's range for the period. The message names the problem
    /// but not the key; the config loader adds the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(format!(
                "limit must be in 1..={MAX_LIMIT}, got {}",
                self.limit
            ));
        }
        let max = self.period.max_offset();
        if self.offset > max {
            let what = match self.period {
                Period::Day => "a day period takes no offset (0)",
                Period::Week => "a week's offset is its first weekday, 0 (Sunday) ..= 6 (Saturday)",
                Period::Month => "a month's offset is its first day minus one, 0 ..= 27",
            };
            return Err(format!("offset {} is out of range: {what}", self.offset));
        }
        Ok(())
    }

    /// The period containing `now` (since the Unix epoch, UTC). `offset` is assumed valid
    /// (validated with the config); an out-of-range one is clamped to the period's range.
    pub fn window(&self, now: Duration) -> Window {
        let offset = u64::from(self.offset.min(self.period.max_offset()));
        let day = now.as_secs() / DAY;
        let (start, end) = match self.period {
            Period::Day => (day, day + 1),
            Period::Week => {
                // 1970-01-01 was a Thursday: weekday 4 when Sunday is 0.
                let weekday = (day + 4) % 7;
                // Saturating: only the first days of 1970 have no earlier start.
                let start = day.saturating_sub((weekday + 7 - offset) % 7);
                (start, start + 7)
            }
            Period::Month => {
                let (year, month, mday) = civil_from_days(day);
                let first = offset + 1;
                let (y, m) = if u64::from(mday) >= first {
                    (year, month)
                } else {
                    previous_month(year, month)
                };
                let (ny, nm) = next_month(y, m);
                (
                    days_from_civil(y, m, first).max(0) as u64,
                    days_from_civil(ny, nm, first).max(0) as u64,
                )
            }
        };
        Window {
            start: start * DAY,
            end: end * DAY,
        }
    }
}

/// What a key has used of its usage quota in the current period, for the `RateLimit` fields,
/// `Retry-After` and the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageState {
    /// The quota counted against.
    pub quota: UsageQuota,
    /// Requests counted in the current period (this one included when admitted).
    pub used: u64,
    /// The current period's length in seconds (`w` of `RateLimit-Policy`).
    pub period_secs: u64,
    /// Time until the next period starts (`Retry-After` of a refusal, `t` of `RateLimit`).
    pub reset: Duration,
}

impl UsageState {
    /// Requests left in the current period.
    pub fn left(&self) -> u64 {
        self.quota.limit.saturating_sub(self.used)
    }
}

/// `(year, month 1..=12, day 1..=31)` of day number `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Day number since 1970-01-01 (negative before it) of a date from year 1 on (Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: u64, month: u32, day: u64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let m = u64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe) as i64 - 719_468
}

fn previous_month(year: u64, month: u32) -> (u64, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

fn next_month(year: u64, month: u32) -> (u64, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(year: u64, month: u32, day: u64, secs: u64) -> Duration {
        Duration::from_secs(days_from_civil(year, month, day) as u64 * DAY + secs)
    }

    fn quota(period: Period, offset: u32) -> UsageQuota {
        UsageQuota {
            limit: 10,
            period,
            offset,
        }
    }

    fn window_of(q: UsageQuota, t: Duration) -> (Duration, Duration) {
        let w = q.window(t);
        (Duration::from_secs(w.start), Duration::from_secs(w.end))
    }

    #[test]
    fn civil_dates_round_trip_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(
            civil_from_days(days_from_civil(2100, 3, 1) as u64 - 1),
            (2100, 2, 28)
        );
    }

    #[test]
    fn a_day_runs_from_midnight_to_midnight_utc() {
        let q = quota(Period::Day, 0);
        assert_eq!(
            window_of(q, at(2026, 12, 1, 4 * 3600)),
            (at(2026, 12, 1, 0), at(2026, 12, 2, 0))
        );
        assert_eq!(
            window_of(q, at(2026, 12, 31, DAY - 1)),
            (at(2026, 12, 31, 0), at(2027, 1, 1, 0))
        );
    }

    #[test]
    fn a_week_starts_on_the_weekday_named_by_the_offset() {
        // 2026-12-01 is a Tuesday.
        let tuesday = at(2026, 12, 1, 12 * 3600);
        assert_eq!(
            window_of(quota(Period::Week, 0), tuesday),
            (at(2026, 11, 29, 0), at(2026, 12, 6, 0)),
            "offset 0: Sunday"
        );
        assert_eq!(
            window_of(quota(Period::Week, 1), tuesday),
            (at(2026, 11, 30, 0), at(2026, 12, 7, 0)),
            "offset 1: Monday"
        );
        assert_eq!(
            window_of(quota(Period::Week, 2), tuesday),
            (at(2026, 12, 1, 0), at(2026, 12, 8, 0)),
            "offset 2: Tuesday, today"
        );
        assert_eq!(
            window_of(quota(Period::Week, 3), tuesday),
            (at(2026, 11, 25, 0), at(2026, 12, 2, 0)),
            "offset 3: last Wednesday"
        );
        // The last second of Saturday is still in a Sunday-started week; Sunday starts the next.
        assert_eq!(
            window_of(quota(Period::Week, 0), at(2026, 12, 5, DAY - 1)).1,
            at(2026, 12, 6, 0)
        );
        assert_eq!(
            window_of(quota(Period::Week, 0), at(2026, 12, 6, 0)).0,
            at(2026, 12, 6, 0)
        );
    }

    #[test]
    fn a_month_follows_month_lengths_and_leap_years() {
        let q = quota(Period::Month, 0);
        assert_eq!(
            window_of(q, at(2024, 2, 29, 3600)),
            (at(2024, 2, 1, 0), at(2024, 3, 1, 0)),
            "February of a leap year has 29 days"
        );
        assert_eq!(q.window(at(2024, 2, 10, 0)).secs(), 29 * DAY);
        assert_eq!(q.window(at(2023, 2, 10, 0)).secs(), 28 * DAY);
        assert_eq!(
            q.window(at(2100, 2, 10, 0)).secs(),
            28 * DAY,
            "2100 is no leap year"
        );
        assert_eq!(q.window(at(2000, 2, 10, 0)).secs(), 29 * DAY, "2000 is one");
        assert_eq!(q.window(at(2026, 4, 30, 0)).secs(), 30 * DAY);
        assert_eq!(
            window_of(q, at(2026, 12, 31, DAY - 1)),
            (at(2026, 12, 1, 0), at(2027, 1, 1, 0))
        );
    }

    #[test]
    fn a_month_offset_moves_the_first_day() {
        // Offset 14: periods run from the 15th to the 15th.
        let q = quota(Period::Month, 14);
        assert_eq!(
            window_of(q, at(2026, 1, 14, DAY - 1)),
            (at(2025, 12, 15, 0), at(2026, 1, 15, 0))
        );
        assert_eq!(
            window_of(q, at(2026, 1, 15, 0)),
            (at(2026, 1, 15, 0), at(2026, 2, 15, 0))
        );
        // Offset 27: the 28th, which every February has; across a leap February.
        let q = quota(Period::Month, 27);
        assert_eq!(
            window_of(q, at(2024, 2, 29, 0)),
            (at(2024, 2, 28, 0), at(2024, 3, 28, 0))
        );
        assert_eq!(
            window_of(q, at(2024, 3, 27, 0)),
            (at(2024, 2, 28, 0), at(2024, 3, 28, 0))
        );
        assert_eq!(
            window_of(q, at(2026, 1, 3, 0)),
            (at(2025, 12, 28, 0), at(2026, 1, 28, 0))
        );
    }

    #[test]
    fn offsets_are_validated_per_period() {
        assert_eq!(quota(Period::Day, 0).validate(), Ok(()));
        assert!(quota(Period::Day, 1)
            .validate()
            .unwrap_err()
            .contains("day period takes no offset"));
        assert_eq!(quota(Period::Week, 6).validate(), Ok(()));
        assert!(quota(Period::Week, 7).validate().is_err());
        assert_eq!(quota(Period::Month, 27).validate(), Ok(()));
        assert!(quota(Period::Month, 28)
            .validate()
            .unwrap_err()
            .contains("0 ..= 27"));
        let zero = UsageQuota {
            limit: 0,
            ..quota(Period::Day, 0)
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .contains("limit must be in 1..="));
    }

    #[test]
    fn the_state_reports_what_is_left() {
        let state = UsageState {
            quota: quota(Period::Day, 0),
            used: 12,
            period_secs: DAY,
            reset: Duration::from_secs(5),
        };
        assert_eq!(state.left(), 0);
        assert_eq!(UsageState { used: 3, ..state }.left(), 7);
    }

    fn any_quota() -> impl Strategy<Value = UsageQuota> {
        prop_oneof![
            Just(Period::Day).prop_map(|p| quota(p, 0)),
            (0u32..=6).prop_map(|o| quota(Period::Week, o)),
            (0u32..=27).prop_map(|o| quota(Period::Month, o)),
        ]
    }

    proptest! {
        /// Every instant lies in its period, periods start at midnight, have the period's
        /// length, start on the offset's day, and tile time: the next period starts where
        /// this one ends, and the instant before the start belongs to the previous one.
        #[test]
        fn periods_contain_the_instant_and_tile_time(
            q in any_quota(),
            // 1971 to about 2200 (before, the previous period would start before 1970),
            // at nanosecond resolution.
            nanos in 31_536_000_000_000_000u64..7_300_000_000_000_000_000,
        ) {
            let now = Duration::from_nanos(nanos);
            let w = q.window(now);
            prop_assert!(Duration::from_secs(w.start) <= now);
            prop_assert!(now < Duration::from_secs(w.end));
            prop_assert_eq!(w.start % DAY, 0);
            let days = w.secs() / DAY;
            match q.period {
                Period::Day => prop_assert_eq!(days, 1),
                Period::Week => {
                    prop_assert_eq!(days, 7);
                    prop_assert_eq!((w.start / DAY + 4) % 7, u64::from(q.offset));
                }
                Period::Month => {
                    prop_assert!((28..=31).contains(&days));
                    prop_assert_eq!(civil_from_days(w.start / DAY).2, q.offset + 1);
                }
            }
            let next = q.window(Duration::from_secs(w.end));
            prop_assert_eq!(next.start, w.end);
            if w.start > 0 {
                let previous = q.window(Duration::from_secs(w.start - 1));
                prop_assert_eq!(previous.end, w.start);
            }
        }

        #[test]
        fn civil_dates_round_trip(days in 0u64..200_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, u64::from(d)), days as i64);
        }
    }
}
