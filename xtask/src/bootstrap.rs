//! `cargo xtask bootstrap`: find or install everything the build and tests need.
//! Idempotent: each step first checks, and only installs what is missing.

// A child module (so it can extend `Bootstrap`) kept in its own file, src/roots.rs.
#[path = "roots.rs"]
pub mod roots;

use crate::util::{cargo, cmd, is_root, root, which};
use anyhow::{bail, Result};
use std::path::Path;

const LLVM_CONFIG: &str = "/usr/lib/llvm-22/bin/llvm-config";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PKG: &str = "llvm-22-dev";
pub const NIGHTLY: &str = "nightly-2026-05-20";
const SYSTEM_PYTHON: &str = "/usr/bin/python3.11";
const REQUIREMENTS: &str = "tests/requirements.txt";
/// Debian packages the tests use: (package, a binary it provides).
/// gdb is the native-stack tests' oracle (profiler-daemon/src/native/tests.rs).
/// umoci builds the OCI image of `cargo xtask dist`, whose checks read sections with readelf.
/// musl-tools: the C compiler for ring's and lzma-sys's C code in the musl build.
/// bpftool: tests/faults.rs's independent view of the BPF objects left behind
/// (it lives in sbin, so it is named by its path).
const DEB_TOOLS: [(&str, &str); 8] = [
    ("tmux", "tmux"),
    ("util-linux", "setpriv"),
    ("wrk", "wrk"),
    ("gdb", "gdb"),
    ("umoci", "umoci"),
    ("binutils", "readelf"),
    ("musl-tools", "musl-gcc"),
    ("bpftool", "/usr/sbin/bpftool"),
];
/// `cargo xtask dist`'s Debian package.
const CARGO_DEB: &str = "3.8.0";

enum Status {
    Present,
    Installed,
    Skipped,
    Missing,
}

impl Status {
    fn label(&self) -> &'static str {
        match self {
            Status::Present => "already present",
            Status::Installed => "installed",
            Status::Skipped => "skipped",
            Status::Missing => "MISSING",
        }
    }
}

struct Item {
    name: String,
    status: Status,
    detail: String,
}

#[derive(PartialEq)]
enum Llvm {
    Present,
    /// Not installable here: use the bpf-linker build that borrows rustc's LLVM.
    Unavailable,
    /// Installable, but only as root.
    NeedsRoot,
}

#[derive(Default)]
struct Bootstrap {
    items: Vec<Item>,
    apt_updated: bool,
}

pub fn run() -> Result<()> {
    let mut b = Bootstrap::default();
    let llvm = b.llvm()?;
    b.nightly()?;
    b.bpf_linker(llvm)?;
    b.python()?;
    b.deb_tools()?;
    b.dist_tools()?;
    b.roots()?;
    b.summary()
}

fn debian_like() -> bool {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let like = os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
            && (l.contains("debian") || l.contains("ubuntu"))
    });
    like && which("apt-get").is_some()
}

fn apt_install_hint(pkgs: &str) -> String {
    format!("run as root: apt-get update && apt-get install -y --no-install-recommends {pkgs}")
}

impl Bootstrap {
    fn record(&mut self, name: &str, status: Status, detail: impl Into<String>) {
        let detail = detail.into();
        println!("bootstrap: {name}: {} ({detail})", status.label());
        self.items.push(Item {
            name: name.into(),
            status,
            detail,
        });
    }

    fn apt_update(&mut self) -> Result<()> {
        if !self.apt_updated {
            cmd("apt-get", &["update"]).run()?;
            self.apt_updated = true;
        }
        Ok(())
    }

    fn apt_install(&mut self, pkgs: &[&str]) -> Result<()> {
        self.apt_update()?;
        cmd("apt-get", &["install", "-y", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
    }

    /// Step 1: LLVM 22 development files, which bpf-linker 0.13 links against.
    fn llvm(&mut self) -> Result<Llvm> {
        if Path::new(LLVM_CONFIG).exists() {
            self.record(LLVM_PKG, Status::Present, LLVM_CONFIG);
            return Ok(Llvm::Present);
        }
        if !debian_like() {
            self.record(
                LLVM_PKG,
                Status::Skipped,
                "not Debian/Ubuntu; using bpf-linker fallback",
            );
            return Ok(Llvm::Unavailable);
        }
        if !is_root() {
            self.record(LLVM_PKG, Status::Missing, apt_install_hint(LLVM_PKG));
            return Ok(Llvm::NeedsRoot);
        }
        self.apt_update()?;
        let policy = cmd("apt-cache", &["policy", LLVM_PKG])
            .probe()
            .unwrap_or_default();
        let candidate = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim);
        if matches!(candidate, None | Some("(none)")) {
            println!("bootstrap: {LLVM_PKG} is not available from apt (add apt.llvm.org?)");
            self.record(
                LLVM_PKG,
                Status::Skipped,
                "not in apt; using bpf-linker fallback",
            );
            return Ok(Llvm::Unavailable);
        }
        self.apt_install(&[LLVM_PKG])?;
        if !Path::new(LLVM_CONFIG).exists() {
            bail!("installed {LLVM_PKG} but {LLVM_CONFIG} is still missing");
        }
        self.record(LLVM_PKG, Status::Installed, "apt-get install");
        Ok(Llvm::Present)
    }

    /// Step 2: the pinned nightly with rust-src, used by aya-build for the eBPF crate.
    fn nightly(&mut self) -> Result<()> {
        let name = format!("{NIGHTLY} + rust-src");
        if which("rustup").is_none() {
            self.record(
                &name,
                Status::Missing,
                "rustup not found; install it from https://rustup.rs",
            );
            return Ok(());
        }
        let version = cmd("rustup", &["run", NIGHTLY, "rustc", "--version"]).probe();
        let has_src = || {
            cmd(
                "rustup",
                &["component", "list", "--toolchain", NIGHTLY, "--installed"],
            )
            .probe()
            .is_some_and(|out| out.lines().any(|l| l.starts_with("rust-src")))
        };
        if let Some(version) = version.filter(|_| has_src()) {
            self.record(&name, Status::Present, version);
            return Ok(());
        }
        cmd(
            "rustup",
            &[
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "-c",
                "rust-src",
            ],
        )
        .run()?;
        let version = cmd("rustup", &["run", NIGHTLY, "rustc", "--version"]).probe();
        match version.filter(|_| has_src()) {
            Some(version) => self.record(&name, Status::Installed, version),
            None => bail!("installed {NIGHTLY} but it still does not work (or lacks rust-src)"),
        }
        Ok(())
    }

    /// Step 3: bpf-linker 0.13 against LLVM 22, or 0.10.4 (rustc's LLVM) without it.
    fn bpf_linker(&mut self, llvm: Llvm) -> Result<()> {
        let name = "bpf-linker";
        let version = || {
            cmd("bpf-linker", &["--version"])
                .probe()
                .unwrap_or_default()
        };
        let acceptable = |v: &str| {
            let v = v.trim_start_matches("bpf-linker ");
            v.starts_with("0.13.") || (llvm == Llvm::Unavailable && v.starts_with("0.10."))
        };
        let found = version();
        if acceptable(&found) {
            self.record(name, Status::Present, found);
            return Ok(());
        }
        if !found.is_empty() {
            println!("bootstrap: found {found}, which is not the wanted version");
        }
        let install = match llvm {
            Llvm::NeedsRoot => {
                self.record(
                    name,
                    Status::Missing,
                    format!("needs {LLVM_PKG} first (see above)"),
                );
                return Ok(());
            }
            Llvm::Present => cargo(&["install", "bpf-linker@0.13.0", "--locked"])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            Llvm::Unavailable => cargo(&["install", "bpf-linker@0.10.4", "--locked"]),
        };
        install.run()?;
        let found = version();
        if !acceptable(&found) {
            bail!("installed bpf-linker but `bpf-linker --version` says {found:?} (is ~/.cargo/bin on PATH?)");
        }
        self.record(name, Status::Installed, found);
        Ok(())
    }

    /// Step 4: the Pythons the tests use (reported, never installed) and PyPI test deps.
    fn python(&mut self) -> Result<()> {
        let pyenv_python = which("python3").zip(cmd("python3", &["--version"]).probe());
        let have_python3 = pyenv_python.is_some();
        match pyenv_python {
            Some((path, v)) => self.record(
                "python3",
                Status::Present,
                format!("{v} at {}", path.display()),
            ),
            None => self.record(
                "python3",
                Status::Missing,
                "put pyenv's Python 3.11 on PATH",
            ),
        }
        match cmd(SYSTEM_PYTHON, &["--version"]).probe() {
            Some(v) => self.record(SYSTEM_PYTHON, Status::Present, v),
            None => self.record(
                SYSTEM_PYTHON,
                Status::Missing,
                apt_install_hint("python3.11"),
            ),
        }
        if !root().join(REQUIREMENTS).exists() {
            self.record(
                "python test deps",
                Status::Skipped,
                format!("no {REQUIREMENTS}"),
            );
        } else if !have_python3 {
            self.record("python test deps", Status::Missing, "needs python3");
        } else {
            cmd(
                "python3",
                &["-m", "pip", "install", "-q", "-r", REQUIREMENTS],
            )
            .run()?;
            self.record(
                "python test deps",
                Status::Present,
                format!("pip: {REQUIREMENTS} satisfied"),
            );
        }
        Ok(())
    }

    /// Step 5: Debian packages the tests use (tmux for TUI tests, setpriv from util-linux,
    /// wrk for the soak).
    fn deb_tools(&mut self) -> Result<()> {
        let mut missing = Vec::new();
        for (pkg, bin) in DEB_TOOLS {
            match which(bin) {
                Some(path) => self.record(pkg, Status::Present, path.display().to_string()),
                None => missing.push((pkg, bin)),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if !(is_root() && debian_like()) {
            for (pkg, _) in missing {
                self.record(pkg, Status::Missing, apt_install_hint(pkg));
            }
            return Ok(());
        }
        self.apt_install(&missing.iter().map(|(pkg, _)| *pkg).collect::<Vec<_>>())?;
        for (pkg, bin) in missing {
            match which(bin) {
                Some(path) => self.record(pkg, Status::Installed, path.display().to_string()),
                None => bail!("installed {pkg} but `{bin}` is still not on PATH"),
            }
        }
        Ok(())
    }

    /// Step 5b: what `cargo xtask dist` needs from Rust: the musl target of the default
    /// toolchain (the static binary) and cargo-deb.
    fn dist_tools(&mut self) -> Result<()> {
        let musl = crate::dist::MUSL;
        let installed = || {
            cmd("rustup", &["target", "list", "--installed"])
                .probe()
                .is_some_and(|out| out.lines().any(|l| l.trim() == musl))
        };
        if installed() {
            self.record(musl, Status::Present, "rustup target");
        } else if which("rustup").is_none() {
            self.record(musl, Status::Missing, "rustup not found");
        } else {
            cmd("rustup", &["target", "add", musl]).run()?;
            if !installed() {
                bail!("`rustup target add {musl}` ran but the target is not installed");
            }
            self.record(musl, Status::Installed, "rustup target add");
        }
        let version = || cargo(&["deb", "--version"]).probe().unwrap_or_default();
        let found = version();
        if found.ends_with(CARGO_DEB) {
            self.record("cargo-deb", Status::Present, found);
            return Ok(());
        }
        cargo(&["install", "--locked", &format!("cargo-deb@{CARGO_DEB}")]).run()?;
        let found = version();
        if !found.ends_with(CARGO_DEB) {
            bail!("installed cargo-deb {CARGO_DEB} but `cargo deb --version` says {found:?}");
        }
        self.record("cargo-deb", Status::Installed, found);
        Ok(())
    }

    fn summary(&self) -> Result<()> {
        let width = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        println!("\nbootstrap summary:");
        println!("  {:width$}  {:15}  detail", "item", "status");
        println!(
            "  {}  {}  {}",
            "-".repeat(width),
            "-".repeat(15),
            "-".repeat(6)
        );
        for i in &self.items {
            println!("  {:width$}  {:15}  {}", i.name, i.status.label(), i.detail);
        }
        let missing: Vec<_> = self
            .items
            .iter()
            .filter(|i| matches!(i.status, Status::Missing))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let todo: Vec<_> = missing
            .iter()
            .map(|i| format!("  - {}: {}", i.name, i.detail))
            .collect();
        bail!("bootstrap incomplete; to fix:\n{}", todo.join("\n"))
    }
}
