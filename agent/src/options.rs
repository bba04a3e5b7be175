//! Command-line values bounded at parse time: a duration or size outside what kvcheck can use
//! is refused with a clear error (exit 2) instead of overflowing later inside the agent
//! (`--etcd-timeout inf` once panicked). Pure; clap calls these as value parsers.

use std::time::Duration;

/// A humantime duration (`500ms`, `2s`, `5m`) within `min..=max`.
pub fn duration_in(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration such as 500ms, 2s or 5m: {e}"))?;
        if d < min || d > max {
            return Err(format!("{} is outside {}..={}", humantime::format_duration(d), humantime::format_duration(min), humantime::format_duration(max)));
        }
        Ok(d)
    }
}

/// A number of seconds (`5`, `0.5`) within `min..=max`, as a duration.
pub fn seconds_in(min: f64, max: f64) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f64 = s.trim().parse().map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
        if !v.is_finite() || v < min || v > max {
            return Err(format!("{s} seconds is outside {min}..={max}"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// An integer within `min..=max`.
pub fn integer_in(min: i64, max: i64) -> impl Fn(&str) -> Result<i64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: i64 = s.trim().parse().map_err(|e| format!("{s:?} is not an integer: {e}"))?;
        if v < min || v > max {
            return Err(format!("{v} is outside {min}..={max}"));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn absurd_values_are_refused_with_a_reason() {
        let t = seconds_in(0.1, 300.0);
        for bad in ["inf", "NaN", "-1", "1e300", "0.01", ""] {
            assert!(t(bad).is_err(), "{bad}");
        }
        assert_eq!(t("2.5"), Ok(Duration::from_millis(2500)));
        let d = duration_in(Duration::from_secs(1), Duration::from_secs(86_400));
        assert!(d("1000000000000000000000s").is_err() && d("999999h").is_err() && d("0s").is_err() && d("x").is_err());
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert!(integer_in(0, 1_000_000)("99999999999999999999").is_err());
    }

    proptest! {
        /// No input makes a parser panic, and what it accepts is within its bounds.
        #[test]
        fn parsers_never_panic_and_stay_in_bounds(s in "\\PC{0,40}", n in any::<f64>(), unit in "(ns|us|ms|s|m|h|d|y|)") {
            let (lo, hi) = (Duration::from_millis(10), Duration::from_secs(3600));
            for input in [s.clone(), format!("{n}{unit}"), format!("{}{unit}", n.abs() as u64)] {
                if let Ok(d) = duration_in(lo, hi)(&input) { prop_assert!(d >= lo && d <= hi); }
                if let Ok(d) = seconds_in(0.1, 300.0)(&input) { prop_assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(300)); }
                if let Ok(v) = integer_in(0, 1_000_000)(&input) { prop_assert!((0..=1_000_000).contains(&v)); }
            }
        }
    }
}
