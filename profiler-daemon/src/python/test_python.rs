//! The real interpreters the unit tests take their ground truth from: the
//! host's Python 3.11 (pyenv's `python3` and Debian's static
//! `/usr/bin/python3.11`) and the 3.13-3.15 interpreters of the Debian roots
//! that `cargo xtask bootstrap` builds (run with `chroot`).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::layout::Minor;

/// `sys.executable` of the `python3` on PATH, resolved once. Tests need a
/// real 3.11 to produce ground truth; without one they fail, not skip.
pub fn python3() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys; print(sys.executable); print(sys.version_info[:2] == (3, 11))",
            ])
            .output()
            .expect("python3 on PATH is needed for these tests");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let exe = lines.next().unwrap_or_default().trim().to_owned();
        assert!(
            out.status.success() && !exe.is_empty(),
            "python3 failed: {out:?}"
        );
        assert_eq!(lines.next(), Some("True"), "python3 ({exe}) is not 3.11");
        PathBuf::from(exe)
    })
}

/// One interpreter to take ground truth from.
#[derive(Clone, Debug)]
pub struct TestPython {
    pub minor: Minor,
    /// The executable, as the interpreter sees it (inside its root).
    pub exe: PathBuf,
    /// The Debian root it runs in (`chroot`), if not the host's.
    pub root: Option<PathBuf>,
    /// Runs libpython (a shared-library build), not a static executable.
    pub shared: bool,
    /// `3.14.10 (sid, static)`, for messages.
    pub label: String,
}

impl TestPython {
    /// A command running this interpreter (in its root, if it has one).
    pub fn command(&self) -> Command {
        match &self.root {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        }
    }

    /// Where a host path `p` is as this interpreter sees it, after
    /// [`TestPython::share`] put it there.
    pub fn shared_path(&self, name: &str) -> String {
        match &self.root {
            Some(_) => format!("/tmp/pyebpf-unit/{name}"),
            None => std::env::temp_dir()
                .join("pyebpf-unit")
                .join(name)
                .display()
                .to_string(),
        }
    }

    /// The executable as the host sees it.
    pub fn host_exe(&self) -> PathBuf {
        match &self.root {
            Some(root) => root.join(self.exe.strip_prefix("/").unwrap_or(&self.exe)),
            None => self.exe.clone(),
        }
    }

    /// Writes `contents` where the interpreter finds it as
    /// [`TestPython::shared_path`]`(name)`.
    pub fn share(&self, name: &str, contents: &[u8]) -> String {
        let dir = match &self.root {
            Some(root) => root.join("tmp/pyebpf-unit"),
            None => std::env::temp_dir().join("pyebpf-unit"),
        };
        std::fs::create_dir_all(&dir).expect("create shared dir");
        // Written aside and renamed: tests share the directory.
        let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, contents).expect("write shared file");
        std::fs::rename(&tmp, dir.join(name)).expect("rename shared file");
        self.shared_path(name)
    }
}

/// Where `cargo xtask bootstrap` keeps the Debian roots.
pub fn roots_dir() -> PathBuf {
    std::env::var_os("PYEBPF_ROOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pyebpf/roots"))
}

#[derive(serde::Deserialize)]
struct RootEntry {
    root: PathBuf,
    path: PathBuf,
    version: String,
    build: String,
    suite: String,
}

/// Every interpreter to check a layout on: the host's 3.11s and, once per
/// Debian suite and version, the roots' static builds. Without the roots
/// (not built, or not root) the newer versions are reported skipped, or the
/// test fails when `PYEBPF_REQUIRE_BPF_TESTS` says every test must run.
pub fn all() -> Vec<TestPython> {
    with_builds(false)
}

/// [`all`], and the roots' shared-library builds too.
pub fn all_builds() -> Vec<TestPython> {
    with_builds(true)
}

fn with_builds(shared: bool) -> Vec<TestPython> {
    let mut out = vec![TestPython {
        minor: Minor::V3_11,
        exe: python3().to_owned(),
        root: None,
        // pyenv builds --enable-shared.
        shared: true,
        label: format!("3.11 ({})", python3().display()),
    }];
    let debian = Path::new("/usr/bin/python3.11");
    if debian.exists() {
        out.push(TestPython {
            minor: Minor::V3_11,
            exe: debian.to_owned(),
            root: None,
            shared: false,
            label: "3.11 (Debian, static)".into(),
        });
    }
    let list = roots_dir().join("interpreters.json");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let entries: Option<Vec<RootEntry>> = std::fs::read(&list)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match (entries, root) {
        (Some(entries), true) => {
            for e in entries
                .into_iter()
                .filter(|e| shared || e.build == "static")
            {
                let minor = e
                    .version
                    .split('.')
                    .nth(1)
                    .and_then(|m| m.parse().ok())
                    .and_then(Minor::from_minor)
                    .unwrap_or_else(|| panic!("{}: unknown version {}", list.display(), e.version));
                out.push(TestPython {
                    minor,
                    shared: e.build == "shared",
                    exe: e.path,
                    label: format!("{} ({}, {})", e.version, e.suite, e.build),
                    root: Some(e.root),
                });
            }
        }
        (_, root) => {
            let why = if root {
                format!("{} is missing or unreadable", list.display())
            } else {
                "running the Debian roots' interpreters needs root (chroot)".into()
            };
            assert!(
                std::env::var_os("PYEBPF_REQUIRE_BPF_TESTS").is_none(),
                "CPython 3.13-3.15 ground truth unavailable: {why}; run `cargo xtask bootstrap` as root"
            );
            eprintln!("SKIPPED: CPython 3.13-3.15 ground truth: {why}");
        }
    }
    out
}
