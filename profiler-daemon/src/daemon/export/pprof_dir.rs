//! `outputs.pprof_dir`: one gzipped pprof file per process and window, with
//! age and size retention.
//!
//! Files are named `<service>-<pid>-<window start, unix secs>.pb.gz`, the
//! service reduced to `[A-Za-z0-9._-]`. Each is written to a hidden temporary
//! file in the same directory, synced, then renamed into place, so readers
//! never see a partial profile. The process labels are stored as pprof
//! comments (`key=value`, shown by `go tool pprof -comments`).
//!
//! Retention only ever touches files whose names have exactly that shape (and
//! our own leftover temporary files): anything else in the directory is left
//! alone. A temporary file names the pid that writes it: one whose writer is
//! gone (a daemon killed mid-write) is removed when the directory is opened
//! and by every retention pass, others only once stale.
use crate::store::unix_secs;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use flate2::{write::GzEncoder, Compression};
use prost::Message;

use crate::daemon::WindowProfile;
use crate::profile::pprof;

/// Why an export could not be set up or done.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A filesystem operation on `path` failed; `message` names the path.
    #[error("{message}: {source}")]
    Io {
        message: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot work (bad URL, invalid name, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl ExportError {
    /// `what` with `{}` standing for the path.
    pub(super) fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        ExportError::Io {
            message: what.replacen("{}", &path.display().to_string(), 1),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Gzipped profile.proto of `w`, with its process labels as comments.
/// Shared by the file and Pyroscope exports.
pub fn encode_window(w: &WindowProfile) -> Vec<u8> {
    let mut msg = pprof::build_compact(&w.profile);
    for (k, v) in w.labels.pairs() {
        let i = msg.string_table.len() as i64;
        msg.string_table.push(format!("{k}={v}"));
        msg.comment.push(i);
    }
    let raw = msg.encode_to_vec();
    let mut gz = GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        Compression::default(),
    );
    // Writing to a Vec cannot fail.
    gz.write_all(&raw).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// Where and how much to keep. A zero `max_age` or `max_total_bytes`
/// disables that limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PprofDirConfig {
    pub path: PathBuf,
    /// Files whose modification time is older than this are deleted.
    pub max_age: Duration,
    /// The oldest files are deleted while ours add up to more than this.
    pub max_total_bytes: u64,
}

/// What one retention pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Profiles deleted for being older than `max_age`.
    pub deleted_age: u64,
    /// Profiles deleted, oldest first, to get under `max_total_bytes`.
    pub deleted_size: u64,
    /// Bytes freed by both.
    pub deleted_bytes: u64,
    /// Profiles left, and their total size.
    pub kept: u64,
    pub kept_bytes: u64,
    /// Leftover temporary files (from a crash mid-write) removed.
    pub deleted_temp: u64,
}

/// Temporary files older than this are leftovers of an interrupted write.
const STALE_TEMP: Duration = Duration::from_secs(600);
/// Longest service part of a file name (names stay well under 255 bytes).
const MAX_SERVICE_LEN: usize = 100;
const SUFFIX: &str = ".pb.gz";
const TEMP_MARK: &str = ".tmp.";
/// `PprofDir::new`'s writability probe, followed by the pid.
const PROBE_PREFIX: &str = ".pyebpf-write-test.";

/// A directory of pprof files with retention.
#[derive(Debug)]
pub struct PprofDir {
    cfg: PprofDirConfig,
    seq: AtomicU64,
}

impl PprofDir {
    /// Creates the directory if needed and checks a file can be created in it.
    pub fn new(cfg: PprofDirConfig) -> Result<Self, ExportError> {
        let dir = &cfg.path;
        fs::create_dir_all(dir)
            .map_err(|e| ExportError::io("cannot create pprof directory {}", dir, e))?;
        let meta = fs::metadata(dir)
            .map_err(|e| ExportError::io("cannot stat pprof directory {}", dir, e))?;
        if !meta.is_dir() {
            return Err(ExportError::io(
                "pprof directory {}",
                dir,
                std::io::Error::other("not a directory"),
            ));
        }
        let probe = dir.join(format!("{PROBE_PREFIX}{}", std::process::id()));
        fs::File::create(&probe)
            .map_err(|e| ExportError::io("pprof directory {} is not writable", dir, e))?;
        let _ = fs::remove_file(&probe);
        let d = PprofDir {
            cfg,
            seq: AtomicU64::new(0),
        };
        d.remove_leftovers();
        Ok(d)
    }

    /// Removes the temporary and probe files of writers that are gone, at
    /// start: a daemon killed mid-write (SIGKILL, OOM) leaves them, and
    /// nothing else would for [`STALE_TEMP`]. Failures are only logged.
    fn remove_leftovers(&self) {
        let dir = &self.cfg.path;
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        // Nothing is being written yet: our own pid's files are a
        // predecessor's that had the same pid.
        let gone = |pid: u32| pid == std::process::id() || !pid_alive(pid);
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let writer = temp_writer(name).or_else(|| probe_writer(name));
            if !writer.is_some_and(gone) || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("cannot delete {}: {e}", entry.path().display()),
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "pprof directory {}: removed temporary files of interrupted writes",
                dir.display()
            );
        }
    }

    pub fn config(&self) -> &PprofDirConfig {
        &self.cfg
    }

    /// Writes `w` atomically, then applies retention (never deleting the
    /// file just written; a retention failure is logged, not returned).
    /// Returns the path of the new file.
    pub fn write(&self, w: &WindowProfile) -> Result<PathBuf, ExportError> {
        let path = self.write_file(w)?;
        match self.retention(Some(&path)) {
            Ok(r) if r.deleted_age + r.deleted_size + r.deleted_temp > 0 => tracing::debug!(
                deleted_age = r.deleted_age,
                deleted_size = r.deleted_size,
                deleted_temp = r.deleted_temp,
                kept = r.kept,
                kept_bytes = r.kept_bytes,
                "pprof directory retention"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("pprof directory retention failed: {e}"),
        }
        Ok(path)
    }

    /// Writes `w` atomically (a temporary file, `fsync`, rename), without
    /// retention: a window's files are written, then retention runs once.
    pub fn write_file(&self, w: &WindowProfile) -> Result<PathBuf, ExportError> {
        let name = file_name(&w.labels.service, w.labels.pid, unix_secs(w.start));
        let path = self.cfg.path.join(&name);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .cfg
            .path
            .join(format!(".{name}{TEMP_MARK}{}-{seq}", std::process::id()));
        let bytes = encode_window(w);
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(ExportError::io("cannot write pprof file {}", &path, e));
        }
        Ok(path)
    }

    /// Deletes our files older than `max_age`, then the oldest until the rest
    /// total at most `max_total_bytes`. Files we did not name are never
    /// touched.
    pub fn enforce_retention(&self) -> Result<RetentionReport, ExportError> {
        self.retention(None)
    }

    fn retention(&self, keep: Option<&Path>) -> Result<RetentionReport, ExportError> {
        let dir = &self.cfg.path;
        let now = SystemTime::now();
        let mut report = RetentionReport::default();
        let mut files: Vec<(SystemTime, String, u64)> = Vec::new();
        let entries = fs::read_dir(dir)
            .map_err(|e| ExportError::io("cannot list pprof directory {}", dir, e))?;
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = is_our_file(name);
            let temp = !ours && is_our_temp(name);
            if !ours && !temp {
                continue;
            }
            // Not following symlinks: only regular files are ours.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.file_type().is_file() {
                continue;
            }
            let mtime = meta.modified().unwrap_or(now);
            let age = now.duration_since(mtime).unwrap_or_default();
            let path = entry.path();
            if temp {
                let writer_gone = temp_writer(name)
                    .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid));
                if (writer_gone || age > STALE_TEMP) && fs::remove_file(&path).is_ok() {
                    report.deleted_temp += 1;
                }
                continue;
            }
            if keep == Some(path.as_path()) {
                report.kept += 1;
                report.kept_bytes += meta.len();
                continue;
            }
            if !self.cfg.max_age.is_zero() && age > self.cfg.max_age {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        report.deleted_age += 1;
                        report.deleted_bytes += meta.len();
                    }
                    Err(e) => tracing::warn!("cannot delete {}: {e}", path.display()),
                }
                continue;
            }
            files.push((mtime, name.to_string(), meta.len()));
        }
        let mut total = report.kept_bytes + files.iter().map(|f| f.2).sum::<u64>();
        // Oldest first; the name breaks ties deterministically.
        files.sort();
        let mut files = files.into_iter();
        if self.cfg.max_total_bytes > 0 {
            for (_, name, len) in files.by_ref() {
                if total <= self.cfg.max_total_bytes {
                    report.kept += 1;
                    report.kept_bytes += len;
                    break;
                }
                let path = dir.join(&name);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        report.deleted_size += 1;
                        report.deleted_bytes += len;
                        total -= len;
                    }
                    Err(e) => {
                        tracing::warn!("cannot delete {}: {e}", path.display());
                        report.kept += 1;
                        report.kept_bytes += len;
                    }
                }
            }
        }
        for (_, _, len) in files {
            report.kept += 1;
            report.kept_bytes += len;
        }
        Ok(report)
    }
}

/// `service` reduced to `[A-Za-z0-9._-]` (others become `_`), not starting
/// with a dot, at most [`MAX_SERVICE_LEN`] bytes, never empty.
fn sanitize_service(service: &str) -> String {
    let mut s: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_SERVICE_LEN)
        .collect();
    if s.starts_with('.') {
        s.replace_range(..1, "_");
    }
    if s.is_empty() {
        s.push_str("unknown");
    }
    s
}

/// `<service>-<pid>-<start>.pb.gz`.
fn file_name(service: &str, pid: u32, start_secs: u64) -> String {
    format!("{}-{pid}-{start_secs}{SUFFIX}", sanitize_service(service))
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `name` has the exact shape [`file_name`] produces.
fn is_our_file(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(SUFFIX) else {
        return false;
    };
    let mut parts = stem.rsplitn(3, '-');
    let (Some(start), Some(pid), Some(service)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    all_digits(start)
        && all_digits(pid)
        && !service.is_empty()
        && !service.starts_with('.')
        && service.len() <= MAX_SERVICE_LEN
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` is one of our temporary files: `.<our file>.tmp.<pid>-<seq>`.
fn is_our_temp(name: &str) -> bool {
    temp_writer(name).is_some()
}

/// The pid that writes temporary file `name`, if it is one of ours.
fn temp_writer(name: &str) -> Option<u32> {
    let (file, tag) = name.strip_prefix('.')?.rsplit_once(TEMP_MARK)?;
    let (pid, seq) = tag.split_once('-')?;
    if !(is_our_file(file) && all_digits(pid) && all_digits(seq)) {
        return None;
    }
    pid.parse().ok()
}

/// The pid of a writability probe's name (`.pyebpf-write-test.<pid>`).
fn probe_writer(name: &str) -> Option<u32> {
    let pid = name.strip_prefix(PROBE_PREFIX)?;
    all_digits(pid).then(|| pid.parse().ok()).flatten()
}

/// Whether a process `pid` exists (in our pid namespace, which is the
/// host's: the daemon refuses to run in another). A reused pid looks alive:
/// its writer's files then wait for [`STALE_TEMP`].
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::labels::ProcessLabels;
    use crate::profile::folded::tests::sample_profile;
    use crate::profile::pprof::proto;
    use std::io::Read as _;
    use std::time::UNIX_EPOCH;

    fn window(service: &str, pid: u32, start: u64) -> WindowProfile {
        let start = UNIX_EPOCH + Duration::from_secs(start);
        WindowProfile {
            labels: ProcessLabels {
                pid,
                command: "python3".into(),
                service: service.into(),
                exe: "/usr/bin/python3.11".into(),
                cmdline: "python3 app.py".into(),
                container_id: Some("abc123".into()),
                ..Default::default()
            },
            profile: (&sample_profile()).into(),
            start,
            end: start + Duration::from_secs(60),
        }
    }

    fn cfg(path: &Path, max_age: Duration, max_total_bytes: u64) -> PprofDirConfig {
        PprofDirConfig {
            path: path.to_path_buf(),
            max_age,
            max_total_bytes,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn set_age(path: &Path, age: Duration) {
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    fn put(path: &Path, len: usize, age: Duration) {
        fs::write(path, vec![b'x'; len]).unwrap();
        set_age(path, age);
    }

    #[test]
    fn file_names() {
        assert_eq!(
            file_name("web-api", 42, 1_700_000_000),
            "web-api-42-1700000000.pb.gz"
        );
        assert_eq!(file_name("a b/c:d", 1, 2), "a_b_c_d-1-2.pb.gz");
        assert_eq!(file_name("сервис", 1, 2), "______-1-2.pb.gz");
        assert_eq!(file_name("", 1, 2), "unknown-1-2.pb.gz");
        assert_eq!(file_name("..", 1, 2), "_.-1-2.pb.gz");
        assert_eq!(file_name("../../etc/x", 1, 2), "_._.._etc_x-1-2.pb.gz");
        let long = "s".repeat(300);
        assert_eq!(
            file_name(&long, 1, 2).len(),
            MAX_SERVICE_LEN + "-1-2.pb.gz".len()
        );
        for s in ["web-api", "a b/c:d", "", "..", "x.y_z-1", &long] {
            assert!(is_our_file(&file_name(s, 7, 8)), "{s}");
        }
        for foreign in [
            "notes.txt",
            "web-42.pb.gz",
            "web-x-1.pb.gz",
            "web-1-x.pb.gz",
            "-1-2.pb.gz",
            ".hidden-1-2.pb.gz",
            "web-1-2.pb.gz.bak",
            "web-1-2.pb",
            "a b-1-2.pb.gz",
            "cpu.pprof",
        ] {
            assert!(!is_our_file(foreign), "{foreign}");
        }
        assert!(is_our_temp(".web-1-2.pb.gz.tmp.77-3"));
        assert!(!is_our_temp(".web-1-2.pb.gz.tmp.77"));
        assert!(!is_our_temp("web-1-2.pb.gz.tmp.77-3"));
        assert!(!is_our_temp(".other.tmp.77-3"));
    }

    #[test]
    fn writes_named_atomic_file_with_labels_as_comments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PprofDir::new(cfg(tmp.path(), Duration::from_secs(3600), 1 << 30)).unwrap();
        let w = window("web api", 42, 1_700_000_000);
        let path = dir.write(&w).unwrap();
        assert_eq!(path, tmp.path().join("web_api-42-1700000000.pb.gz"));
        // Only the final file: no temporary or probe file left behind.
        assert_eq!(names(tmp.path()), ["web_api-42-1700000000.pb.gz"]);

        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&fs::read(&path).unwrap()[..])
            .read_to_end(&mut raw)
            .unwrap();
        let m = proto::Profile::decode(&raw[..]).unwrap();
        let comments: Vec<&str> = m
            .comment
            .iter()
            .map(|&i| m.string_table[i as usize].as_str())
            .collect();
        assert_eq!(
            comments,
            [
                "pid=42",
                "command=python3",
                "service_name=web api",
                "container_id=abc123"
            ]
        );
        // The profile itself is the pprof module's encoding, plus comments.
        let mut plain = pprof::build_compact(&w.profile);
        assert_eq!(plain.sample, m.sample);
        plain.string_table = m.string_table.clone();
        plain.comment = m.comment.clone();
        assert_eq!(plain, m);
        let total: i64 = m.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total as u64, w.profile.total_samples());

        // Same process and window again: replaced, still one file.
        dir.write(&w).unwrap();
        dir.write(&window("web api", 43, 1_700_000_000)).unwrap();
        assert_eq!(
            names(tmp.path()),
            ["web_api-42-1700000000.pb.gz", "web_api-43-1700000000.pb.gz"]
        );
    }

    #[test]
    fn age_retention_spares_foreign_files() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        let hour = Duration::from_secs(3600);
        let dir = PprofDir::new(cfg(p, hour, 0)).unwrap();
        put(&p.join("old-1-100.pb.gz"), 10, 2 * hour);
        put(&p.join("recent-1-200.pb.gz"), 10, hour / 2);
        // Foreign files, old as well: never deleted.
        put(&p.join("notes.txt"), 10, 10 * hour);
        put(&p.join("old-1-100.pb.gz.bak"), 10, 10 * hour);
        put(&p.join("cpu.pprof"), 10, 10 * hour);
        fs::create_dir(p.join("sub-1-2.pb.gz")).unwrap();
        // A stale temporary file of ours, and a fresh one (a write in
        // progress, by a live process: this one).
        let me = std::process::id();
        put(&p.join(format!(".x-1-2.pb.gz.tmp.{me}-0")), 10, hour);
        let writing = format!(".x-1-3.pb.gz.tmp.{me}-1");
        put(&p.join(&writing), 10, Duration::ZERO);

        let r = dir.enforce_retention().unwrap();
        assert_eq!(r.deleted_age, 1);
        assert_eq!(r.deleted_size, 0);
        assert_eq!(r.deleted_temp, 1);
        assert_eq!(r.deleted_bytes, 10);
        assert_eq!((r.kept, r.kept_bytes), (1, 10));
        assert_eq!(
            names(p),
            [
                writing.as_str(),
                "cpu.pprof",
                "notes.txt",
                "old-1-100.pb.gz.bak",
                "recent-1-200.pb.gz",
                "sub-1-2.pb.gz",
            ]
        );
    }

    #[test]
    fn temp_and_probe_names_give_their_writer() {
        assert_eq!(temp_writer(".x-1-2.pb.gz.tmp.77-3"), Some(77));
        assert_eq!(temp_writer(".x-1-2.pb.gz.tmp.77"), None);
        assert_eq!(temp_writer("x-1-2.pb.gz.tmp.77-3"), None);
        assert_eq!(temp_writer(".other.tmp.77-3"), None);
        assert_eq!(temp_writer(".x-1-2.pb.gz.tmp.99999999999-3"), None);
        assert_eq!(probe_writer(".pyebpf-write-test.12"), Some(12));
        assert_eq!(probe_writer(".pyebpf-write-test.x"), None);
        assert_eq!(probe_writer(".pyebpf-write-test."), None);
    }

    /// A pid no process has: beyond the kernel's largest.
    const DEAD: u32 = 1 << 30;

    /// A file `name` of `len` bytes in `dir`, just written.
    fn fresh(dir: &Path, name: &str, len: usize) {
        put(&dir.join(name), len, Duration::ZERO);
    }

    #[test]
    fn leftovers_of_a_dead_writer_are_removed_when_the_directory_is_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        let me = std::process::id();
        // A SIGKILLed daemon's, fresh: removed at once.
        fresh(p, &format!(".x-1-2.pb.gz.tmp.{DEAD}-0"), 10);
        fresh(p, &format!(".pyebpf-write-test.{DEAD}"), 0);
        // A predecessor that had our pid: nothing of ours is written yet.
        fresh(p, &format!(".x-1-3.pb.gz.tmp.{me}-0"), 10);
        // A live writer's (pid 1 always exists): a write in progress.
        fresh(p, ".x-1-4.pb.gz.tmp.1-0", 10);
        // Not ours, whatever they look like.
        fresh(p, &format!(".notes.tmp.{DEAD}-0"), 10);
        fresh(p, "x-1-5.pb.gz", 10);
        PprofDir::new(cfg(p, Duration::ZERO, 0)).unwrap();
        assert_eq!(
            names(p),
            [
                format!(".notes.tmp.{DEAD}-0"),
                ".x-1-4.pb.gz.tmp.1-0".to_string(),
                "x-1-5.pb.gz".to_string(),
            ]
        );
    }

    #[test]
    fn retention_removes_a_dead_writers_temp_files_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        let dir = PprofDir::new(cfg(p, Duration::ZERO, 0)).unwrap();
        let me = std::process::id();
        fresh(p, &format!(".x-1-2.pb.gz.tmp.{DEAD}-0"), 10);
        fresh(p, &format!(".x-1-3.pb.gz.tmp.{me}-0"), 10);
        let r = dir.enforce_retention().unwrap();
        assert_eq!(r.deleted_temp, 1);
        assert_eq!(names(p), [format!(".x-1-3.pb.gz.tmp.{me}-0")]);
    }

    #[test]
    fn size_retention_deletes_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        let min = Duration::from_secs(60);
        let dir = PprofDir::new(cfg(p, Duration::ZERO, 250)).unwrap();
        put(&p.join("a-1-1.pb.gz"), 100, 5 * min);
        put(&p.join("b-1-2.pb.gz"), 100, 4 * min);
        put(&p.join("c-1-3.pb.gz"), 100, 3 * min);
        put(&p.join("d-1-4.pb.gz"), 100, 2 * min);
        // Big and ancient, but not ours: neither deleted nor counted.
        put(&p.join("big.bin"), 10_000, 100 * min);

        let r = dir.enforce_retention().unwrap();
        assert_eq!(
            (r.deleted_age, r.deleted_size, r.deleted_bytes),
            (0, 2, 200)
        );
        assert_eq!((r.kept, r.kept_bytes), (2, 200));
        assert_eq!(names(p), ["big.bin", "c-1-3.pb.gz", "d-1-4.pb.gz"]);

        // A write deletes older files but never the new one, even when it
        // alone exceeds the limit.
        let small = PprofDir::new(cfg(p, Duration::ZERO, 1)).unwrap();
        let path = small.write(&window("svc", 9, 1_700_000_000)).unwrap();
        assert!(fs::metadata(&path).unwrap().len() > 1);
        assert_eq!(names(p), ["big.bin", "svc-9-1700000000.pb.gz"]);
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        // Parent is a regular file: the directory cannot be created.
        let file = tmp.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let bad = file.join("profiles");
        let err = PprofDir::new(cfg(&bad, Duration::ZERO, 0)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&bad.display().to_string()), "{msg}");
        assert!(msg.contains("cannot create"), "{msg}");

        // The path is a file, not a directory.
        let err = PprofDir::new(cfg(&file, Duration::ZERO, 0)).unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );

        // Exists but no file can be created in it (even as root: procfs).
        let proc_dir = Path::new("/proc/self");
        if proc_dir.is_dir() {
            let err = PprofDir::new(cfg(proc_dir, Duration::ZERO, 0)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("not writable"), "{msg}");
            assert!(msg.contains("/proc/self"), "{msg}");
        }

        // A read-only directory (only checkable when not root).
        let ro = tmp.path().join("ro");
        fs::create_dir(&ro).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let writable_anyway = fs::File::create(ro.join("probe")).is_ok();
        if !writable_anyway {
            let err = PprofDir::new(cfg(&ro, Duration::ZERO, 0)).unwrap_err();
            assert!(err.to_string().contains("not writable"), "{err}");
        }
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    }
}
