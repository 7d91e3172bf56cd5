//! Interactive flamegraph SVG, drawn by inferno from the folded lines.
use anyhow::Context;
use inferno::flamegraph::{self, color::MultiPalette, Palette};

use super::{folded, Profile, ValueUnit};

/// Write `p` as an SVG flamegraph titled `title`. Fails on a profile without
/// samples (inferno cannot draw an empty graph).
pub fn write(p: &Profile, title: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let total = p.total_samples();
    anyhow::ensure!(total > 0, "no samples recorded: nothing to draw");
    let lines = folded::lines(p);

    let mut opt = flamegraph::Options::default();
    opt.title = title.to_string();
    opt.subtitle = Some(subtitle(p, total));
    opt.count_name = match p.kind.unit() {
        ValueUnit::Samples => "samples",
        ValueUnit::Nanoseconds => "ns",
    }
    .to_string();
    // Colours from the frame text, which includes the filename: stdlib
    // (`python3.11/`), site-packages and application code get distinct hues;
    // synthetic frames fall back to the application hue.
    opt.colors = Palette::Multi(MultiPalette::Python);
    // Colour by name hash, so a function keeps its colour across runs.
    opt.hash = true;

    flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), out)
        .context("drawing flamegraph")?;
    Ok(())
}

fn subtitle(p: &Profile, total: u64) -> String {
    let secs = total as f64 * p.ns_per_value() as f64 / 1e9;
    match p.kind.unit() {
        ValueUnit::Samples => format!(
            "{total} samples at {} Hz over {:.1} s ({secs:.2} s of CPU)",
            p.rate_hz,
            p.duration.as_secs_f64()
        ),
        ValueUnit::Nanoseconds => format!(
            "{secs:.2} s of {} over {:.1} s (widths in ns)",
            p.kind.describe(),
            p.duration.as_secs_f64()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::folded::tests::sample_profile;

    #[test]
    fn renders_names_and_title() {
        let mut out = Vec::new();
        write(&sample_profile(), "CPU of <app> & co", &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("CPU of &lt;app&gt; &amp; co"));
        assert!(svg.contains("15 samples at 100 Hz over 2.5 s (0.15 s of CPU)"));
        for name in [
            "функция (/srv/модуль.py:7)",
            "Klass.odd:name (/srv/app.py:30)",
            "&lt;module&gt; (/srv/app.py:10)",
            "process 42 (python3 app.py)",
            "[truncated]",
            "[unknown code object: stale]",
            "[partial stack: read failed]",
        ] {
            assert!(svg.contains(name), "missing {name}");
        }
        // Same input, same bytes: colours are hashed, not random.
        let mut again = Vec::new();
        write(&sample_profile(), "CPU of <app> & co", &mut again).unwrap();
        assert_eq!(svg.as_bytes(), &again[..]);
    }

    #[test]
    fn nanosecond_profiles_say_so() {
        let mut p = Profile::of_kind(crate::profile::ProfileKind::OffCpu, 100);
        p.duration = std::time::Duration::from_secs(4);
        p.add(
            vec![crate::profile::Frame::Kernel {
                function: "do_epoll_wait".into(),
            }],
            1_500_000_000,
        );
        let mut out = Vec::new();
        write(&p, "t", &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.contains("1.50 s of off-CPU time over 4.0 s (widths in ns)"));
        assert!(
            svg.contains("[kernel] do_epoll_wait (1,500,000,000 ns"),
            "{svg}"
        );
    }

    #[test]
    fn empty_profile_is_an_error() {
        let mut out = Vec::new();
        assert!(write(&Profile::new(100), "t", &mut out).is_err());
        assert!(out.is_empty());
    }
}
