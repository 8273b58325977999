//! Human durations for flags: `90s`, `2h`, `1h30m`, `500ms`, `1d`.

use std::time::Duration;

/// Why a duration could not be read; says how to write one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing was given.
    #[error("empty duration; write e.g. 2h, 90s or 1h30m")]
    Empty,
    /// A number without a unit, or a unit without a number.
    #[error("{text:?} is not NUMBER UNIT; write e.g. 2h, 90s or 1h30m (units ms, s, m, h, d)")]
    Malformed {
        /// The text as given.
        text: String,
    },
    /// A unit that is none of ms, s, m, h, d.
    #[error("unknown unit {unit:?} in {text:?}; use ms, s, m, h or d, e.g. 2h, 90s or 1h30m")]
    Unit {
        /// The unit as given.
        unit: String,
        /// The whole text.
        text: String,
    },
    /// Zero or too long.
    #[error("{text:?} is {why}; give a duration above zero, e.g. 2h, 90s or 1h30m")]
    OutOfRange {
        /// The text as given.
        text: String,
        /// Zero, or too long.
        why: &'static str,
    },
}

/// Reads a sequence of NUMBER UNIT parts (`1h30m`), units `ms`, `s`, `m`,
/// `h`, `d`. The result is above zero.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed {
        text: text.to_string(),
    };
    let mut total: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let unit_len = rest[digits..].len()
            - rest[digits..]
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        if digits == 0 || unit_len == 0 {
            return Err(malformed());
        }
        let too_long = || DurationError::OutOfRange {
            text: text.to_string(),
            why: "too long",
        };
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        let unit = &rest[digits..digits + unit_len];
        let millis_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(DurationError::Unit {
                    unit: unit.to_string(),
                    text: text.to_string(),
                });
            }
        };
        total = number
            .checked_mul(millis_per)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(too_long)?;
        rest = &rest[digits + unit_len..];
    }
    if total == 0 {
        return Err(DurationError::OutOfRange {
            text: text.to_string(),
            why: "zero",
        });
    }
    Ok(Duration::from_millis(total))
}

/// `1h02m`, `3m05s`, `12s`, `0.4s`: short, for progress lines.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..10 => format!("{:.1}s", d.as_secs_f64()),
        10..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_usual_forms() {
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("90"),
            Err(DurationError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("h"),
            Err(DurationError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::Malformed { .. })
        ));
        assert!(matches!(
            parse_duration("2x"),
            Err(DurationError::Unit { .. })
        ));
        assert!(matches!(
            parse_duration("0s"),
            Err(DurationError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(DurationError::OutOfRange { .. })
        ));
    }

    #[test]
    fn formats_short() {
        assert_eq!(format_duration(Duration::from_millis(400)), "0.4s");
        assert_eq!(format_duration(Duration::from_secs(75)), "1m15s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h02m");
    }
}
