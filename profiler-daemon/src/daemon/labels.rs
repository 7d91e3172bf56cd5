//! Labels of a process: its command, executable, service name (from its
//! environment) and where it runs (container, Kubernetes pod, ECS task, from
//! its cgroup path).
//!
//! Everything is read from `/proc/PID/...` of the host's view: the daemon must
//! run in the host pid and cgroup namespaces for the cgroup paths to be full
//! (inside a private cgroup namespace a container sees `0::/`).
//!
//! `/proc/PID/environ` is the environment the process was *exec'd* with; later
//! changes (`os.environ[...] = ...`, `setenv`) are not visible there.
use std::io;
use std::path::PathBuf;

use crate::model::labels::ProcessLabels;

/// Why a process's labels could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error("no permission to read {path}: run as root or with CAP_SYS_PTRACE")]
    Permission { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What the cgroup path says about where a process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// 64 hex digits (docker, containerd, cri-o, podman), or a Fargate 1.4+
    /// `<task id>-<number>` id.
    pub container_id: Option<String>,
    /// Kubernetes pod UID, with dashes (the systemd driver's underscores
    /// turned back into dashes).
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`; only with a pod UID.
    pub qos_class: Option<String>,
    /// ECS task id (32 hex digits, or a UUID for old task ARNs).
    pub ecs_task_id: Option<String>,
}

impl CgroupInfo {
    fn score(&self) -> usize {
        [
            self.container_id.is_some(),
            self.pod_uid.is_some(),
            self.qos_class.is_some(),
            self.ecs_task_id.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count()
    }
}

/// Parse a `/proc/PID/cgroup` file (cgroup v1, v2 or hybrid).
///
/// Each line is `hierarchy-id:controllers:path`; the path that tells the most
/// is used (on v1 all controllers normally agree; on hybrid hosts the v2
/// `0::` line may be a plain systemd path while the v1 lines name the
/// container). Recognised layouts:
///
/// - docker: `/docker/<id>` (cgroupfs), `/system.slice/docker-<id>.scope`
///   (systemd); likewise `cri-containerd-`, `crio-`, `libpod-` (podman),
///   `nerdctl-` scopes, and any `<prefix>-<64 hex>[.scope]` segment except
///   the runtime monitors (`*conmon-<id>`);
/// - Kubernetes, systemd driver:
///   `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`,
///   guaranteed pods as `kubepods-pod<uid>.slice` (also under kind's
///   `kubelet-kubepods-...` prefix);
/// - Kubernetes, cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>`,
///   guaranteed pods as `/kubepods/pod<uid>/<id>`;
/// - ECS on EC2, cgroup v1: `/ecs/<task id>/<id>` (older agents:
///   `/ecs/<cluster>/<task id>/<id>`); cgroup v2 (systemd driver):
///   `/ecstasks.slice/ecstasks-<task id>.slice/docker-<id>.scope`;
/// - Fargate: `/ecs/<task uuid>/<id>` (platform 1.3) and
///   `/ecs/<task id>/<task id>-<number>` (1.4+).
///
/// Host processes (`/user.slice/...`, `/system.slice/foo.service`, `/`) give
/// all `None`.
pub fn parse_cgroup(text: &str) -> CgroupInfo {
    let mut best = CgroupInfo::default();
    for line in text.lines() {
        // The path is everything after the second ':' (it may contain ':').
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let info = parse_cgroup_path(path.trim());
        if info.score() > best.score() {
            best = info;
        }
    }
    best
}

/// One cgroup path, see [`parse_cgroup`].
pub fn parse_cgroup_path(path: &str) -> CgroupInfo {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut info = CgroupInfo::default();

    // The container: the deepest segment that names one.
    let mut container_at = None;
    for (i, seg) in segs.iter().enumerate().rev() {
        if let Some(id) = container_id_of(seg) {
            info.container_id = Some(id.to_owned());
            container_at = Some(i);
            break;
        }
    }

    // Kubernetes pod and QoS class.
    for (i, seg) in segs.iter().enumerate() {
        if let Some((uid, qos)) = systemd_pod(seg) {
            info.pod_uid = Some(uid);
            info.qos_class = Some(qos.to_owned());
        } else if let Some(uid) = seg.strip_prefix("pod").filter(|u| is_pod_uid(u)) {
            // cgroupfs driver: .../kubepods[/<qos>]/pod<uid>
            let qos = match i.checked_sub(1).map(|j| segs[j]) {
                Some("burstable") => Some("burstable"),
                Some("besteffort") => Some("besteffort"),
                Some(p) if p == "kubepods" || p.ends_with("kubepods") => Some("guaranteed"),
                _ => None,
            };
            // A `pod...` directory outside any kubepods hierarchy is not a pod.
            if let Some(qos) = qos {
                info.pod_uid = Some(uid.to_owned());
                info.qos_class = Some(qos.to_owned());
            }
        }
    }

    // ECS task.
    if let Some(e) = segs.iter().position(|s| *s == "ecs") {
        // The task id is the last task-id-looking segment between /ecs and
        // the container (skipping a cluster name, if any).
        let end = container_at.unwrap_or(segs.len());
        if let Some(task) = segs[e + 1..end.max(e + 1)]
            .iter()
            .rev()
            .find(|s| is_task_id(s))
        {
            info.ecs_task_id = Some((*task).to_owned());
        } else if let Some(cid) = &info.container_id {
            // Fargate 1.4+: the container id is `<task id>-<number>`.
            if let Some((task, _)) = cid.split_once('-') {
                info.ecs_task_id = Some(task.to_owned());
            }
        }
    }
    for seg in &segs {
        if let Some(task) = seg
            .strip_prefix("ecstasks-")
            .and_then(|s| s.strip_suffix(".slice"))
            .filter(|s| is_task_id(s))
        {
            info.ecs_task_id = Some(task.to_owned());
        }
    }
    info
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lower-case hex), with `sep`.
fn is_uuid(s: &str, sep: u8) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == sep,
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// A pod UID: a UUID, or 32 hex digits (static pods' config hash).
fn is_pod_uid(s: &str) -> bool {
    is_uuid(s, b'-') || is_lower_hex(s, 32)
}

/// An ECS task id: 32 hex digits (current ARNs) or a UUID (old ARNs).
fn is_task_id(s: &str) -> bool {
    is_lower_hex(s, 32) || is_uuid(s, b'-')
}

/// The container id a cgroup path segment names, if any.
fn container_id_of(seg: &str) -> Option<&str> {
    let s = seg.strip_suffix(".scope").unwrap_or(seg);
    if is_lower_hex(s, 64) {
        return Some(s);
    }
    // Fargate 1.4+: `<32 hex task id>-<decimal>`.
    if let Some((task, n)) = s.split_once('-') {
        if is_lower_hex(task, 32) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return Some(s);
        }
    }
    // `<runtime>-<64 hex>`: docker-, cri-containerd-, crio-, libpod-, ...
    let (prefix, id) = s.rsplit_once('-')?;
    (is_lower_hex(id, 64) && !prefix.ends_with("conmon")).then_some(id)
}

/// `kubepods-<qos>-pod<uid>.slice` / `kubepods-pod<uid>.slice` (systemd
/// driver, possibly with a prefix such as kind's `kubelet-`): the pod UID with
/// dashes and the QoS class.
fn systemd_pod(seg: &str) -> Option<(String, &'static str)> {
    let s = seg.strip_suffix(".slice")?;
    let rest = &s[s.find("kubepods-")? + "kubepods-".len()..];
    let (qos, uid) = if let Some(u) = rest.strip_prefix("burstable-pod") {
        ("burstable", u)
    } else if let Some(u) = rest.strip_prefix("besteffort-pod") {
        ("besteffort", u)
    } else if let Some(u) = rest.strip_prefix("pod") {
        ("guaranteed", u)
    } else {
        return None;
    };
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some((uid, qos))
}

fn read_error(pid: u32, path: PathBuf, e: io::Error) -> LabelError {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) | (_, Some(libc::ESRCH)) => LabelError::NoSuchProcess(pid),
        (io::ErrorKind::PermissionDenied, _) => LabelError::Permission { path },
        _ => LabelError::Io { path, source: e },
    }
}

fn read_proc(pid: u32, name: &str) -> Result<Vec<u8>, LabelError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    std::fs::read(&path).map_err(|e| read_error(pid, path, e))
}

/// The value of `name` in a `/proc/PID/environ` buffer (NUL-separated
/// `NAME=value` entries), converted lossily to UTF-8.
pub fn environ_lookup(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    })
}

/// The value of environment variable `name` of process `pid` (as exec'd),
/// `None` if unset or unreadable (gone, or no permission).
pub fn env_var(pid: u32, name: &str) -> Option<String> {
    environ_lookup(&read_proc(pid, "environ").ok()?, name)
}

/// Whether a `PYEBPF_DISABLE` value asks to be left alone: `1`, `true`,
/// `yes` or `on`, any case, surrounding blanks ignored.
pub fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Whether process `pid` opted out with `PYEBPF_DISABLE=1` (or `true`/`yes`).
pub fn disabled_by_env(pid: u32) -> bool {
    env_var(pid, "PYEBPF_DISABLE").is_some_and(|v| is_truthy(&v))
}

/// Whether an environment (`/proc/PID/environ`) has `PYEBPF_DISABLE` set
/// to a true value.
pub fn disabled_in_environ(environ: &[u8]) -> bool {
    environ_lookup(environ, "PYEBPF_DISABLE").is_some_and(|v| is_truthy(&v))
}

/// The service name from an environment: `OTEL_SERVICE_NAME`, else
/// `DD_SERVICE` (blank values count as unset).
pub fn service_from_environ(environ: &[u8]) -> Option<String> {
    ["OTEL_SERVICE_NAME", "DD_SERVICE"].iter().find_map(|name| {
        environ_lookup(environ, name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// Read the labels of process `pid`.
///
/// Only `/proc/PID/comm` is required (its absence means the process is gone);
/// an unreadable executable link (kernel threads, no permission), environment
/// or cgroup file leaves the corresponding labels empty. A process that exits
/// while being read may so get partial labels.
///
/// Right after an `exec`, until the kernel has laid out the new stack, the
/// environment reads as empty; a Python process is past that point by the
/// time its interpreter can be inspected.
pub fn read_labels(pid: u32) -> Result<ProcessLabels, LabelError> {
    read_labels_and_opt_out(pid).map(|(labels, _)| labels)
}

/// [`read_labels`], and whether the process opted out with
/// `PYEBPF_DISABLE` ([`disabled_by_env`]), from one read of its environment.
pub fn read_labels_and_opt_out(pid: u32) -> Result<(ProcessLabels, bool), LabelError> {
    let comm = read_proc(pid, "comm")?;
    let command = String::from_utf8_lossy(&comm)
        .trim_end_matches('\n')
        .to_owned();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cmdline = crate::process::python::command_line(pid).unwrap_or_default();
    // Kernel threads have no environment (ESRCH), like exited processes.
    let (service, disabled) = match read_proc(pid, "environ") {
        Ok(env) => (service_from_environ(&env), disabled_in_environ(&env)),
        Err(e) => {
            tracing::debug!(pid, "no service name from the environment: {e}");
            (None, false)
        }
    };
    let service = service.unwrap_or_else(|| command.clone());
    let cgroup = match read_proc(pid, "cgroup") {
        Ok(text) => parse_cgroup(&String::from_utf8_lossy(&text)),
        Err(e) => {
            tracing::debug!(pid, "no container labels: {e}");
            CgroupInfo::default()
        }
    };
    let labels = ProcessLabels {
        pid,
        command,
        service,
        exe,
        cmdline,
        container_id: cgroup.container_id,
        pod_uid: cgroup.pod_uid,
        qos_class: cgroup.qos_class,
        ecs_task_id: cgroup.ecs_task_id,
        // Known once the interpreter is inspected (the store sets it).
        python_version: String::new(),
    };
    Ok((labels, disabled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    const CID: &str = "3726184226f5d3147c25fdeab5b60097e378e8a720503a5e19ecfdf29f869860";
    const CID2: &str = "7b8952daecf4c0e44bbcefe1b5c5ebc7b4839d4eefeccefe694709d3809b6199";

    fn info(
        c: Option<&str>,
        pod: Option<&str>,
        qos: Option<&str>,
        task: Option<&str>,
    ) -> CgroupInfo {
        CgroupInfo {
            container_id: c.map(str::to_owned),
            pod_uid: pod.map(str::to_owned),
            qos_class: qos.map(str::to_owned),
            ecs_task_id: task.map(str::to_owned),
        }
    }

    #[test]
    fn docker_cgroup_v2_systemd() {
        let text = format!("0::/system.slice/docker-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), info(Some(CID), None, None, None));
    }

    #[test]
    fn docker_cgroup_v1() {
        let text = format!(
            "12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n\
             1:name=systemd:/docker/{CID}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse_cgroup(&text), info(Some(CID), None, None, None));
        // Docker's systemd driver on v1: the id is in the scope on every line.
        let text = format!("4:pids:/system.slice/docker-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text).container_id.as_deref(), Some(CID));
    }

    #[test]
    fn kubernetes_systemd_driver() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod2d3da189_6407_48e3_9ab6_78188d75e609.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                Some("2d3da189-6407-48e3-9ab6-78188d75e609"),
                Some("burstable"),
                None
            )
        );
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod0f3b7a62_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-{CID}.scope\n"
        );
        let i = parse_cgroup(&text);
        assert_eq!(i.qos_class.as_deref(), Some("besteffort"));
        assert_eq!(
            i.pod_uid.as_deref(),
            Some("0f3b7a62-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        // Guaranteed pods have no QoS slice.
        let text = format!(
            "0::/kubepods.slice/kubepods-pod97f1ae73_7ad9_11ec_b4a7_9a35488b4fab.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                Some("97f1ae73-7ad9-11ec-b4a7-9a35488b4fab"),
                Some("guaranteed"),
                None
            )
        );
        // cgroup v1 with the systemd driver and dockershim, and kind's prefix.
        let text = format!(
            "11:devices:/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod2d3da189_6407_48e3_9ab6_78188d75e609.slice/docker-{CID2}.scope\n"
        );
        assert_eq!(parse_cgroup(&text).container_id.as_deref(), Some(CID2));
        let text = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod5c1f2b4e_9d8a_4f3e_b2c1_a0b9c8d7e6f5.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                Some("5c1f2b4e-9d8a-4f3e-b2c1-a0b9c8d7e6f5"),
                Some("besteffort"),
                None
            )
        );
        // The pod's own slice (e.g. the pause sandbox before its scope).
        let text = "0::/kubepods.slice/kubepods-burstable.slice/\
                    kubepods-burstable-pod2d3da189_6407_48e3_9ab6_78188d75e609.slice\n";
        assert_eq!(
            parse_cgroup(text),
            info(
                None,
                Some("2d3da189-6407-48e3-9ab6-78188d75e609"),
                Some("burstable"),
                None
            )
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let text = format!(
            "11:perf_event:/kubepods/besteffort/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/{CID}\n\
             10:memory:/kubepods/besteffort/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/{CID}\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                Some("3d274242-8ee0-11e9-a8a6-1e68d864ef1a"),
                Some("besteffort"),
                None
            )
        );
        let text =
            format!("0::/kubepods/burstable/podfd52ef25-a87d-11e9-9423-0800271a638e/{CID}\n");
        assert_eq!(parse_cgroup(&text).qos_class.as_deref(), Some("burstable"));
        let text = format!("0::/kubepods/podfd52ef25-a87d-11e9-9423-0800271a638e/{CID}\n");
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                Some("fd52ef25-a87d-11e9-9423-0800271a638e"),
                Some("guaranteed"),
                None
            )
        );
        // A static pod: its UID is the 32-hex config hash.
        let text = format!("0::/kubepods/burstable/pod9a3bc1e2d4f5a6b7c8d9e0f1a2b3c4d5/{CID}\n");
        assert_eq!(
            parse_cgroup(&text).pod_uid.as_deref(),
            Some("9a3bc1e2d4f5a6b7c8d9e0f1a2b3c4d5")
        );
    }

    #[test]
    fn cri_o_and_podman() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod2d3da189_6407_48e3_9ab6_78188d75e609.slice/crio-{CID}.scope\n"
        );
        let i = parse_cgroup(&text);
        assert_eq!(i.container_id.as_deref(), Some(CID));
        assert_eq!(i.qos_class.as_deref(), Some("burstable"));
        // cri-o's monitor is not the container.
        let text = format!("0::/kubepods.slice/crio-conmon-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text).container_id, None);

        let text = format!("0::/machine.slice/libpod-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text), info(Some(CID), None, None, None));
        // Rootless podman, and a process in a sub-cgroup of the container.
        let text = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n"
        );
        assert_eq!(parse_cgroup(&text).container_id.as_deref(), Some(CID));
        let text = format!("0::/machine.slice/libpod-conmon-{CID}.scope\n");
        assert_eq!(parse_cgroup(&text).container_id, None);
        // Podman's cgroupfs manager.
        let text = format!("0::/libpod_parent/libpod-{CID}\n");
        assert_eq!(parse_cgroup(&text).container_id.as_deref(), Some(CID));
    }

    #[test]
    fn ecs() {
        // EC2, cgroup v1, task with resource limits.
        let text = format!(
            "9:perf_event:/ecs/5a0d5ceddf6c44c1928d367a815d890f/{CID}\n\
             8:memory:/ecs/5a0d5ceddf6c44c1928d367a815d890f/{CID}\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                None,
                None,
                Some("5a0d5ceddf6c44c1928d367a815d890f")
            )
        );
        // Older agents put the cluster name first.
        let text = format!("9:perf_event:/ecs/my-cluster/5a0d5ceddf6c44c1928d367a815d890f/{CID}\n");
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                None,
                None,
                Some("5a0d5ceddf6c44c1928d367a815d890f")
            )
        );
        // Fargate 1.3: old-style UUID task ids.
        let text = format!("11:hugetlb:/ecs/55091c13-b8cf-4801-b527-f4601742204d/{CID}\n");
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                None,
                None,
                Some("55091c13-b8cf-4801-b527-f4601742204d")
            )
        );
        // Fargate 1.4+: the container id is `<task id>-<number>`.
        let text = "1:name=systemd:/ecs/8cd79a803caf4d2aa945152e934a5c00/\
                    8cd79a803caf4d2aa945152e934a5c00-1053176469\n";
        assert_eq!(
            parse_cgroup(text),
            info(
                Some("8cd79a803caf4d2aa945152e934a5c00-1053176469"),
                None,
                None,
                Some("8cd79a803caf4d2aa945152e934a5c00")
            )
        );
        // EC2, cgroup v2 (Amazon Linux 2023): systemd slices per task.
        let text = format!(
            "0::/ecstasks.slice/ecstasks-e95a40efbde84cbc8600660a109ec194.slice/docker-{CID}.scope\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            info(
                Some(CID),
                None,
                None,
                Some("e95a40efbde84cbc8600660a109ec194")
            )
        );
    }

    #[test]
    fn host_processes_have_no_container() {
        for text in [
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-1234.scope\n",
            "0::/system.slice/gunicorn.service\n",
            "0::/\n",
            "0::/init.scope\n",
            // v1 with the systemd hierarchy only.
            "12:memory:/user.slice\n1:name=systemd:/user.slice/user-0.slice/session-3.scope\n0::/user.slice/user-0.slice/session-3.scope\n",
            // 32 hex digits are not a container id (e.g. a sandbox's memory cgroup).
            "4:memory:/process_api/20d164f2a55d65a940c4511e5cb6098b\n",
            "",
            "garbage\n",
        ] {
            assert_eq!(parse_cgroup(text), CgroupInfo::default(), "{text:?}");
        }
        // Almost-ids: one digit short, a non-hex digit, upper case.
        let short = &CID[..63];
        let bad = CID.replacen('3', "g", 1);
        let upper = CID.to_ascii_uppercase();
        for id in [short, bad.as_str(), upper.as_str()] {
            assert_eq!(
                parse_cgroup(&format!("0::/docker/{id}\n")).container_id,
                None
            );
        }
        // A "pod..." directory outside a kubepods hierarchy.
        let text = "0::/system.slice/podfd52ef25-a87d-11e9-9423-0800271a638e\n";
        assert_eq!(parse_cgroup(text), CgroupInfo::default());
    }

    #[test]
    fn hybrid_prefers_the_informative_line() {
        let text = format!(
            "0::/user.slice/user-0.slice/session-1.scope\n\
             12:memory:/kubepods/burstable/podfd52ef25-a87d-11e9-9423-0800271a638e/{CID}\n\
             1:name=systemd:/kubepods/burstable/podfd52ef25-a87d-11e9-9423-0800271a638e/{CID}\n"
        );
        let i = parse_cgroup(&text);
        assert_eq!(i.container_id.as_deref(), Some(CID));
        assert_eq!(
            i.pod_uid.as_deref(),
            Some("fd52ef25-a87d-11e9-9423-0800271a638e")
        );
    }

    #[test]
    fn environ_parsing() {
        let env = b"PATH=/usr/bin\0DD_SERVICE=web\0OTEL_SERVICE_NAME=caf\xe9\0EMPTY=\0A=b=c\0";
        assert_eq!(environ_lookup(env, "PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(
            environ_lookup(env, "OTEL_SERVICE_NAME").as_deref(),
            Some("caf\u{fffd}")
        );
        assert_eq!(environ_lookup(env, "EMPTY").as_deref(), Some(""));
        assert_eq!(environ_lookup(env, "A").as_deref(), Some("b=c"));
        assert_eq!(environ_lookup(env, "PAT"), None);
        assert_eq!(environ_lookup(env, "MISSING"), None);
        assert_eq!(environ_lookup(b"", "X"), None);
        assert_eq!(service_from_environ(env).as_deref(), Some("caf\u{fffd}"));
        assert_eq!(
            service_from_environ(b"OTEL_SERVICE_NAME= \0DD_SERVICE=web\0").as_deref(),
            Some("web")
        );
        assert_eq!(service_from_environ(b"X=1\0"), None);
        for v in ["1", "true", "TRUE", "Yes", " on\n"] {
            assert!(is_truthy(v), "{v:?}");
        }
        for v in ["0", "", "false", "no", "2", "disable"] {
            assert!(!is_truthy(v), "{v:?}");
        }
    }

    /// A `sleep 30` child with `env` added, killed on drop; waits for the exec.
    struct Sleeper(Child);

    impl Sleeper {
        fn spawn(env: &[(&str, &str)]) -> Sleeper {
            let mut cmd = Command::new("sleep");
            cmd.arg("30")
                .env_remove("OTEL_SERVICE_NAME")
                .env_remove("DD_SERVICE");
            cmd.env_remove("PYEBPF_DISABLE");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let s = Sleeper(cmd.spawn().unwrap());
            let deadline = Instant::now() + Duration::from_secs(10);
            // comm changes early in exec, the environment is set up later.
            let pid = s.0.id();
            while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n"
                || std::fs::read(format!("/proc/{pid}/environ"))
                    .unwrap()
                    .is_empty()
            {
                assert!(Instant::now() < deadline, "sleep did not start");
                std::thread::sleep(Duration::from_millis(5));
            }
            s
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn labels_of_a_real_process() {
        let s = Sleeper::spawn(&[("OTEL_SERVICE_NAME", "checkout"), ("DD_SERVICE", "dd-name")]);
        let pid = s.0.id();
        let l = read_labels(pid).unwrap();
        assert_eq!(l.pid, pid);
        assert_eq!(l.command, "sleep");
        assert_eq!(l.service, "checkout");
        assert_eq!(l.cmdline, "sleep 30");
        assert!(l.exe.ends_with("/sleep"), "{}", l.exe);
        // Same cgroup as ours.
        let own = parse_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        assert_eq!(l.container_id, own.container_id);
        assert_eq!(l.pod_uid, own.pod_uid);
        assert_eq!(env_var(pid, "DD_SERVICE").as_deref(), Some("dd-name"));
        assert_eq!(env_var(pid, "NOT_SET_ANYWHERE_42"), None);
        assert!(!disabled_by_env(pid));
    }

    #[test]
    fn service_falls_back_to_dd_then_command() {
        let s = Sleeper::spawn(&[("DD_SERVICE", "billing")]);
        assert_eq!(read_labels(s.0.id()).unwrap().service, "billing");
        let s = Sleeper::spawn(&[]);
        assert_eq!(read_labels(s.0.id()).unwrap().service, "sleep");
    }

    #[test]
    fn disable_env() {
        for (v, want) in [("1", true), ("true", true), ("yes", true), ("0", false)] {
            let s = Sleeper::spawn(&[("PYEBPF_DISABLE", v)]);
            assert_eq!(disabled_by_env(s.0.id()), want, "PYEBPF_DISABLE={v}");
            let (labels, disabled) = read_labels_and_opt_out(s.0.id()).unwrap();
            assert_eq!(disabled, want, "PYEBPF_DISABLE={v}");
            assert_eq!(labels, read_labels(s.0.id()).unwrap());
        }
        assert!(disabled_in_environ(b"A=1\0PYEBPF_DISABLE=on\0"));
        assert!(!disabled_in_environ(b"A=1\0XPYEBPF_DISABLE=1\0"));
        assert!(!disabled_in_environ(b""));
    }

    #[test]
    fn gone_process() {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(matches!(read_labels(pid), Err(LabelError::NoSuchProcess(p)) if p == pid));
        assert_eq!(env_var(pid, "PATH"), None);
        assert!(!disabled_by_env(pid));
    }

    #[test]
    fn kernel_thread_has_no_exe() {
        // kthreadd is pid 2 in the root pid namespace; skip elsewhere.
        if std::fs::read_to_string("/proc/2/comm").ok().as_deref() != Some("kthreadd\n") {
            return;
        }
        let l = read_labels(2).unwrap();
        assert_eq!((l.exe.as_str(), l.cmdline.as_str()), ("", ""));
        assert_eq!(l.service, "kthreadd");
    }
}
