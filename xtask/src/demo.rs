//! `cargo xtask demo`: profile examples/busy.py and show a flamegraph and its hottest leaves.

use crate::bootstrap;
use crate::util::{cargo, cmd, root, target_dir};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

const EXAMPLE: &str = "examples/busy.py";
const SVG: &str = "pyebpf-demo.svg";
const FOLDED: &str = "pyebpf-demo.folded";

/// Kills and reaps the example when dropped, whatever happened in between.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    let root = root();
    if !root.join(EXAMPLE).exists() {
        bail!("{EXAMPLE} does not exist yet: the demo needs a CPU-bound Python example there");
    }
    bootstrap::run()?;
    cargo(&["build", "--release"]).run()?;

    let pyebpf = target_dir().join("release/pyebpf");
    if !pyebpf.exists() {
        bail!(
            "{} was not built: does profiler-daemon have a `pyebpf` binary?",
            pyebpf.display()
        );
    }
    let pyebpf = pyebpf.to_string_lossy().into_owned();

    // pyenv's `python3` shim may fork instead of exec, so the pid of the shim
    // is not the interpreter's: start the real binary.
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("cannot run python3")?;
    let python = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || python.is_empty() {
        bail!("python3 did not report its executable");
    }
    println!("$ {python} {EXAMPLE} &");
    let child = Command::new(&python)
        .arg(EXAMPLE)
        .current_dir(&root)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start python3 {EXAMPLE}"))?;
    let child = Guard(child);
    let pid = child.0.id().to_string();

    for (format, output) in [("svg", SVG), ("folded", FOLDED)] {
        cmd(&pyebpf, &["record", "--pid", &pid, "--duration", "5"])
            .args(["--format", format, "--output", output])
            .run()?;
    }
    drop(child);

    println!("\nflamegraph: {}", root.join(SVG).display());
    let folded =
        std::fs::read_to_string(root.join(FOLDED)).with_context(|| format!("reading {FOLDED}"))?;
    print_top_leaves(&folded, 10);
    Ok(())
}

/// Samples per leaf (last `;`-separated frame) over `frames... COUNT` lines, hottest first.
fn leaf_totals(folded: &str) -> Vec<(&str, u64)> {
    let mut leaves: HashMap<&str, u64> = HashMap::new();
    for line in folded.lines() {
        let Some((stack, count)) = line.trim().rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        let leaf = stack.rsplit(';').next().unwrap_or(stack).trim();
        *leaves.entry(leaf).or_default() += count;
    }
    let mut leaves: Vec<_> = leaves.into_iter().collect();
    leaves.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    leaves
}

fn print_top_leaves(folded: &str, n: usize) {
    let leaves = leaf_totals(folded);
    let total: u64 = leaves.iter().map(|(_, c)| c).sum();
    println!("\ntop {n} leaf functions ({total} samples):");
    println!("{:>8}  {:>6}  function", "samples", "share");
    for (leaf, count) in leaves.into_iter().take(n) {
        let share = 100.0 * count as f64 / total.max(1) as f64;
        println!("{count:>8}  {share:>5.1}%  {leaf}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn leaf_totals_sums_last_frame() {
        let folded = "main;a;work 5\nmain;b;work 3\nmain;idle 4\nnot a sample\n";
        assert_eq!(super::leaf_totals(folded), [("work", 8), ("idle", 4)]);
    }
}
