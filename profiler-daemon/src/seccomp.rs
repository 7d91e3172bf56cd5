//! The seccomp profile shipped for the daemon's container
//! (`deploy/kubernetes/pyebpf-seccomp.json`, OCI format): every system call
//! `pyebpf daemon` makes, and nothing that writes to or stops another
//! process (`ptrace`, `process_vm_writev`) or changes the host (`mount`,
//! `setns`, `init_module`, ...). Embedded so that the image's own binary can
//! install it on a node (`pyebpf seccomp-profile --output FILE`, the
//! DaemonSet's init container): profile and binary always match.
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// The profile, as shipped.
pub const PROFILE: &str = include_str!("../../deploy/kubernetes/pyebpf-seccomp.json");

/// Writes [`PROFILE`] to `path` atomically (a temporary file in the same
/// directory, then a rename): a kubelet reading it never sees half a file.
pub fn install(path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(PROFILE.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write to {}", dir.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Read by the container runtime, which may not run as root.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .with_context(|| format!("cannot make {} readable", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_allows_what_sampling_needs_and_denies_writing_to_targets() {
        let v: serde_json::Value = serde_json::from_str(PROFILE).unwrap();
        assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
        let allowed: Vec<&str> = v["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
            .flat_map(|r| r["names"].as_array().unwrap())
            .map(|n| n.as_str().unwrap())
            .collect();
        for need in [
            "bpf",
            "perf_event_open",
            "process_vm_readv",
            "capset",
            "execve",
        ] {
            assert!(allowed.contains(&need), "{need} missing");
        }
        for deny in [
            "ptrace",
            "process_vm_writev",
            "mount",
            "setns",
            "unshare",
            "init_module",
            "kexec_load",
        ] {
            assert!(!allowed.contains(&deny), "{deny} allowed");
        }
    }

    #[test]
    fn install_writes_the_whole_profile_readable() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pyebpf.json");
        std::fs::write(&path, "old").unwrap();
        install(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PROFILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = install(&dir.path().join("missing/pyebpf.json")).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot create a file in"),
            "{err:#}"
        );
    }
}
