//! Parsing `/proc/PID/maps`.
//!
//! Each line is `start-end perms offset major:minor inode [path]`. The path is
//! everything after the inode and its padding, so it may contain spaces; the
//! kernel appends ` (deleted)` for unlinked files. Lines that do not parse are
//! skipped: the file is read from a live process and must never panic us.
use std::fmt;
use std::io;

/// Access bits of a mapping (`rwxp` / `rwxs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
}

impl Perms {
    /// Parse the four-character field; `None` unless it is exactly
    /// `[r-][w-][x-][ps]`.
    pub fn parse(s: &str) -> Option<Perms> {
        let b = s.as_bytes();
        if b.len() != 4 {
            return None;
        }
        let flag = |c: u8, set: u8| match c {
            c if c == set => Some(true),
            b'-' => Some(false),
            _ => None,
        };
        Some(Perms {
            read: flag(b[0], b'r')?,
            write: flag(b[1], b'w')?,
            exec: flag(b[2], b'x')?,
            shared: match b[3] {
                b's' => true,
                b'p' => false,
                _ => return None,
            },
        })
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    /// Offset of `start` in the mapped file.
    pub offset: u64,
    /// Device `(major, minor)` of the mapped file.
    pub dev: (u32, u32),
    /// Inode of the mapped file; 0 for anonymous mappings.
    pub inode: u64,
    /// The path as the kernel printed it, without a trailing ` (deleted)`;
    /// pseudo-paths like `[heap]` are kept; `None` for anonymous mappings.
    pub path: Option<String>,
    /// The kernel marked the file ` (deleted)`.
    pub deleted: bool,
}

impl MapEntry {
    /// A mapping of a real file (not anonymous, not `[heap]`, `[vdso]`...).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// The last component of the path, if any.
    pub fn file_name(&self) -> Option<&str> {
        let p = self.path.as_deref()?;
        Some(p.rsplit('/').next().unwrap_or(p))
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Parse the whole text of a maps file, skipping lines that do not parse.
pub fn parse(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// Parse one line; `None` if it is malformed.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let s = rest.trim_start_matches(' ');
        let end = s.find(' ').unwrap_or(s.len());
        let (f, r) = s.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let dev = field()?;
    let inode = field()?;

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start {
        return None;
    }
    let perms = Perms::parse(perms)?;
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let (major, minor) = dev.split_once(':')?;
    let dev = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode = inode.parse::<u64>().ok()?;

    // The path starts after the padding and runs to the end of the line.
    let raw = rest.trim_start_matches(' ').trim_end_matches(['\r', '\n']);
    let (path, deleted) = match raw {
        "" => (None, false),
        p => match p.strip_suffix(" (deleted)") {
            Some(p) if inode != 0 => (Some(unescape(p)), true),
            _ => (Some(unescape(p)), false),
        },
    };
    Some(MapEntry {
        start,
        end,
        perms,
        offset,
        dev,
        inode,
        path,
        deleted,
    })
}

/// The kernel escapes a newline in a path as `\012`; undo that one escape.
fn unescape(p: &str) -> String {
    p.replace("\\012", "\n")
}

/// Read and parse `/proc/PID/maps`.
pub fn read(pid: u32) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00420000 r--p 00000000 fe:00 1311                               /usr/bin/python3.11
00420000-006fc000 r-xp 00020000 fe:00 1311                               /usr/bin/python3.11
01c3a000-01d8c000 rw-p 00000000 00:00 0                                  [heap]
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f51a0000000-7f51a0010000 r--s 00001000 08:11 42                         /tmp/my file (1).so
7f51a0010000-7f51a0020000 r-xp 00000000 08:11 43                         /tmp/gone.so (deleted)
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_typical_lines() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 7);
        let e = &m[1];
        assert_eq!(e.start, 0x420000);
        assert_eq!(e.end, 0x6fc000);
        assert_eq!(e.perms.to_string(), "r-xp");
        assert!(e.perms.exec && e.perms.read && !e.perms.write && !e.perms.shared);
        assert_eq!(e.offset, 0x20000);
        assert_eq!(e.dev, (0xfe, 0));
        assert_eq!(e.inode, 1311);
        assert_eq!(e.path.as_deref(), Some("/usr/bin/python3.11"));
        assert_eq!(e.file_name(), Some("python3.11"));
        assert!(e.is_file() && !e.deleted);

        assert_eq!(m[2].path.as_deref(), Some("[heap]"));
        assert!(!m[2].is_file());
        assert_eq!(m[3].path, None);
        assert!(!m[3].is_file());
    }

    #[test]
    fn paths_with_spaces_and_deleted() {
        let m = parse(SAMPLE);
        assert_eq!(m[4].path.as_deref(), Some("/tmp/my file (1).so"));
        assert!(m[4].perms.shared);
        assert_eq!(m[4].dev, (8, 0x11));
        assert_eq!(m[5].path.as_deref(), Some("/tmp/gone.so"));
        assert!(m[5].deleted);
        assert_eq!(m[6].start, 0xffffffffff600000);
    }

    #[test]
    fn odd_lines_are_skipped() {
        let text = "\
garbage
00400000 r--p 00000000 fe:00 1 /x
00400000-00300000 r--p 00000000 fe:00 1 /end-before-start
00400000-00500000 rwzp 00000000 fe:00 1 /badperms
00400000-00500000 r--p zz fe:00 1 /badoff
00400000-00500000 r--p 00000000 fe00 1 /baddev
00400000-00500000 r--p 00000000 fe:00 -1 /badinode
00400000-00500000 r--p
\u{1F600}-\u{1F600} r--p 0 0:0 0

00400000-00500000 r--p 00000000 fe:00 7 /ok
";
        let m = parse(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].path.as_deref(), Some("/ok"));
        assert_eq!(m[0].inode, 7);
    }

    #[test]
    fn reads_own_maps() {
        let m = read(std::process::id()).unwrap();
        assert!(!m.is_empty());
        let here = reads_own_maps as fn() as usize as u64;
        let e = m.iter().find(|e| e.contains(here)).expect("code mapped");
        assert!(e.perms.exec && e.is_file());
    }

    #[test]
    fn missing_process_is_not_found() {
        let err = read(0x3fff_ffff).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
