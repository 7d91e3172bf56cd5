//! The Debian-root interpreters of tests/common/roots.rs start as the pid-namespace init of
//! their own namespaces, run the repository's scripts from `/pyebpf`, are the version
//! and build interpreters.json says, and are visible to the host under the pid
//! `RootProcess::pid` reports.

mod common;

use common::roots::{root_pythons, Build};

#[test]
fn root_pythons_run_in_their_roots() {
    if !common::bpf_available() {
        return;
    }
    let pythons = root_pythons();
    for py in &pythons {
        let label = py.label();
        let mut p = py.spawn("workloads/hello.py", &["an arg"], &[("PYEBPF_SMOKE", "1")]);
        let line = p.read_line();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            fields.len() == 3 && fields[0] == "ready",
            "{label}: unexpected first line {line:?}"
        );
        assert_eq!(
            fields[1].parse::<u32>().ok(),
            Some(py.hex),
            "{label}: hexversion"
        );
        assert_eq!(fields[2], "1", "{label}: not the init of its pid namespace");

        let proc_dir = p.proc_dir();
        assert!(
            proc_dir.join("exe").exists(),
            "{label}: no {}/exe",
            proc_dir.display()
        );
        let cmdline = std::fs::read(proc_dir.join("cmdline")).expect("cmdline");
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                py.path.to_string_lossy().into_owned(),
                py.in_root_path("workloads/hello.py"),
                "an arg".to_string()
            ],
            "{label}: argv"
        );
        let environ = std::fs::read(proc_dir.join("environ")).expect("environ");
        assert!(
            environ.split(|&b| b == 0).any(|v| v == b"PYEBPF_SMOKE=1"),
            "{label}: env not passed"
        );
        let maps = std::fs::read_to_string(proc_dir.join("maps")).expect("maps");
        let libpython = format!("libpython3.{}.so", py.minor());
        assert_eq!(
            maps.contains(&libpython),
            py.build == Build::Shared,
            "{label}: {libpython} in its maps"
        );
        // The interpreter file the host sees through /proc is the root's.
        let exe_meta = std::fs::metadata(proc_dir.join("exe")).expect("exe");
        let host_meta = std::fs::metadata(py.host_path()).expect("host path");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (exe_meta.dev(), exe_meta.ino()),
            (host_meta.dev(), host_meta.ino()),
            "{label}: /proc/pid/exe is not {}",
            py.host_path().display()
        );
    }
    if std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_some() {
        assert!(
            !pythons.is_empty(),
            "interpreters.json lists no interpreters"
        );
    }
}
