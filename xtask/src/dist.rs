//! `cargo xtask dist`: the release artifacts in `target/artifacts/` (not `target/dist/`: cargo
//! keeps the `dist` profile's host build there), each checked before it is listed in
//! `SHA256SUMS`:
//!
//! - `pyebpf-VERSION-x86_64-linux-musl`: the static binary (musl, profile `dist`: no debug
//!   information, stripped), with the BPF programs embedded by the build script. Checked: no
//!   ELF interpreter, no needed libraries, `--version`, a real `pyebpf record` of a Python
//!   process (as root).
//! - `pyebpf_VERSION-1_amd64.deb` (cargo-deb): the binary in `/usr/bin`, the systemd unit,
//!   `/etc/pyebpf/pyebpf.yaml` as a conffile. Checked: `dpkg -i` in a throwaway overlay of a
//!   debootstrapped Debian root (`cargo xtask bootstrap`'s trixie root, left unmodified),
//!   `pyebpf --version` and `pyebpf config check` inside it, the files where the package says,
//!   `dpkg -r` removes the binary and keeps the conffile.
//! - `pyebpf-VERSION-oci.tar`: an OCI image layout (umoci), FROM scratch: the binary and the
//!   CA certificates. Checked: unpacked again with umoci, its file list, its entrypoint, and
//!   the binary `--version` chrooted into that file system (which has no libc at all).
//! - `pyebpf-VERSION.tgz`: the Helm chart of `deploy/helm/pyebpf`, rendered, linted and
//!   schema-checked (`tests/tools/helm_check.py`: Helm's Go SDK and kubernetes-validate from
//!   PyPI); the rendered daemon configuration is checked by this `pyebpf config check`.
//!
//! The image name comes from one place, `[workspace.metadata.pyebpf] image` in Cargo.toml
//! (tag: the crate version); `image_name_is_consistent` (a unit test) checks every file
//! that names it.

use crate::bootstrap::roots::roots_dir;
use crate::util::{banner, cargo, cmd, is_root, root, target_dir};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const MUSL: &str = "x86_64-unknown-linux-musl";
const PROFILE: &str = "dist";
/// The Debian root (made by `cargo xtask bootstrap`) the .deb is installed into.
const DEB_TEST_ROOT: &str = "trixie";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CHART_DIR: &str = "deploy/helm/pyebpf";

#[derive(clap::Args)]
pub struct DistArgs {
    /// Skip `cargo xtask bootstrap` (when it has just run, e.g. from `cargo xtask test`).
    #[arg(long)]
    pub no_bootstrap: bool,
}

/// The image name and version, from `cargo metadata`.
pub struct Meta {
    pub image: String,
    pub version: String,
}

impl Meta {
    pub fn image_ref(&self) -> String {
        format!("{}:{}", self.image, self.version)
    }
}

pub fn meta() -> Result<Meta> {
    let out = output(cargo(&["metadata", "--no-deps", "--format-version", "1"]).0)?;
    let json: serde_json::Value =
        serde_json::from_str(&out).context("cannot parse `cargo metadata`")?;
    let image = json
        .pointer("/metadata/pyebpf/image")
        .and_then(|v| v.as_str())
        .context("Cargo.toml has no [workspace.metadata.pyebpf] image = \"...\"")?
        .to_string();
    let version = json["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "profiler-daemon"))
        .and_then(|p| p["version"].as_str())
        .context("`cargo metadata` lists no profiler-daemon version")?
        .to_string();
    Ok(Meta { image, version })
}

pub fn run(args: &DistArgs) -> Result<()> {
    if !args.no_bootstrap {
        crate::bootstrap::run()?;
    }
    let meta = meta()?;
    let dist = target_dir().join("artifacts");
    let scratch = target_dir().join("dist-check");
    for d in [&dist, &scratch] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let started = Instant::now();

    banner("dist: static binary");
    cargo(&[
        "build",
        "--profile",
        PROFILE,
        "--target",
        MUSL,
        "-p",
        "profiler-daemon",
        "--bin",
        "pyebpf",
    ])
    // cc-rs looks for x86_64-linux-musl-gcc; Debian's musl-tools calls it musl-gcc.
    .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
    .run()?;
    let built = target_dir().join(MUSL).join(PROFILE).join("pyebpf");
    let binary = dist.join(format!("pyebpf-{}-x86_64-linux-musl", meta.version));
    fs::copy(&built, &binary)
        .with_context(|| format!("cannot copy {} to {}", built.display(), binary.display()))?;
    check_binary(&binary, &meta, &scratch)?;

    banner("dist: Debian package");
    let deb = build_deb(&dist, &meta)?;
    check_deb(&deb, &meta, &scratch)?;

    banner("dist: OCI image");
    let oci = build_oci(&binary, &dist, &meta, &scratch)?;
    check_oci(&oci, &meta, &scratch)?;

    banner("dist: Helm chart");
    check_chart(&binary, &dist, &meta, &scratch)?;

    let names = artifact_names(&dist)?;
    let sums = output(cmd("sha256sum", &[]).args(&names).in_dir(&dist).0)?;
    fs::write(dist.join("SHA256SUMS"), format!("{sums}\n")).context("cannot write SHA256SUMS")?;
    fs::remove_dir_all(&scratch).ok();
    println!(
        "\n{}/ ({:.0} s):",
        dist.display(),
        started.elapsed().as_secs_f64()
    );
    for name in &names {
        let size = fs::metadata(dist.join(name)).map(|m| m.len()).unwrap_or(0);
        println!("  {name:45} {:>7.1} MiB", size as f64 / 1048576.0);
    }
    println!("  SHA256SUMS");
    Ok(())
}

fn artifact_names(dist: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dist).with_context(|| format!("cannot list {}", dist.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Runs a command, returns its stdout; an error with its stderr if it fails.
fn output(mut c: impl std::borrow::BorrowMut<Command>) -> Result<String> {
    let c = c.borrow_mut();
    let shown = format!("{c:?}");
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

trait InDir {
    fn in_dir(self, dir: &Path) -> Self;
}

impl InDir for crate::util::Cmd {
    fn in_dir(mut self, dir: &Path) -> Self {
        self.0.current_dir(dir);
        self
    }
}

/// ELF program header types.
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;

/// What makes an ELF file depend on a dynamic loader: its PT_INTERP and its DT_NEEDED count.
#[derive(Debug, PartialEq)]
struct Linkage {
    interp: Option<String>,
    needed: usize,
}

fn linkage(elf: &[u8]) -> Result<Linkage> {
    let u16_at = |o: usize| -> Result<u16> {
        let b = elf.get(o..o + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| -> Result<u32> {
        let b = elf.get(o..o + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes(b.try_into()?))
    };
    let u64_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(b.try_into()?))
    };
    ensure!(
        elf.get(..6) == Some(b"\x7fELF\x02\x01".as_slice()),
        "not a 64-bit little-endian ELF file"
    );
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut out = Linkage {
        interp: None,
        needed: 0,
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (offset, size) = (
            usize::try_from(u64_at(ph + 8)?)?,
            usize::try_from(u64_at(ph + 32)?)?,
        );
        match u32_at(ph)? {
            PT_INTERP => {
                let raw = elf.get(offset..offset + size).context("bad PT_INTERP")?;
                out.interp = Some(String::from_utf8_lossy(raw).trim_end_matches('\0').into());
            }
            PT_DYNAMIC => {
                let raw = elf.get(offset..offset + size).context("bad PT_DYNAMIC")?;
                out.needed += raw
                    .chunks_exact(16)
                    .filter(|d| d[..8] == DT_NEEDED.to_le_bytes())
                    .count();
            }
            _ => {}
        }
    }
    Ok(out)
}

fn check_binary(binary: &Path, meta: &Meta, scratch: &Path) -> Result<()> {
    let elf = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let link = linkage(&elf)?;
    ensure!(
        link == Linkage {
            interp: None,
            needed: 0
        },
        "{} is not static: {link:?}",
        binary.display()
    );
    let file = output(cmd("file", &["-b"]).args([binary]).0).unwrap_or_default();
    let debug = output(cmd("readelf", &["-S", "-W"]).args([binary]).0).unwrap_or_default();
    ensure!(
        !debug.contains(".debug_") && !debug.contains(".symtab"),
        "{} still has debug information or a symbol table",
        binary.display()
    );
    println!(
        "dist: {}: static (no PT_INTERP, no DT_NEEDED), stripped, {:.1} MiB; file: {}",
        binary.display(),
        elf.len() as f64 / 1048576.0,
        file.trim()
    );
    let version = output(Command::new(binary).arg("--version"))?;
    ensure!(
        version.contains(&meta.version),
        "`pyebpf --version` printed {version:?}, not version {}",
        meta.version
    );
    println!("dist: --version: {}", version.trim());
    if !is_root() {
        bail!("the dist check records a Python process with the static binary: run as root");
    }
    record_python(binary, scratch)
}

/// `pyebpf record` of a Python process for a few seconds: the profile must show its function.
fn record_python(binary: &Path, scratch: &Path) -> Result<()> {
    let script =
        "def dist_check_spin():\n    while True:\n        sum(range(1000))\n\ndist_check_spin()\n";
    let child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .spawn()
        .context("cannot start /usr/bin/python3")?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
    let child_pid = child.id();
    let guard = Kill(child);
    std::thread::sleep(Duration::from_millis(300));
    let folded = scratch.join("record.folded");
    let pid = child_pid.to_string();
    let started = Instant::now();
    output(
        Command::new(binary)
            .args(["record", "--quiet", "-d", "3", "-p", &pid, "-o"])
            .arg(&folded),
    )?;
    drop(guard);
    let text =
        fs::read_to_string(&folded).with_context(|| format!("cannot read {}", folded.display()))?;
    let samples: u64 = text
        .lines()
        .filter(|l| l.contains("dist_check_spin"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    ensure!(
        samples > 0,
        "`pyebpf record` of a spinning Python process gave no sample in dist_check_spin:\n{text}"
    );
    println!(
        "dist: record: {samples} samples in dist_check_spin in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_deb(dist: &Path, meta: &Meta) -> Result<PathBuf> {
    // The unit as shipped in deploy/ starts /usr/local/bin/pyebpf (a manual install); the
    // package installs the binary in /usr/bin.
    let unit = fs::read_to_string(root().join("deploy/pyebpf.service"))
        .context("cannot read deploy/pyebpf.service")?;
    ensure!(
        unit.contains("ExecStart=/usr/local/bin/pyebpf "),
        "deploy/pyebpf.service: no ExecStart=/usr/local/bin/pyebpf"
    );
    let unit_dir = target_dir().join("deb-assets");
    fs::create_dir_all(&unit_dir)?;
    fs::write(
        unit_dir.join("pyebpf.service"),
        unit.replace("/usr/local/bin/pyebpf", "/usr/bin/pyebpf"),
    )
    .context("cannot write the package's unit")?;
    cargo(&[
        "deb",
        "-p",
        "profiler-daemon",
        "--no-build",
        "--target",
        MUSL,
        "--profile",
        PROFILE,
        "--output",
    ])
    .args([dist])
    .run()?;
    let deb = dist.join(format!("pyebpf_{}-1_amd64.deb", meta.version));
    ensure!(deb.exists(), "cargo deb did not write {}", deb.display());
    Ok(deb)
}

/// An overlay on a Debian root: writes go to `upper`, the root stays as it is.
struct Overlay {
    merged: PathBuf,
    base: PathBuf,
}

impl Overlay {
    fn mount(lower: &Path, base: &Path) -> Result<Overlay> {
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        output(
            cmd("mount", &["-t", "overlay", "overlay", "-o", &opts])
                .args([&merged])
                .0,
        )?;
        Ok(Overlay {
            merged,
            base: base.to_path_buf(),
        })
    }

    fn chroot(&self, argv: &[&str]) -> Result<String> {
        output(
            cmd("chroot", &[])
                .args([&self.merged])
                .args(argv)
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .0,
        )
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.merged)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            fs::remove_dir_all(&self.base).ok();
        } else {
            eprintln!("dist: cannot unmount {}", self.merged.display());
        }
    }
}

fn check_deb(deb: &Path, meta: &Meta, scratch: &Path) -> Result<()> {
    let lower = roots_dir().join(DEB_TEST_ROOT);
    ensure!(
        lower.join("var/lib/dpkg/status").exists(),
        "no Debian root at {} to install the .deb into: run `cargo xtask bootstrap` as root",
        lower.display()
    );
    let root = Overlay::mount(&lower, &scratch.join("deb-root"))?;
    fs::copy(deb, root.merged.join("tmp/pyebpf.deb")).context("cannot copy the .deb")?;
    root.chroot(&["dpkg", "-i", "/tmp/pyebpf.deb"])?;
    let version = root.chroot(&["pyebpf", "--version"])?;
    ensure!(
        version.contains(&meta.version),
        "pyebpf --version in the root: {version:?}"
    );
    let listed = root.chroot(&["dpkg", "-L", "pyebpf"])?;
    let expected = [
        "/usr/bin/pyebpf",
        "/usr/lib/systemd/system/pyebpf.service",
        "/etc/pyebpf/pyebpf.yaml",
        "/usr/share/doc/pyebpf/copyright",
    ];
    for path in expected {
        ensure!(
            listed.lines().any(|l| l == path),
            "the package does not list {path}:\n{listed}"
        );
        let on_disk = root.merged.join(path.trim_start_matches('/'));
        ensure!(on_disk.is_file(), "{path} is not installed");
    }
    let conffiles = root.chroot(&["dpkg-query", "-W", "--showformat=${Conffiles}", "pyebpf"])?;
    ensure!(
        conffiles.contains("/etc/pyebpf/pyebpf.yaml"),
        "/etc/pyebpf/pyebpf.yaml is not a conffile: {conffiles:?}"
    );
    let unit = fs::read_to_string(root.merged.join("usr/lib/systemd/system/pyebpf.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/bin/pyebpf daemon --config /etc/pyebpf/pyebpf.yaml"),
        "the packaged unit does not start /usr/bin/pyebpf"
    );
    root.chroot(&["pyebpf", "config", "check", "/etc/pyebpf/pyebpf.yaml"])?;
    root.chroot(&["dpkg", "-r", "pyebpf"])?;
    ensure!(
        !root.merged.join("usr/bin/pyebpf").exists(),
        "dpkg -r left /usr/bin/pyebpf"
    );
    ensure!(
        root.merged.join("etc/pyebpf/pyebpf.yaml").exists(),
        "dpkg -r removed the conffile (only purge should)"
    );
    drop(root);
    ensure!(
        !lower.join("usr/bin/pyebpf").exists(),
        "the shared Debian root {} was modified",
        lower.display()
    );
    println!(
        "dist: {}: dpkg -i in an overlay of {}: --version, files, conffile, config check, dpkg -r: ok",
        deb.display(),
        lower.display()
    );
    Ok(())
}

fn umoci(args: &[&str]) -> crate::util::Cmd {
    cmd("umoci", args)
}

/// What the image holds besides its directories.
/// The binary is where a manual install puts it (and the ECS health check runs it).
const IMAGE_FILES: [&str; 2] = ["etc/ssl/certs/ca-certificates.crt", "usr/local/bin/pyebpf"];

fn build_oci(binary: &Path, dist: &Path, meta: &Meta, scratch: &Path) -> Result<PathBuf> {
    let layout = scratch.join("oci");
    let bundle = scratch.join("oci-bundle");
    let image = format!("{}:{}", layout.display(), meta.version);
    umoci(&["init", "--layout"]).args([&layout]).run()?;
    umoci(&["new", "--image", &image]).run()?;
    umoci(&["unpack", "--image", &image])
        .args([&bundle])
        .run()?;
    let rootfs = bundle.join("rootfs");
    for (src, dst) in [
        (Path::new(CA_BUNDLE), IMAGE_FILES[0]),
        (binary, IMAGE_FILES[1]),
    ] {
        let dst = rootfs.join(dst);
        fs::create_dir_all(dst.parent().context("no parent")?)?;
        fs::copy(src, &dst).with_context(|| format!("cannot copy {}", src.display()))?;
    }
    // /tmp for libraries that want one; the containers run with a read-only root.
    fs::create_dir_all(rootfs.join("tmp"))?;
    umoci(&["repack", "--image", &image])
        .args([&bundle])
        .run()?;
    let created = "1970-01-01T00:00:00Z";
    umoci(&[
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--created",
        created,
        "--config.user",
        "0:0",
        "--config.entrypoint",
        "/usr/local/bin/pyebpf",
        "--config.cmd",
        "daemon",
        "--config.env",
        "PATH=/usr/local/bin",
        "--config.label",
        &format!("org.opencontainers.image.version={}", meta.version),
        "--config.label",
        &format!("org.opencontainers.image.ref.name={}", meta.image_ref()),
        "--config.label",
        "org.opencontainers.image.title=pyebpf",
    ])
    .run()?;
    umoci(&["gc", "--layout"]).args([&layout]).run()?;
    let tar = dist.join(format!("pyebpf-{}-oci.tar", meta.version));
    cmd("tar", &["--sort=name", "--owner=0", "--group=0", "-C"])
        .args([&layout])
        .args(["-cf"])
        .args([&tar, Path::new(".")])
        .run()?;
    fs::remove_dir_all(&layout).ok();
    fs::remove_dir_all(&bundle).ok();
    Ok(tar)
}

fn check_oci(tar: &Path, meta: &Meta, scratch: &Path) -> Result<()> {
    let layout = scratch.join("oci-check");
    let bundle = scratch.join("oci-check-bundle");
    fs::create_dir_all(&layout)?;
    cmd("tar", &["-xf"])
        .args([tar])
        .args([Path::new("-C"), &layout])
        .run()?;
    let image = format!("{}:{}", layout.display(), meta.version);
    umoci(&["unpack", "--image", &image])
        .args([&bundle])
        .run()?;
    let rootfs = bundle.join("rootfs");
    let mut files = Vec::new();
    list_files(&rootfs, &rootfs, &mut files)?;
    files.sort();
    ensure!(
        files == IMAGE_FILES,
        "the image holds {files:?}, expected {IMAGE_FILES:?}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(bundle.join("config.json")).context("no config.json in the bundle")?,
    )?;
    let args = &config["process"]["args"];
    ensure!(
        args == &serde_json::json!(["/usr/local/bin/pyebpf", "daemon"]),
        "the image runs {args}, not /usr/local/bin/pyebpf daemon"
    );
    // The ECS task definition's health check execs the binary by its path in the image.
    let ecs: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(root().join("deploy/ecs/task-definition.json"))
            .context("cannot read deploy/ecs/task-definition.json")?,
    )?;
    let health = &ecs["containerDefinitions"][0]["healthCheck"]["command"][1];
    ensure!(
        health == "/usr/local/bin/pyebpf",
        "the ECS health check runs {health}, which is not the image's binary"
    );
    let version = output(
        cmd("chroot", &[])
            .args([&rootfs])
            .args(["/usr/local/bin/pyebpf", "--version"])
            .0,
    )?;
    ensure!(
        version.contains(&meta.version),
        "--version in the image: {version:?}"
    );
    fs::remove_dir_all(&layout).ok();
    fs::remove_dir_all(&bundle).ok();
    println!(
        "dist: {}: files {files:?}, entrypoint {args}, --version in its root: ok",
        tar.display()
    );
    Ok(())
}

fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            list_files(base, &path, out)?;
        } else {
            out.push(path.strip_prefix(base)?.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn check_chart(binary: &Path, dist: &Path, meta: &Meta, scratch: &Path) -> Result<()> {
    let configs = scratch.join("helm-configs");
    fs::create_dir_all(&configs)?;
    cmd(
        "python3",
        &["tests/tools/helm_check.py", "--chart", CHART_DIR, "--image"],
    )
    .args([
        meta.image.as_str(),
        "--version",
        &meta.version,
        "--package-dir",
    ])
    .args([dist, Path::new("--configs-dir"), &configs])
    .run()?;
    let mut checked = 0;
    for e in fs::read_dir(&configs)? {
        let path = e?.path();
        output(Command::new(binary).args(["config", "check"]).arg(&path))
            .with_context(|| format!("the chart's configuration {} is refused", path.display()))?;
        checked += 1;
    }
    ensure!(checked > 0, "helm_check.py wrote no configuration to check");
    println!("dist: chart: {checked} rendered configurations pass `pyebpf config check`");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file that names the image names `[workspace.metadata.pyebpf] image` at the
    /// crate version, and no other image.
    #[test]
    fn image_name_is_consistent() {
        let meta = meta().unwrap();
        let image_ref = meta.image_ref();
        let read = |p: &str| fs::read_to_string(root().join(p)).unwrap();
        for file in [
            "deploy/kubernetes/daemonset.yaml",
            "deploy/ecs/task-definition.json",
            "README.md",
            "deploy/README.md",
        ] {
            let text = read(file);
            assert!(
                text.contains(&image_ref),
                "{file} does not name {image_ref}"
            );
            for (i, _) in text.match_indices("ghcr.io/") {
                assert!(
                    text[i..].starts_with(&image_ref),
                    "{file} names another image: {}",
                    text[i..].lines().next().unwrap()
                );
            }
        }
        // Every image field of the manifests, whatever registry it names.
        let yaml_images: Vec<_> = read("deploy/kubernetes/daemonset.yaml")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image:").map(str::trim))
            .map(str::to_string)
            .collect();
        assert_eq!(yaml_images, [image_ref.clone(), image_ref.clone()]);
        let ecs: serde_json::Value =
            serde_json::from_str(&read("deploy/ecs/task-definition.json")).unwrap();
        let ecs_images: Vec<_> = ecs["containerDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["image"].as_str().unwrap())
            .collect();
        assert_eq!(ecs_images, [image_ref.as_str()]);
        let values = read("deploy/helm/pyebpf/values.yaml");
        assert!(
            values.contains(&format!("repository: {}\n", meta.image)),
            "values.yaml's image.repository is not {}",
            meta.image
        );
        let chart = read("deploy/helm/pyebpf/Chart.yaml");
        for key in ["version", "appVersion"] {
            assert!(
                chart.contains(&format!("\n{key}: \"{}\"\n", meta.version)),
                "Chart.yaml's {key} is not {}",
                meta.version
            );
        }
        let deb = read("profiler-daemon/Cargo.toml");
        assert!(deb.contains("[package.metadata.deb]"));
    }

    #[test]
    fn linkage_of_this_test_binary() {
        // The test binary itself is dynamic (gnu target): it has an interpreter and libc.
        let exe = std::env::current_exe().unwrap();
        let link = linkage(&fs::read(exe).unwrap()).unwrap();
        assert!(link.interp.is_some_and(|i| i.contains("ld-linux")));
        assert!(link.needed > 0);
        assert!(linkage(b"not an elf").is_err());
    }
}
