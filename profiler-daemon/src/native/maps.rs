//! The executable mappings of a target, as unwinding and symbolisation see
//! them: which file (or vDSO, or anonymous memory) holds each code address.
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::process::elf::{map_files_path, root_path};
use crate::process::maps::{self, MapEntry};

/// A mapped file as the kernel identifies it in `/proc/PID/maps`: the same
/// key in every process and mount namespace that maps the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: (u32, u32),
    pub inode: u64,
}

/// What backs an executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A file; `path` as the target sees it.
    File {
        key: FileKey,
        path: Arc<str>,
        deleted: bool,
    },
    /// The kernel's `[vdso]`.
    Vdso,
    /// Memory with no file: JIT code, or a pseudo-mapping like `[vsyscall]`.
    Anonymous,
}

/// One executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// Offset of `start` in the file (0 for non-files).
    pub offset: u64,
    pub backing: Backing,
    /// What frames name as the module: the file name (`libc.so.6`), or the
    /// pseudo-path (`[vdso]`, `[anon]`).
    pub name: Arc<str>,
}

impl ExecMapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Offset of `addr` (inside this mapping) in the mapped file, or in the
    /// mapping for anonymous memory.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.start).wrapping_add(self.offset)
    }

    /// A path to this mapping's file from our mount namespace, checked to
    /// be the mapped file (same inode): `/proc/PID/map_files/START-END`
    /// (the mapped file itself, even deleted; needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE), else `/proc/PID/root/PATH` (a container's
    /// file), else PATH (the kernel prints paths relative to the reader's
    /// root where it can: a chroot's files).
    pub fn resolve_path(&self, pid: u32) -> Option<PathBuf> {
        let Backing::File { key, path, deleted } = &self.backing else {
            return None;
        };
        let mut candidates = vec![map_files_path(pid, self.start, self.end)];
        if !deleted {
            candidates.push(root_path(pid, path));
            candidates.push(PathBuf::from(&**path));
        }
        candidates
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == key.inode))
    }

    fn from_entry(e: &MapEntry) -> Option<ExecMapping> {
        if !e.perms.exec {
            return None;
        }
        let (backing, name): (Backing, Arc<str>) = match e.path.as_deref() {
            Some("[vdso]") => (Backing::Vdso, Arc::from("[vdso]")),
            Some(p) if e.is_file() => (
                Backing::File {
                    key: FileKey {
                        dev: e.dev,
                        inode: e.inode,
                    },
                    path: Arc::from(p),
                    deleted: e.deleted,
                },
                Arc::from(e.file_name().unwrap_or(p)),
            ),
            Some(p) => (Backing::Anonymous, Arc::from(p)),
            None => (Backing::Anonymous, Arc::from("[anon]")),
        };
        Some(ExecMapping {
            start: e.start,
            end: e.end,
            offset: if matches!(backing, Backing::File { .. }) {
                e.offset
            } else {
                0
            },
            backing,
            name,
        })
    }
}

impl fmt::Display for ExecMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:#x}-{:#x}", self.name, self.start, self.end)
    }
}

/// A snapshot of a process's executable mappings, sorted by address.
#[derive(Clone, Debug)]
pub struct ProcessMaps {
    pub pid: u32,
    mappings: Vec<ExecMapping>,
    /// When `/proc/PID/maps` was read, to bound re-reads.
    pub read_at: Instant,
}

impl ProcessMaps {
    /// Read `/proc/PID/maps`.
    pub fn read(pid: u32) -> io::Result<ProcessMaps> {
        Ok(ProcessMaps::from_entries(pid, &maps::read(pid)?))
    }

    pub fn from_entries(pid: u32, entries: &[MapEntry]) -> ProcessMaps {
        let mut mappings: Vec<ExecMapping> =
            entries.iter().filter_map(ExecMapping::from_entry).collect();
        mappings.sort_by_key(|m| m.start);
        ProcessMaps {
            pid,
            mappings,
            read_at: Instant::now(),
        }
    }

    /// The executable mapping holding `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&ExecMapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        m.contains(addr).then_some(m)
    }

    pub fn mappings(&self) -> &[ExecMapping] {
        &self.mappings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00420000 r--p 00000000 fe:00 1311     /usr/bin/python3.11
00420000-006fc000 r-xp 00020000 fe:00 1311     /usr/bin/python3.11
7f0000000000-7f0000021000 rwxp 00000000 00:00 0 
7f51a0010000-7f51a0020000 r-xp 00002000 08:11 43      /tmp/gone.so (deleted)
7ffd4a1f0000-7ffd4a1f2000 r-xp 00000000 00:00 0      [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
";

    #[test]
    fn only_executable_mappings_each_with_its_backing() {
        let m = ProcessMaps::from_entries(7, &maps::parse(SAMPLE));
        let names: Vec<&str> = m.mappings().iter().map(|m| &*m.name).collect();
        assert_eq!(
            names,
            ["python3.11", "[anon]", "gone.so", "[vdso]", "[vsyscall]"]
        );
        let py = m.find(0x420000).expect("first byte");
        assert_eq!(py.file_offset(0x420010), 0x20010);
        assert_eq!(
            py.backing,
            Backing::File {
                key: FileKey {
                    dev: (0xfe, 0),
                    inode: 1311
                },
                path: Arc::from("/usr/bin/python3.11"),
                deleted: false
            }
        );
        let gone = m.find(0x7f51a001ffff).expect("last byte");
        assert!(matches!(gone.backing, Backing::File { deleted: true, .. }));
        assert_eq!(
            m.find(0x7ffd4a1f0000).map(|m| &m.backing),
            Some(&Backing::Vdso)
        );
        assert_eq!(m.find(0x7f0000000000).map(|m| m.offset), Some(0));
        assert_eq!(m.find(0x7ffd4a1f0000).and_then(|m| m.resolve_path(7)), None);
        // Not executable, or between mappings, or past the end.
        for addr in [0x400000, 0x6fc000, 0x7f51a0020000, u64::MAX, 0] {
            assert!(m.find(addr).is_none(), "{addr:#x}");
        }
    }

    /// Our own executable resolves to a path holding the mapped file; a
    /// mapping whose inode is not that file's resolves to nothing.
    #[test]
    fn paths_resolve_to_the_mapped_file_only() {
        let pid = std::process::id();
        let m = ProcessMaps::read(pid).unwrap();
        let here = paths_resolve_to_the_mapped_file_only as fn() as usize as u64;
        let exe = m.find(here).expect("our code is mapped");
        let path = exe.resolve_path(pid).expect("resolves");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(format!("/proc/{pid}/exe")).unwrap()
        );
        let mut other = exe.clone();
        if let Backing::File { key, .. } = &mut other.backing {
            key.inode ^= 1;
        }
        assert_eq!(other.resolve_path(pid), None);
    }
}
