//! Bootstrap step 6: Debian roots with the CPython 3.13+ interpreters the end-to-end tests run
//! (the host has only 3.11).
//!
//! Each root is made by `debootstrap --variant=minbase` into `<cache>/<name>.tmp-<pid>` and
//! renamed to `<cache>/<name>` only once complete, so an interrupted build is never used. The
//! cache (`/var/cache/pyebpf/roots`, or `$PYEBPF_ROOTS_DIR`) is outside `target/` and survives
//! `cargo clean`. A root is rebuilt when its `.pyebpf-root` marker differs from its recipe;
//! otherwise it is reused as is (delete the directory to pick up newer Debian packages).
//!
//! Debian's `/usr/bin/python3.X` have libpython linked in, so each root also gets a
//! `/usr/bin/python3.X-shared` launcher (`tests/tools/pylaunch.c`, built by the host's gcc)
//! for every `libpython3.X.so.1.0` it has. Every interpreter is run in its root to learn its
//! version and to check its build (a shared build maps `libpython3.X.so`), and the list is
//! written to `<cache>/interpreters.json` for the tests (`profiler-daemon/tests/common/roots.rs`).

use super::{debian_like, Bootstrap, Status};
use crate::util::{is_root, root, which};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEFAULT_DIR: &str = "/var/cache/pyebpf/roots";
const DIR_ENV: &str = "PYEBPF_ROOTS_DIR";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Bump when the way a root is made changes: every cached root is then rebuilt.
const RECIPE_VERSION: u32 = 1;
const MARKER: &str = ".pyebpf-root";
const LAUNCHER_SRC: &str = "tests/tools/pylaunch.c";
/// Inside each root: where the tests bind-mount the repository's `tests/`.
const TESTS_MOUNT: &str = "pyebpf";
const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";
/// PATH for the commands run here (debootstrap and chroot live in sbin).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const JSON: &str = "interpreters.json";

struct Recipe {
    name: &'static str,
    suite: &'static str,
    packages: &'static [&'static str],
}

/// The roots. Interpreter versions are never written down: they are whatever Debian ships.
const RECIPES: [Recipe; 2] = [
    Recipe {
        name: "trixie",
        suite: "trixie",
        packages: &["python3", "libpython3.13"],
    },
    Recipe {
        name: "sid",
        suite: "sid",
        packages: &[
            "python3",
            "python3.13",
            "python3.15",
            "libpython3.13",
            "libpython3.14",
            "libpython3.15",
        ],
    },
];

impl Recipe {
    /// The marker's content: a root whose marker differs is rebuilt.
    fn marker(&self) -> String {
        format!(
            "{RECIPE_VERSION} {} --variant=minbase --include={} {MIRROR}\n",
            self.suite,
            self.packages.join(",")
        )
    }
}

/// One entry of `interpreters.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Interpreter {
    /// The root on the host.
    root: String,
    /// The interpreter as seen inside the root.
    path: String,
    version: String,
    hex: u32,
    /// "static" (libpython linked in) or "shared" (maps libpython3.X.so).
    build: String,
    suite: String,
    /// The executable is position-independent (ELF type ET_DYN).
    pie: bool,
}

/// What a probe of an interpreter, run inside its root, prints (one JSON line).
#[derive(Deserialize)]
struct Probe {
    version: String,
    hex: u32,
    ldlibrary: Option<String>,
    maps_libpython: bool,
}

const PROBE: &str = "import json, sys, sysconfig
lib = 'libpython%d.%d.so' % sys.version_info[:2]
maps = open('/proc/self/maps').read()
print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3], 'hex': sys.hexversion,
                  'ldlibrary': sysconfig.get_config_var('LDLIBRARY'), 'maps_libpython': lib in maps}))";

pub fn roots_dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

impl Bootstrap {
    /// Step 6: the Debian roots and their interpreters (see the module docs).
    pub(super) fn roots(&mut self) -> Result<()> {
        let dir = roots_dir();
        if !is_root() {
            self.record(
                "debian roots",
                Status::Skipped,
                format!(
                    "need root (debootstrap, chroot); tests of CPython 3.13+ will skip; \
                     run `cargo xtask bootstrap` as root to build {}",
                    dir.display()
                ),
            );
            return Ok(());
        }
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let _lock = lock(&dir)?;
        remove_stale_tmp(&dir)?;

        let stale: Vec<&Recipe> = RECIPES
            .iter()
            .filter(|r| fs::read_to_string(dir.join(r.name).join(MARKER)).ok() != Some(r.marker()))
            .collect();
        let mut built = Vec::new();
        if !stale.is_empty() {
            let debootstrap = self.debootstrap()?;
            let names: Vec<_> = stale.iter().map(|r| r.name).collect();
            println!(
                "bootstrap: building Debian roots {} in parallel in {} (~2 min; logs: <name>.log)",
                names.join(", "),
                dir.display()
            );
            let results: Vec<Result<Duration>> = std::thread::scope(|s| {
                let threads: Vec<_> = stale
                    .iter()
                    .map(|r| s.spawn(|| build_root(&dir, r, &debootstrap)))
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().expect("root build thread panicked"))
                    .collect()
            });
            let mut errors = Vec::new();
            for (r, res) in stale.iter().zip(results) {
                match res {
                    Ok(took) => {
                        let size = du(&dir.join(r.name));
                        self.record(
                            &format!("debian root {}", r.name),
                            Status::Installed,
                            format!(
                                "debootstrap {} in {:.0} s, {size}",
                                r.suite,
                                took.as_secs_f64()
                            ),
                        );
                        built.push(r.name);
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if !errors.is_empty() {
                bail!("{}", errors.join("\n"));
            }
        }

        let mut interpreters = Vec::new();
        for r in &RECIPES {
            let root_dir = dir.join(r.name);
            if !built.contains(&r.name) {
                self.record(
                    &format!("debian root {}", r.name),
                    Status::Present,
                    format!("cached: {}", root_dir.display()),
                );
            }
            // Cheap and idempotent: also repairs a root whose directory was removed.
            fs::create_dir_all(root_dir.join(TESTS_MOUNT))?;
            let rebuilt = self.launchers(&root_dir)?;
            for (path, build) in interpreter_paths(&root_dir)? {
                let i = interpreter(&root_dir, r.suite, &path, build)?;
                let fresh = built.contains(&r.name) || rebuilt.contains(&path);
                self.record(
                    &format!("python {} ({}, {})", i.version, i.suite, i.build),
                    if fresh {
                        Status::Installed
                    } else {
                        Status::Present
                    },
                    format!("{}{}", i.root, i.path),
                );
                interpreters.push(i);
            }
        }
        let json = dir.join(JSON);
        let text = serde_json::to_string_pretty(&interpreters)? + "\n";
        let status = if fs::read_to_string(&json).ok().as_deref() == Some(&text) {
            Status::Present
        } else {
            let tmp = dir.join(format!("{JSON}.tmp-{}", std::process::id()));
            fs::write(&tmp, &text)?;
            fs::rename(&tmp, &json)?;
            Status::Installed
        };
        self.record(
            JSON,
            status,
            format!("{} interpreters: {}", interpreters.len(), json.display()),
        );
        Ok(())
    }

    /// debootstrap, installed with apt-get if missing.
    fn debootstrap(&mut self) -> Result<PathBuf> {
        let find = || {
            which("debootstrap").or_else(|| {
                let p = PathBuf::from("/usr/sbin/debootstrap");
                p.exists().then_some(p)
            })
        };
        if let Some(path) = find() {
            self.record("debootstrap", Status::Present, path.display().to_string());
            return Ok(path);
        }
        if !debian_like() {
            bail!("debootstrap is missing and this is not Debian/Ubuntu: install it, then rerun");
        }
        self.apt_install(&["debootstrap"])?;
        let path = find().context("installed debootstrap but cannot find it")?;
        self.record("debootstrap", Status::Installed, path.display().to_string());
        Ok(path)
    }

    /// Builds `python3.X-shared` for each `libpython3.X.so.1.0` of the root, when missing or
    /// older than the library or the source. Returns the rebuilt ones (paths inside the root).
    fn launchers(&mut self, root_dir: &Path) -> Result<Vec<String>> {
        let src = root().join(LAUNCHER_SRC);
        let mut rebuilt = Vec::new();
        for minor in libpython_minors(&root_dir.join(LIB_DIR))? {
            let lib = root_dir
                .join(LIB_DIR)
                .join(format!("libpython3.{minor}.so.1.0"));
            let in_root = format!("/usr/bin/python3.{minor}-shared");
            let out = root_dir.join(&in_root[1..]);
            if newer(&out, &[&src, &lib]) {
                continue;
            }
            if which("gcc").is_none() {
                self.apt_install(&["gcc", "libc6-dev"])?;
            }
            let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
            let lib_dirs = format!(
                "-Wl,-rpath-link,{}:{}",
                root_dir.join(LIB_DIR).display(),
                root_dir.join("lib/x86_64-linux-gnu").display()
            );
            // libpython needs the root's (newer) glibc symbol versions, which the host's libc
            // cannot satisfy at link time; the root's ld.so resolves them at run time.
            let out_arg = tmp.to_string_lossy().into_owned();
            let args = [
                "-O2",
                "-o",
                &out_arg,
                &src.to_string_lossy(),
                &lib.to_string_lossy(),
                &lib_dirs,
                "-Wl,--allow-shlib-undefined",
            ];
            let output = Command::new("gcc")
                .args(args)
                .env("PATH", PATH)
                .stdin(Stdio::null())
                .output()
                .context("cannot run gcc")?;
            if !output.status.success() {
                let _ = fs::remove_file(&tmp);
                bail!(
                    "gcc {} failed ({}):\n{}",
                    args.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            fs::rename(&tmp, &out)?;
            println!("bootstrap: built {} ({})", out.display(), LAUNCHER_SRC);
            rebuilt.push(in_root);
        }
        Ok(rebuilt)
    }
}

/// Takes the cache's lock, so two bootstraps never build (or delete) the same root.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let flock = |op| {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
    };
    if !flock(libc::LOCK_EX | libc::LOCK_NB) {
        println!(
            "bootstrap: waiting for another bootstrap's lock on {}",
            path.display()
        );
        ensure!(
            flock(libc::LOCK_EX),
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

/// Removes what interrupted builds left (`<name>.tmp-<pid>`); called with the lock held, so
/// none of them is in use.
fn remove_stale_tmp(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.contains(".tmp-") {
            println!(
                "bootstrap: removing {} (left by an interrupted build)",
                path.display()
            );
            remove_tree(&path)?;
        }
    }
    Ok(())
}

/// Removes a root, detaching first anything mounted under it (debootstrap mounts /proc and
/// /sys while it runs), so that nothing outside it is ever deleted through a mount.
fn remove_tree(path: &Path) -> Result<()> {
    if !path.is_dir() || path.is_symlink() {
        return fs::remove_file(path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .with_context(|| format!("remove {}", path.display()));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounts = mounts_under(&mountinfo, path);
    // Innermost first.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounts {
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes())?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            bail!(
                "cannot unmount {} before removing {}: {}",
                m.display(),
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
}

/// Mount points (field 5 of /proc/self/mountinfo) strictly under `dir`.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// debootstrap one root into a temporary directory, then move it into place.
fn build_root(dir: &Path, r: &Recipe, debootstrap: &Path) -> Result<Duration> {
    let start = Instant::now();
    let tmp = dir.join(format!("{}.tmp-{}", r.name, std::process::id()));
    let log_path = dir.join(format!("{}.log", r.name));
    let log = File::create(&log_path)?;
    let args = [
        "--variant=minbase".to_string(),
        format!("--include={}", r.packages.join(",")),
        r.suite.to_string(),
        tmp.to_string_lossy().into_owned(),
        MIRROR.to_string(),
    ];
    println!(
        "bootstrap: $ debootstrap {} > {}",
        args.join(" "),
        log_path.display()
    );
    let status = Command::new(debootstrap)
        .args(&args)
        .env("PATH", PATH)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot start debootstrap")?;
    if !status.success() {
        let _ = remove_tree(&tmp);
        bail!(
            "debootstrap {} failed ({status}); last lines of {}:\n{}",
            r.suite,
            log_path.display(),
            tail(&log_path, 30)
        );
    }
    // The downloaded packages (~170 MB) are not needed once installed.
    let archives = tmp.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "deb") {
            fs::remove_file(entry.path())?;
        }
    }
    fs::create_dir_all(tmp.join(TESTS_MOUNT))?;
    fs::write(tmp.join(MARKER), r.marker())?;
    let dest = dir.join(r.name);
    remove_tree(&dest)?;
    fs::rename(&tmp, &dest)
        .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))?;
    println!(
        "bootstrap: debian root {} built in {:.0} s",
        r.name,
        start.elapsed().as_secs_f64()
    );
    Ok(start.elapsed())
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Disk use, as `du -sh` prints it, or "" if du fails.
fn du(path: &Path) -> String {
    Command::new("du")
        .arg("-sh")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// `out` exists and is at least as new as every input.
fn newer(out: &Path, inputs: &[&Path]) -> bool {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match mtime(out) {
        Some(t) => inputs.iter().all(|i| mtime(i).is_some_and(|ti| ti <= t)),
        None => false,
    }
}

/// X of each `libpython3.X.so.1.0` in `lib_dir`, sorted.
fn libpython_minors(lib_dir: &Path) -> Result<Vec<u32>> {
    let mut minors: Vec<u32> = fs::read_dir(lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            minor_of(name.strip_prefix("libpython3.")?.strip_suffix(".so.1.0")?)
        })
        .collect();
    minors.sort_unstable();
    Ok(minors)
}

fn minor_of(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Build {
    Static,
    Shared,
}

/// The root's interpreters, as paths inside it: `/usr/bin/python3.X` (Debian's, static)
/// and `/usr/bin/python3.X-shared` (our launchers), by build then minor version.
fn interpreter_paths(root_dir: &Path) -> Result<Vec<(String, Build)>> {
    let mut found: Vec<(Build, u32, String)> = fs::read_dir(root_dir.join("usr/bin"))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix("python3.")?;
            let (minor, build) = match rest.strip_suffix("-shared") {
                Some(m) => (m, Build::Shared),
                None => (rest, Build::Static),
            };
            Some((build, minor_of(minor)?, format!("/usr/bin/{name}")))
        })
        .collect();
    found.sort_by_key(|(b, m, _)| (*b == Build::Shared, *m));
    Ok(found.into_iter().map(|(b, _, p)| (p, b)).collect())
}

/// Runs one interpreter in its root and checks its build.
fn interpreter(root_dir: &Path, suite: &str, path: &str, build: Build) -> Result<Interpreter> {
    let host_path = root_dir.join(&path[1..]);
    let probe = run_in_root(root_dir, &[path, "-I", "-c", PROBE])?;
    let p: Probe = serde_json::from_str(&probe).with_context(|| {
        format!(
            "{path} in {}: bad probe output {probe:?}",
            root_dir.display()
        )
    })?;
    let is_shared = p.maps_libpython;
    ensure!(
        is_shared == (build == Build::Shared),
        "{} is expected to be a {} build but {} libpython (LDLIBRARY {:?})",
        host_path.display(),
        if build == Build::Shared {
            "shared"
        } else {
            "static"
        },
        if is_shared { "maps" } else { "does not map" },
        p.ldlibrary
    );
    Ok(Interpreter {
        root: root_dir.to_string_lossy().into_owned(),
        path: path.to_string(),
        version: p.version,
        hex: p.hex,
        build: if is_shared { "shared" } else { "static" }.to_string(),
        suite: suite.to_string(),
        pie: is_pie(&host_path)?,
    })
}

/// `chroot ROOT ARGV...` with /proc mounted, in private mount and pid namespaces (nothing
/// stays mounted on the host); returns trimmed stdout.
fn run_in_root(root_dir: &Path, argv: &[&str]) -> Result<String> {
    const SHELL: &str =
        r#"mount -t proc proc "$1/proc" && root=$1 && shift && exec chroot "$root" "$@""#;
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--propagation", "private"])
        .args(["sh", "-c", SHELL, "sh"])
        .arg(root_dir)
        .args(argv)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .output()
        .context("cannot run unshare (util-linux)")?;
    if !out.status.success() {
        bail!(
            "chroot {} {} failed ({}):\n{}",
            root_dir.display(),
            argv[0],
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The ELF executable is position-independent (type ET_DYN rather than ET_EXEC).
fn is_pie(path: &Path) -> Result<bool> {
    let mut header = [0u8; 18];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("read ELF header of {}", path.display()))?;
    ensure!(&header[..4] == b"\x7fELF", "{} is not ELF", path.display());
    match u16::from_le_bytes([header[16], header[17]]) {
        2 => Ok(false),
        3 => Ok(true),
        t => bail!("{}: unexpected ELF type {t}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mounts_under_a_dir() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:5 / /r/sid.tmp-7/proc rw - proc proc rw\n\
                    91 22 0:6 / /r/sid.tmp-7/sys rw - sysfs sysfs rw\n\
                    92 22 0:7 / /r/sid.tmp-70/a\\040b rw - tmpfs none rw\n\
                    93 22 0:8 / /r/sid.tmp-7 rw - tmpfs none rw";
        assert_eq!(
            mounts_under(info, Path::new("/r/sid.tmp-7")),
            [
                PathBuf::from("/r/sid.tmp-7/proc"),
                PathBuf::from("/r/sid.tmp-7/sys")
            ]
        );
        assert_eq!(
            mounts_under(info, Path::new("/r/sid.tmp-70")),
            [PathBuf::from("/r/sid.tmp-70/a b")]
        );
    }

    #[test]
    fn names() {
        assert_eq!(minor_of("13"), Some(13));
        assert_eq!(minor_of(""), None);
        assert_eq!(minor_of("13m"), None);
        assert!(RECIPES.iter().all(|r| r
            .marker()
            .starts_with(&format!("{RECIPE_VERSION} {} ", r.suite))));
    }
}
