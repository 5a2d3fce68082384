//! The one duration grammar of every Ward command line and the policy file: a whole number
//! followed by a unit, `ms`, `s`, `m`, `h` or `d` (`500ms`, `90s`, `15m`, `1h`, `14d`). A bare
//! number is seconds (`42` = `42s`). At most 12 digits; the result must fit in a `u64` of
//! milliseconds.

use std::time::Duration;

/// A string that is not a duration in [the grammar](self).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad duration {input:?}: use a number and ms, s, m, h or d (\"500ms\", \"90s\", \"15m\", \"1h\", \"7d\")")]
pub struct DurationError {
    pub input: String,
}

/// Parses a duration into milliseconds.
pub fn parse_ms(s: &str) -> Result<u64, DurationError> {
    let bad = || DurationError {
        input: crate::names::shorten(s),
    };
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 12 {
        return Err(bad());
    }
    let n: u64 = s[..digits].parse().map_err(|_| bad())?;
    let unit: u64 = match &s[digits..] {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

/// Parses a duration.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    parse_ms(s).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("90s"), Ok(90_000));
        assert_eq!(parse_ms("15m"), Ok(900_000));
        assert_eq!(parse_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(parse_ms("42"), Ok(42_000));
        assert_eq!(parse_ms(" 3s "), Ok(3000));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "h",
            "1y",
            "1.5h",
            "-1s",
            "1 h",
            "1hh",
            "ms",
            "9999999999999s",
            "１s",
        ] {
            let e = parse_ms(bad).unwrap_err();
            assert!(e.to_string().contains("bad duration"), "{bad:?}: {e}");
        }
        // 12 digits of days overflow u64 milliseconds.
        assert!(parse_ms("999999999999d").is_err());
        assert_eq!(parse_ms("999999999999ms"), Ok(999_999_999_999));
    }

    #[test]
    fn overlong_input_is_shortened_in_the_error() {
        let long = "x".repeat(10_000);
        assert!(parse_ms(&long).unwrap_err().input.chars().count() <= 41);
    }
}
