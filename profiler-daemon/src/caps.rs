//! Capability checks at start-up, so a missing privilege is reported once,
//! clearly, instead of as an `EPERM` from deep inside BPF loading.
//!
//! The effective set is read from `/proc/self/status` (`CapEff:`, hex).
//! Once the sampler is loaded and attached, [`drop_after_start`] gives up
//! every capability but the few that reading targets still needs.
use std::fmt;
use std::io;

/// Where the effective capability set is read from.
pub const STATUS_PATH: &str = "/proc/self/status";

/// The capabilities pyebpf may need (numbers from `linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Capability {
    DacReadSearch = 2,
    SysPtrace = 19,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
    CheckpointRestore = 40,
}

impl Capability {
    pub const ALL: [Capability; 6] = [
        Capability::DacReadSearch,
        Capability::SysPtrace,
        Capability::SysAdmin,
        Capability::Perfmon,
        Capability::Bpf,
        Capability::CheckpointRestore,
    ];

    /// The kernel's name, e.g. `CAP_BPF`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
            Capability::CheckpointRestore => "CAP_CHECKPOINT_RESTORE",
        }
    }

    fn as_crate(self) -> ::caps::Capability {
        use ::caps::Capability as C;
        match self {
            Capability::DacReadSearch => C::CAP_DAC_READ_SEARCH,
            Capability::SysPtrace => C::CAP_SYS_PTRACE,
            Capability::SysAdmin => C::CAP_SYS_ADMIN,
            Capability::Perfmon => C::CAP_PERFMON,
            Capability::Bpf => C::CAP_BPF,
            Capability::CheckpointRestore => C::CAP_CHECKPOINT_RESTORE,
        }
    }

    /// Bit number in a capability set.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// This capability's bit in a `CapEff`-style mask.
    pub fn mask(self) -> u64 {
        1u64 << self.number()
    }

    /// Whether the capability set `set` contains this capability.
    pub fn is_in(self, set: u64) -> bool {
        set & self.mask() != 0
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing a mode needs, and what for ("load the sampler").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Exactly this capability.
    One {
        cap: Capability,
        purpose: &'static str,
    },
    /// Any one of these; the first is the preferred (narrowest) one and is
    /// what gets reported as missing. An empty list is trivially met.
    AnyOf {
        caps: &'static [Capability],
        purpose: &'static str,
    },
}

impl Requirement {
    /// The capabilities that satisfy this requirement, preferred first.
    pub fn caps(&self) -> &[Capability] {
        match self {
            Requirement::One { cap, .. } => std::slice::from_ref(cap),
            Requirement::AnyOf { caps, .. } => caps,
        }
    }

    /// What the capability is needed for, e.g. "read target memory".
    pub fn purpose(&self) -> &'static str {
        match self {
            Requirement::One { purpose, .. } | Requirement::AnyOf { purpose, .. } => purpose,
        }
    }

    /// Whether the capability set `eff` satisfies this requirement.
    pub fn is_met(&self, eff: u64) -> bool {
        let caps = self.caps();
        caps.is_empty() || caps.iter().any(|c| c.is_in(eff))
    }

    /// "CAP_BPF (or CAP_SYS_ADMIN)", or just "CAP_SYS_PTRACE".
    pub fn describe(&self) -> String {
        let caps = self.caps();
        let mut s = caps.first().map(|c| c.name()).unwrap_or("").to_string();
        if caps.len() > 1 {
            let alternatives: Vec<&str> = caps[1..].iter().map(|c| c.name()).collect();
            s.push_str(&format!(" (or {})", alternatives.join(" or ")));
        }
        s
    }
}

/// Why the capability check could not be done, or failed.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot read {STATUS_PATH} to check capabilities: {0}")]
    Read(#[source] io::Error),
    #[error("cannot parse capabilities from {STATUS_PATH}: {0}")]
    Parse(String),
    /// One line naming everything needed and what is missing.
    #[error("{message}")]
    Missing {
        missing: Vec<Capability>,
        message: String,
    },
    /// Capabilities are per thread: a drop with other threads running
    /// would leave them privileged.
    #[error(
        "cannot drop capabilities: {0} threads are running, and each would keep its own \
         (the drop must happen before any thread starts)"
    )]
    Threads(usize),
    #[error("cannot drop capabilities: {0}")]
    Drop(#[from] ::caps::errors::CapsError),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(#[source] io::Error),
}

/// What every mode keeps once its sampler is loaded and attached. The BPF
/// programs, maps, ring buffers and perf events stay usable through their
/// file descriptors without CAP_BPF, CAP_PERFMON or CAP_SYS_ADMIN.
/// - CAP_SYS_PTRACE: `process_vm_readv` and `/proc/PID/{root,exe,environ}`
///   of other users' processes, for every process found later.
/// - CAP_DAC_READ_SEARCH (if held): other users' files that are not world-
///   readable (a virtualenv's interpreter under a 0700 home).
/// - CAP_CHECKPOINT_RESTORE (if held): `/proc/PID/map_files/`, the only way
///   to a mapped library that was deleted (upgraded) since it was loaded.
pub const KEEP_AFTER_START: [Capability; 3] = [
    Capability::SysPtrace,
    Capability::DacReadSearch,
    Capability::CheckpointRestore,
];

/// Gives up, for good, every capability but those of [`KEEP_AFTER_START`]
/// this process holds: the effective, permitted and inheritable sets, the
/// ambient set and (when CAP_SETPCAP allows) the bounding set; then sets
/// `no_new_privs`. Must run before any other thread starts: returns
/// [`CapsError::Threads`] otherwise. Returns what was kept.
pub fn drop_after_start() -> Result<Vec<Capability>, CapsError> {
    use ::caps::{CapSet, CapsHashSet};
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(CapsError::Read)?
        .count();
    if threads != 1 {
        return Err(CapsError::Threads(threads));
    }
    let permitted = ::caps::read(None, CapSet::Permitted)?;
    let kept: Vec<Capability> = KEEP_AFTER_START
        .into_iter()
        .filter(|c| permitted.contains(&c.as_crate()))
        .collect();
    let keep: CapsHashSet = kept.iter().map(|c| c.as_crate()).collect();
    // The bounding set first: changing it needs CAP_SETPCAP, about to go.
    if ::caps::has_cap(None, CapSet::Effective, ::caps::Capability::CAP_SETPCAP)? {
        for cap in ::caps::runtime::thread_all_supported() {
            if !keep.contains(&cap) {
                ::caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    ::caps::clear(None, CapSet::Ambient)?;
    ::caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    ::caps::set(None, CapSet::Effective, &keep)?;
    ::caps::set(None, CapSet::Permitted, &keep)?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(CapsError::NoNewPrivs(io::Error::last_os_error()));
    }
    Ok(kept)
}

/// "CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH", or "none".
pub fn names(caps: &[Capability]) -> String {
    if caps.is_empty() {
        return "none".to_string();
    }
    caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
}

/// What `pyebpf record` needs.
pub fn record_requirements() -> Vec<Requirement> {
    const BPF: &[Capability] = &[Capability::Bpf, Capability::SysAdmin];
    const PERFMON: &[Capability] = &[Capability::Perfmon, Capability::SysAdmin];
    vec![
        // bpf(BPF_PROG_LOAD/BPF_MAP_CREATE) for tracing programs.
        Requirement::AnyOf {
            caps: BPF,
            purpose: "load the sampler",
        },
        // perf_event_open on every CPU, system-wide, to attach it.
        Requirement::AnyOf {
            caps: PERFMON,
            purpose: "load the sampler",
        },
        // process_vm_readv and /proc/PID/root of other users' processes.
        Requirement::One {
            cap: Capability::SysPtrace,
            purpose: "read target memory",
        },
    ]
}

/// The effective capability set of this process.
pub fn effective() -> Result<u64, CapsError> {
    let status = std::fs::read_to_string(STATUS_PATH).map_err(CapsError::Read)?;
    parse_cap_eff(&status)
}

/// The `CapEff:` mask from the text of a `/proc/PID/status` file.
pub fn parse_cap_eff(status: &str) -> Result<u64, CapsError> {
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| CapsError::Parse("no CapEff line".into()))?
        .trim();
    u64::from_str_radix(value, 16)
        .map_err(|e| CapsError::Parse(format!("bad CapEff value {value:?}: {e}")))
}

/// Fail with a one-line explanation unless this process has what `mode`
/// (e.g. "pyebpf record") needs.
pub fn require(mode: &str, needed: &[Requirement]) -> Result<(), CapsError> {
    check(mode, needed, effective()?)
}

/// [`require`] against a given effective set.
fn check(mode: &str, needed: &[Requirement], eff: u64) -> Result<(), CapsError> {
    let missing = missing(eff, needed);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    let message = format!(
        "{mode} needs {}; missing: {}. Run as root or grant them \
         (e.g. setcap/AmbientCapabilities).",
        describe_needs(needed),
        names.join(", ")
    );
    Err(CapsError::Missing { missing, message })
}

/// The preferred capability of each requirement `eff` does not meet, in
/// order, without duplicates.
pub fn missing(eff: u64, needed: &[Requirement]) -> Vec<Capability> {
    let mut out = Vec::new();
    for req in needed.iter().filter(|r| !r.is_met(eff)) {
        if let Some(&cap) = req.caps().first() {
            if !out.contains(&cap) {
                out.push(cap);
            }
        }
    }
    out
}

/// "A and B to load the sampler, and C to read target memory": requirements
/// grouped by purpose, in order of first appearance.
fn describe_needs(needed: &[Requirement]) -> String {
    let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
    for req in needed {
        let d = req.describe();
        match groups.iter_mut().find(|(p, _)| *p == req.purpose()) {
            Some((_, ds)) => ds.push(d),
            None => groups.push((req.purpose(), vec![d])),
        }
    }
    let phrases: Vec<String> = groups
        .into_iter()
        .map(|(purpose, ds)| format!("{} to {purpose}", join_and(&ds, " and ")))
        .collect();
    join_and(&phrases, ", and ")
}

/// "a", "a<last>b", "a, b<last>c".
fn join_and(items: &[String], last: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., tail] => format!("{}{last}{tail}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const EXAMPLE_STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
        CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";

    fn mask(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |m, c| m | c.mask())
    }

    #[test]
    fn names_and_bits() {
        assert_eq!(Capability::Bpf.name(), "CAP_BPF");
        assert_eq!(Capability::SysAdmin.to_string(), "CAP_SYS_ADMIN");
        assert_eq!(Capability::Bpf.mask(), 1 << 39);
        assert_eq!(Capability::DacReadSearch.mask(), 4);
        assert_eq!(Capability::ALL.len(), 6);
        assert_eq!(Capability::CheckpointRestore.mask(), 1 << 40);
    }

    #[test]
    fn parse_status() {
        assert_eq!(parse_cap_eff(EXAMPLE_STATUS).unwrap(), 0x1fffeffffff);
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n").unwrap(), 0);
        let e = parse_cap_eff("Name:\tx\nCapPrm:\t0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot parse capabilities from /proc/self/status: no CapEff line"
        );
        assert!(parse_cap_eff("CapEff:\tzz\n")
            .unwrap_err()
            .to_string()
            .contains("bad CapEff value \"zz\""));
        assert!(parse_cap_eff("CapEff:\t\n").is_err());
    }

    #[test]
    fn missing_is_pure_and_prefers_narrow_caps() {
        use Capability::*;
        let rec = record_requirements();
        assert_eq!(missing(0, &rec), vec![Bpf, Perfmon, SysPtrace]);
        assert_eq!(missing(mask(&[SysAdmin]), &rec), vec![SysPtrace]);
        assert_eq!(missing(mask(&[SysAdmin, SysPtrace]), &rec), vec![]);
        assert_eq!(missing(mask(&[Bpf, Perfmon, SysPtrace]), &rec), vec![]);
        assert_eq!(missing(mask(&[Bpf, SysPtrace]), &rec), vec![Perfmon]);
        assert_eq!(
            missing(mask(&[DacReadSearch]), &rec),
            vec![Bpf, Perfmon, SysPtrace]
        );
        assert_eq!(missing(u64::MAX, &rec), vec![]);
        // Duplicates collapse, and an empty any-of is trivially met.
        let dup = [
            Requirement::One {
                cap: SysPtrace,
                purpose: "a",
            },
            Requirement::One {
                cap: SysPtrace,
                purpose: "b",
            },
            Requirement::AnyOf {
                caps: &[],
                purpose: "c",
            },
        ];
        assert_eq!(missing(0, &dup), vec![SysPtrace]);
    }

    #[test]
    fn message_is_one_clear_line() {
        let rec = record_requirements();
        let err = check("pyebpf record", &rec, Capability::Perfmon.mask()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pyebpf record needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_PERFMON (or CAP_SYS_ADMIN) \
             to load the sampler, and CAP_SYS_PTRACE to read target memory; missing: CAP_BPF, \
             CAP_SYS_PTRACE. Run as root or grant them (e.g. setcap/AmbientCapabilities)."
        );
        assert!(!err.to_string().contains('\n'));
        match err {
            CapsError::Missing { missing, .. } => {
                assert_eq!(missing, vec![Capability::Bpf, Capability::SysPtrace])
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(check(
            "pyebpf record",
            &rec,
            Capability::SysAdmin.mask() | Capability::SysPtrace.mask()
        )
        .is_ok());
        assert!(check("x", &[], 0).is_ok());
        // Three purposes: serial comma.
        let three = [
            Requirement::One {
                cap: Capability::Bpf,
                purpose: "p1",
            },
            Requirement::One {
                cap: Capability::Perfmon,
                purpose: "p2",
            },
            Requirement::AnyOf {
                caps: &[
                    Capability::DacReadSearch,
                    Capability::SysPtrace,
                    Capability::SysAdmin,
                ],
                purpose: "p3",
            },
        ];
        assert_eq!(
            check("m", &three, Capability::Bpf.mask())
                .unwrap_err()
                .to_string(),
            "m needs CAP_BPF to p1, CAP_PERFMON to p2, and CAP_DAC_READ_SEARCH (or CAP_SYS_PTRACE \
             or CAP_SYS_ADMIN) to p3; missing: CAP_PERFMON, CAP_DAC_READ_SEARCH. Run as root or \
             grant them (e.g. setcap/AmbientCapabilities)."
        );
    }

    #[test]
    fn no_drop_while_other_threads_run() {
        // A second thread for sure, whatever the harness does: the drop
        // must refuse (and change nothing) rather than drop on one thread.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let before = effective().unwrap();
        let r = drop_after_start();
        let _ = tx.send(());
        other.join().unwrap();
        match r {
            Err(CapsError::Threads(n)) => assert!(n >= 2, "{n}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(effective().unwrap(), before);
        assert_eq!(
            names(&[Capability::SysPtrace, Capability::CheckpointRestore]),
            "CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE"
        );
        assert_eq!(names(&[]), "none");
    }

    #[test]
    fn root_passes_record_requirements() {
        let eff = effective().unwrap();
        let result = require("pyebpf record", &record_requirements());
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = result {
                panic!("running as root (CapEff {eff:#x}) but: {e}");
            }
        } else {
            // Not root: the verdict must at least agree with the pure check.
            assert_eq!(
                result.is_ok(),
                missing(eff, &record_requirements()).is_empty()
            );
        }
    }

    #[test]
    fn unprivileged_child_has_no_effective_caps() {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
                "cat",
                "/proc/self/status",
            ])
            .output()
            .unwrap_or_else(|e| {
                panic!("this test needs `setpriv` (util-linux) and root to drop privileges: {e}")
            });
        assert!(
            out.status.success(),
            "setpriv failed ({}; this test must run as root): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let status = String::from_utf8(out.stdout).unwrap();
        assert!(
            status.contains("Uid:\t65534"),
            "child did not change uid:\n{status}"
        );
        let eff = parse_cap_eff(&status).unwrap();
        assert_eq!(eff, 0);
        let err = check("pyebpf record", &record_requirements(), eff).unwrap_err();
        assert!(
            err.to_string()
                .contains("missing: CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE."),
            "{err}"
        );
    }
}
