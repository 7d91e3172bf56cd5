//! Numbers as `pyebpf top` prints them.

/// `part` as a percentage of `whole` (0 when there is nothing).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// CPU seconds `samples` stand for at `rate_hz`.
pub fn seconds_of(samples: u64, rate_hz: u32) -> f64 {
    samples as f64 / f64::from(rate_hz.max(1))
}

/// A duration for a narrow column: `812ms`, `4.25s`, `1m05s`, `2h03m`.
pub fn format_duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0}ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.2}s")
    } else if secs < 3600.0 {
        let s = secs.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = (secs / 60.0).round() as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_display() {
        assert_eq!(percent(1, 4), 25.0);
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(seconds_of(250, 100), 2.5);
        assert_eq!(seconds_of(5, 0), 5.0);
        assert_eq!(format_duration(0.0101), "10ms");
        assert_eq!(format_duration(4.254), "4.25s");
        assert_eq!(format_duration(65.0), "1m05s");
        assert_eq!(format_duration(7380.0), "2h03m");
    }
}
