//! Whether a freshly exec'd program can become a Python interpreter.
//!
//! Right after `exec` only the executable and the dynamic loader are
//! mapped: a CPython linked against `libpython` is not recognisable until
//! the loader maps it, so a "not Python" answer then may be premature. This
//! tells, from the executable alone, whether waiting can change that answer:
//! an executable named like an interpreter, one that defines `_PyRuntime`
//! itself, or one that needs a `libpython*` shared library. Any other
//! program is final "not Python" at once.
//!
//! Verdicts are cached per executable version (device, inode, size, mtime
//! and ctime: [`FileId`]), so on a busy host the execs of the same few
//! programs cost one `stat` each.
use std::path::Path;

use super::elf::{self, ElfFile};
use super::elf_cache::{ElfCache, FileId};
use super::python::RUNTIME_SECTION;

/// Executables remembered; each entry is a few dozen bytes.
const CAPACITY: usize = 4096;

/// Cached plausibility verdicts on executables.
pub struct ExeFilter {
    cache: ElfCache<bool>,
}

impl Default for ExeFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl ExeFilter {
    pub fn new() -> ExeFilter {
        ExeFilter {
            cache: ElfCache::new(CAPACITY),
        }
    }

    /// The cached verdict on `pid`'s executable, if this version of it was
    /// judged before: costs one `stat`. `None` if not known (or the process
    /// is gone).
    pub fn cached(&self, pid: u32) -> Option<bool> {
        let meta = std::fs::metadata(elf::exe_path(pid)).ok()?;
        self.cache.get(&FileId::of(&meta))
    }

    /// Whether `pid`'s executable can be (or load) a CPython interpreter;
    /// reads its ELF headers once per executable version. When it cannot
    /// be told (unreadable, gone), `true`: the inspection decides.
    pub fn plausible(&self, pid: u32) -> bool {
        let exe = elf::exe_path(pid);
        let Ok((file, meta)) = ElfFile::open_with_metadata(&exe) else {
            return true;
        };
        let id = FileId::of(&meta);
        if let Some(v) = self.cache.get(&id) {
            return v;
        }
        let named = std::fs::read_link(&exe)
            .ok()
            .is_some_and(|p| python_named(&p));
        let verdict = named || links_python(&file);
        self.cache.insert(id, verdict);
        verdict
    }

    /// Cache statistics (hits: execs judged without reading the file).
    pub fn stats(&self) -> super::elf_cache::CacheStats {
        self.cache.stats()
    }
}

/// `python3.12`, `libpython...`, `uwsgi-python3`: any file name with
/// "python" in it, as the inspection's own ordering uses.
fn python_named(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().contains("python"))
}

/// Defines `_PyRuntime` (a static build, whatever its name) or needs a
/// `libpython` (an embedding program). Unreadable tables count as "may".
fn links_python(file: &ElfFile) -> bool {
    if !matches!(file.symbol("_PyRuntime"), Ok(None)) {
        return true;
    }
    if !matches!(file.section_address(RUNTIME_SECTION), Ok(None)) {
        return true;
    }
    match file.needed() {
        Ok(libs) => libs
            .iter()
            .any(|l| l.to_ascii_lowercase().contains("python")),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::python::test_support::{path_python, spawn_ready, ChildGuard};
    use std::process::Command;

    #[test]
    fn plain_programs_are_not_plausible_and_cached() {
        let f = ExeFilter::new();
        let child = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.pid();
        assert_eq!(f.cached(pid), None);
        assert!(!f.plausible(pid), "sleep cannot become Python");
        assert_eq!(f.cached(pid), Some(false));
        // Another process of the same executable: known without a read.
        let other = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
        assert_eq!(f.cached(other.pid()), Some(false));
        assert!(f.stats().hits >= 2);
    }

    #[test]
    fn interpreters_are_plausible() {
        let f = ExeFilter::new();
        let (child, _) = spawn_ready(Command::new(path_python()).args([
            "-c",
            "print('ready', flush=True); import time; time.sleep(30)",
        ]));
        assert!(f.plausible(child.pid()));
        assert_eq!(f.cached(child.pid()), Some(true));
    }

    #[test]
    fn gone_processes_are_left_to_the_inspection() {
        let f = ExeFilter::new();
        assert!(f.plausible(0x3fff_fff0));
        assert_eq!(f.cached(0x3fff_fff0), None);
    }

    #[test]
    fn needed_libraries_are_read() {
        let sh = ElfFile::open(Path::new("/bin/sh")).unwrap();
        let libs = sh.needed().unwrap();
        assert!(libs.iter().any(|l| l.starts_with("libc.")), "{libs:?}");
        assert!(!links_python(&sh));
    }
}
