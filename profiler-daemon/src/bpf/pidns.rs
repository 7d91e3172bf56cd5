//! Whether this process sees the host's PID namespace through `/proc`.
//!
//! BPF helpers report pids as the initial (host) PID namespace numbers them,
//! while `--pid`, discovery and every `/proc/PID` read use the numbers of the
//! namespace `/proc` was mounted for. When the two differ, a pid in the
//! sampler's map names another process than the one inspected: nothing
//! would be profiled, or the wrong process would be. So pyebpf refuses to
//! start there.
//!
//! Two checks, both from `/proc` alone:
//! - `/proc/self` must be our own pid (getpid): otherwise `/proc` belongs to
//!   another namespace than ours (e.g. the host's `/proc` mounted in a
//!   container that has a namespace of its own);
//! - pid 2 must be `kthreadd`, a kernel thread: kernel threads live in the
//!   initial namespace only, so no other namespace has one. Comparing
//!   `/proc/self/ns/pid` with `/proc/1/ns/pid` cannot tell this, as a
//!   container's pid 1 shares the container's namespace, and `NSpid` in
//!   `/proc/self/status` lists one pid when `/proc` was mounted inside.
use std::path::Path;

/// `PF_KTHREAD` in the `flags` field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// How to run pyebpf so that it sees the host's pids.
pub const HOW_TO_FIX: &str = "run it in the host's PID namespace: `hostPID: true` in a \
     Kubernetes pod spec, `--pid=host` for docker run (`pid: host` in compose), \
     `pidMode: host` in an ECS task definition; on a plain host, not under \
     `unshare --pid` or a sandbox with its own PID namespace";

#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error(
        "pyebpf is not in the host's PID namespace ({detail}): the kernel names processes \
         by their host pids, which would not match the pids in /proc; {HOW_TO_FIX}"
    )]
    NotHost { detail: String },
}

/// Checks that `/proc` (at `proc_root`) numbers processes as the host's
/// PID namespace does, for a process whose getpid() is `own_pid`.
pub fn check_at(proc_root: &Path, own_pid: u32) -> Result<(), PidNsError> {
    let not_host = |detail: String| Err(PidNsError::NotHost { detail });
    match std::fs::read_link(proc_root.join("self")) {
        Ok(link) => {
            let seen = link.to_str().and_then(|s| s.parse::<u32>().ok());
            if seen != Some(own_pid) {
                return not_host(format!(
                    "{}/self is {} but this process is pid {own_pid}: /proc was mounted \
                     for another PID namespace",
                    proc_root.display(),
                    link.display()
                ));
            }
        }
        Err(e) => return not_host(format!("cannot read {}/self: {e}", proc_root.display())),
    }
    let stat_path = proc_root.join("2/stat");
    let stat = match std::fs::read_to_string(&stat_path) {
        Ok(s) => s,
        Err(e) => {
            return not_host(format!(
                "no kernel thread is visible ({}: {e})",
                stat_path.display()
            ))
        }
    };
    if !is_kernel_thread(&stat) {
        return not_host(format!(
            "pid 2 is not the kernel's kthreadd (it is `{}`)",
            stat.trim_end()
        ));
    }
    Ok(())
}

/// [`check_at`] for the real `/proc` and this process.
pub fn check() -> Result<(), PidNsError> {
    check_at(Path::new("/proc"), std::process::id())
}

/// Whether a `/proc/PID/stat` line is that of a kernel thread.
fn is_kernel_thread(stat: &str) -> bool {
    // Fields after the command (which may hold spaces and parentheses)
    // are counted from its closing parenthesis: state is field 3, flags 9.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let flags = stat[close + 1..]
        .split_ascii_whitespace()
        .nth(9 - 3)
        .and_then(|f| f.parse::<u64>().ok());
    flags.is_some_and(|f| f & PF_KTHREAD != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_runs_in_the_host_namespace() {
        check().expect("the tests run in the host's PID namespace");
    }

    fn fake_proc(self_link: &str, stat2: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(self_link, dir.path().join("self")).unwrap();
        if let Some(s) = stat2 {
            std::fs::create_dir(dir.path().join("2")).unwrap();
            std::fs::write(dir.path().join("2/stat"), s).unwrap();
        }
        dir
    }

    const KTHREADD: &str = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0\n";

    #[test]
    fn a_host_like_proc_passes() {
        let d = fake_proc("4242", Some(KTHREADD));
        check_at(d.path(), 4242).unwrap();
    }

    #[test]
    fn a_child_namespace_is_refused_with_the_fix() {
        // unshare --pid --fork --mount-proc: /proc/self agrees, pid 2 is
        // absent or a user process.
        for stat2 in [
            None,
            Some("2 (sleep) S 1 1 1 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0\n"),
        ] {
            let d = fake_proc("7", stat2);
            let e = check_at(d.path(), 7).unwrap_err().to_string();
            assert!(e.contains("not in the host's PID namespace"), "{e}");
            assert!(
                e.contains("hostPID: true") && e.contains("--pid=host"),
                "{e}"
            );
            assert!(e.contains("pidMode: host"), "{e}");
        }
        // The host's /proc seen from a child namespace: /proc/self differs.
        let d = fake_proc("123456", Some(KTHREADD));
        let e = check_at(d.path(), 7).unwrap_err().to_string();
        assert!(e.contains("another PID namespace"), "{e}");
    }

    #[test]
    fn kernel_thread_flag_parsing() {
        assert!(is_kernel_thread(KTHREADD));
        assert!(!is_kernel_thread("2 (a) b) S 0 0 0 0 -1 4194304 0"));
        assert!(!is_kernel_thread("garbage"));
    }
}
