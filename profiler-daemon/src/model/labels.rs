//! Who a profiled process is: the labels attached to everything shown or
//! exported for it.
use serde::Serialize;

/// Labels of a profiled process, attached to everything exported for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ProcessLabels {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// `OTEL_SERVICE_NAME`, else `DD_SERVICE`, else the command.
    pub service: String,
    /// Executable as the process sees it (`/proc/PID/exe` link target).
    pub exe: String,
    /// Command line, arguments joined by spaces (may be empty).
    pub cmdline: String,
    /// Container id from the cgroup path (docker, containerd, cri-o, ECS).
    pub container_id: Option<String>,
    /// Kubernetes pod UID from the cgroup path.
    pub pod_uid: Option<String>,
    /// Kubernetes QoS class from the cgroup path: guaranteed, burstable, besteffort.
    pub qos_class: Option<String>,
    /// ECS task id from the cgroup path.
    pub ecs_task_id: Option<String>,
    /// CPython version (`3.11.7`), set by the store when the process is
    /// profiled; empty before. Exports only (OTLP's
    /// `process.runtime.version`): `/processes` lists it beside the labels.
    #[serde(skip)]
    pub python_version: String,
}

#[cfg(test)]
impl ProcessLabels {
    /// A `python3` process of `service`, for tests.
    pub fn python3(pid: u32, service: &str) -> ProcessLabels {
        ProcessLabels {
            pid,
            command: "python3".into(),
            service: service.into(),
            ..Default::default()
        }
    }
}

impl ProcessLabels {
    /// Label pairs for exports (Pyroscope, pprof comments), absent ones left out.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("pid", self.pid.to_string()),
            ("command", self.command.clone()),
            ("service_name", self.service.clone()),
        ];
        for (k, val) in [
            ("container_id", &self.container_id),
            ("pod_uid", &self.pod_uid),
            ("qos_class", &self.qos_class),
            ("ecs_task_id", &self.ecs_task_id),
        ] {
            if let Some(x) = val {
                v.push((k, x.clone()));
            }
        }
        v
    }
}

/// The `python` label of a CPython version: major.minor (`"3.14"` for
/// `"3.14.10"` or `"3.16.0a1"`), with `t` for a free-threaded build
/// (`"3.14t"`). A version string that does not start with `X.Y` (digits,
/// at most three each) gives `"other"`, so the label never carries
/// arbitrary text.
pub fn python_label(version: &str, free_threaded: bool) -> String {
    let number = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = version.splitn(3, '.');
    let major = parts.next().unwrap_or("");
    let minor_part = parts.next().unwrap_or("");
    // "3.16a1" (no micro) still gives 3.16.
    let minor_end = minor_part
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(minor_part.len());
    let minor = &minor_part[..minor_end];
    if !number(major) || !number(minor) {
        return "other".to_string();
    }
    let t = if free_threaded { "t" } else { "" };
    format!("{major}.{minor}{t}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_labels() {
        assert_eq!(python_label("3.11.7", false), "3.11");
        assert_eq!(python_label("3.14.10", false), "3.14");
        assert_eq!(python_label("3.14.10", true), "3.14t");
        assert_eq!(python_label("3.16.0a1", false), "3.16");
        assert_eq!(python_label("3.10.12", false), "3.10");
        assert_eq!(python_label("3.16", false), "3.16");
        assert_eq!(python_label("3.16a1", false), "3.16");
        assert_eq!(python_label("2.7.18", false), "2.7");
        for bad in [
            "", "3", "3.", "x.y", ".1", "3.x", "1234.1", "3.1234", "3 .1", "{}.1",
        ] {
            assert_eq!(python_label(bad, false), "other", "{bad:?}");
            assert_eq!(python_label(bad, true), "other", "{bad:?}");
        }
    }
}
