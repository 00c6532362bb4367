//! How long to wait before asking again: exponential backoff for our own retries, and a
//! server's `Retry-After` (RFC 9110 §10.2.3) read strictly. Pure; no I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delay before retry number `failures` (1-based): `min · 2^(failures-1)`, at most `max`.
pub(crate) fn retry_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << shift).min(max)
}

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delay-seconds (ASCII digits only; a value
/// too large for `u64` saturates) or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), taken
/// relative to `now` (a date in the past is zero). Anything else — a sign, a fraction, the
/// obsolete date forms, garbage — is `None`.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim_matches([' ', '\t']);
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = parse_imf_fixdate(v)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch of an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_imf_fixdate(v: &str) -> Option<u64> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = v.as_bytes();
    if b.len() != 29 || v.get(3..5) != Some(", ") || v.get(25..) != Some(" GMT") {
        return None;
    }
    if !DAYS.contains(&v.get(..3)?) || b[7] != b' ' || b[11] != b' ' || b[16] != b' ' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let s = v.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let day = num(5..7)?;
    let month = MONTHS.iter().position(|m| Some(*m) == v.get(8..11))? as u64 + 1;
    let year = num(12..16)?;
    if b[19] != b':' || b[22] != b':' {
        return None;
    }
    let (h, m, sec) = (num(17..19)?, num(20..22)?, num(23..25)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1970
        || day == 0
        || day > month_days[month as usize - 1]
        || h > 23
        || m > 59
        || sec > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3_600 + m * 60 + sec)
}

/// The timeout left for asking again after waiting `wait`, when that still fits in `budget`
/// with `elapsed` already spent; `None` when it does not fit (the fetch fails now).
pub(crate) fn retry_within(
    wait: Duration,
    elapsed: Duration,
    budget: Duration,
) -> Option<Duration> {
    let left = budget.checked_sub(elapsed)?.checked_sub(wait)?;
    (!left.is_zero()).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_clamps() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(retry_delay(1, min, max), Duration::from_millis(500));
        assert_eq!(retry_delay(2, min, max), Duration::from_secs(1));
        assert_eq!(retry_delay(4, min, max), Duration::from_secs(4));
        assert_eq!(retry_delay(10, min, max), max);
        assert_eq!(retry_delay(u32::MAX, min, max), max);
    }

    #[test]
    fn retry_after_values() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let secs = |s: u64| Some(Duration::from_secs(s));
        let cases: &[(&str, Option<Duration>)] = &[
            ("1", secs(1)),
            ("0", secs(0)),
            (" 30 ", secs(30)),
            ("007", secs(7)),
            ("99999999999999999999999999", secs(u64::MAX)),
            ("Sun, 06 Nov 1994 08:49:47 GMT", secs(10)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", secs(0)),
            ("Sat, 05 Nov 1994 08:49:37 GMT", secs(0)),
            ("Mon, 07 Nov 1994 08:49:37 GMT", secs(86_400)),
            (
                "Thu, 29 Feb 1996 00:00:00 GMT",
                secs(825_552_000 - 784_111_777),
            ),
            ("-1", None),
            ("+1", None),
            ("1.5", None),
            ("1e3", None),
            ("", None),
            ("  ", None),
            ("soon", None),
            ("1 2", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 32 Nov 1994 08:49:37 GMT", None),
            ("Thu, 29 Feb 1995 00:00:00 GMT", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 24:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49:3x GMT", None),
            ("Sun, 06 Nov 1994 08-49-37 GMT", None),
            ("Sunday, 06-Nov-94 08:49:37 GMT", None),
            ("Sun Nov  6 08:49:37 1994", None),
            ("Sun, 06 Nov 1969 08:49:37 GMT", None),
            ("Sun, +6 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 GMTé", None),
            ("Sun, 06 Nov 1994 08:49:é GMT", None),
            ("Sun,é6 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 GMé", None),
            ("Sun, 06 Nov 1994 é8:49:37 GMT", None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_retry_after(v, now), *want, "{v:?}");
        }
    }

    #[test]
    fn a_retry_after_is_waited_only_within_the_budget() {
        let ms = Duration::from_millis;
        let budget = ms(5_000);
        assert_eq!(retry_within(ms(1_000), ms(20), budget), Some(ms(3_980)));
        assert_eq!(retry_within(ms(0), ms(20), budget), Some(ms(4_980)));
        assert_eq!(retry_within(ms(4_980), ms(20), budget), None);
        assert_eq!(retry_within(ms(30_000), ms(20), budget), None);
        assert_eq!(retry_within(ms(1_000), ms(6_000), budget), None);
        assert_eq!(retry_within(Duration::MAX, ms(0), budget), None);
    }
}
