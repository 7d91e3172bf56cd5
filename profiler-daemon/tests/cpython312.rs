//! End to end on CPython 3.12's layout. No Debian suite ships 3.12, so the
//! real BPF sampler profiles a process whose memory holds the 3.12 header
//! structures (tests/tools/cpython312_image.c): two threads burning CPU under
//! fixed Python stacks, one with a C-stack entry frame in the middle, the
//! other with a generator's frame outside the data stack.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// The file the image's code objects name.
const FILE: &str = "/pyebpf-fake/app312.py";

/// Compiles tests/tools/cpython312_image.c into `dir`.
fn build_image(dir: &Path) -> PathBuf {
    build_tool(dir, "cpython312_image.c", &["-rdynamic"])
}

/// The running image; killed on drop.
struct Image(Child);

impl Image {
    /// Starts it and waits for its "ready" line.
    fn start(exe: &Path) -> Image {
        let mut child = Command::new(exe)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the image");
        let stdout = child.stdout.take().expect("stdout");
        let image = Image(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready");
        assert!(
            line.starts_with("ready "),
            "the image did not start: {line:?}"
        );
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qualname (FILE:line)`, as the folded output names a frame.
fn at(qualname: &str, line: u32) -> String {
    format!("{qualname} ({FILE}:{line})")
}

fn dump(stacks: &[(Vec<String>, u64)]) -> String {
    stacks
        .iter()
        .map(|(s, c)| format!("{c} {}", s.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Both threads' stacks, root first, with the line of every frame: the
/// entry frame between `Worker.handle` and `hot` is skipped, the
/// generator's frame (in its own block) is followed, and the UCS-2 name
/// comes out whole.
#[test]
fn bpf_cpython312_image_names_and_lines() {
    let Some(_serial) = serial_bpf_test() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = Image::start(&build_image(dir.path()));
    let (out, text) = record(&[image.0.id()], &["--duration", "4", "--rate", "499"]);
    assert_success(&out);
    let stacks = parse_folded(&text);
    let total = total(&stacks);

    let main_stack = vec![
        at("<module>", 33),
        at("main", 6),
        at("Worker.handle", 10),
        at("hot", 17),
    ];
    let worker_stack = vec![at("<module>", 32), at("функция", 27), at("gen_body", 23)];
    for bad in [
        "[unknown",
        "<shim>",
        "<interpreter trampoline>",
        "[truncated]",
        "[partial",
    ] {
        assert!(
            !text.contains(bad),
            "{bad} in the profile:\n{}",
            dump(&stacks)
        );
    }
    // The frames never change once the image is ready, so a walk that reads
    // them right gives one of the two stacks every time, and anything else
    // is a misread.
    let others: Vec<_> = stacks
        .iter()
        .filter(|(s, _)| *s != main_stack && *s != worker_stack)
        .cloned()
        .collect();
    assert!(
        others.is_empty(),
        "stacks other than the two expected:\n{}",
        dump(&others)
    );

    // Each thread is always runnable, so on an idle machine with 2 CPUs or
    // more each gets a CPU: 4 s at 499 Hz is about 2,000 samples per thread.
    // A loaded machine gives fewer (about 1,200 in all were seen with a load
    // average of 4.5 on 2 CPUs), and the sampler's start takes some of the
    // 4 s. 400 keeps the shares below meaningful: the standard error of a
    // share over N samples is at most 0.5/sqrt(N), 2.5 points for N = 400.
    assert!(total >= 400, "too few samples: {total}\n{}", dump(&stacks));
    // Expected share: 1/2 each, as the scheduler is fair between the two
    // threads (0.49 to 0.51 on a quiet machine). If one thread shared a CPU
    // with another CPU-bound task while the other had a CPU to itself, it
    // would get 1/3 (0.36 was seen once with a load average of 8.5 on 2
    // CPUs); 25% is more than 3 standard errors below that and 10 below the
    // expected half.
    for (name, stack) in [("main", &main_stack), ("worker", &worker_stack)] {
        let n: u64 = stacks
            .iter()
            .filter(|(s, _)| s == stack)
            .map(|(_, c)| c)
            .sum();
        let share = n as f64 / total as f64;
        eprintln!("{name} thread: {n} of {total} samples ({share:.3})");
        assert!(
            share > 0.25,
            "{name} thread: share {share:.3}\n{}",
            dump(&stacks)
        );
    }
}
