//! A bounded cache of what was learnt from ELF files, keyed by file identity.
//!
//! Discovery looks at every process on the host, and most of them map the
//! same few files (the shell, `cc1`, libc, the dynamic loader). Parsing their
//! symbol tables again for each short-lived process is what made discovery
//! expensive on build hosts; with this cache a known file costs one `stat`.
//!
//! A file is identified by device, inode, size, modification and change
//! times, so a file replaced on disk (new inode) or rewritten in place (new
//! mtime and ctime) is a miss and is parsed again. Entries are evicted oldest
//! first beyond the capacity. The cache is shared between threads; its lock
//! is only held to look up or insert, never while a file is parsed.
use std::collections::{HashMap, VecDeque};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Default capacity: far more distinct executables and libraries than a
/// host runs, at about 100 bytes an entry.
pub const DEFAULT_CAPACITY: usize = 4096;

/// The identity of one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Inode change time, in nanoseconds since the epoch: unlike mtime it
    /// cannot be set back (e.g. by `cp -p` over an existing file).
    pub ctime_ns: i128,
}

impl FileId {
    /// The identity of the file `meta` was read from.
    pub fn of(meta: &Metadata) -> FileId {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Hits, misses and size of an [`ElfCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

struct Inner<V> {
    map: HashMap<FileId, V>,
    /// Insertion order, for eviction; holds each key of `map` once.
    order: VecDeque<FileId>,
}

/// A bounded map from [`FileId`] to a verdict `V` about that file.
pub struct ElfCache<V> {
    inner: Mutex<Inner<V>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone> ElfCache<V> {
    /// An empty cache holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> ElfCache<V> {
        let capacity = capacity.max(1);
        ElfCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<V>> {
        // Nothing panics while the lock is held; if something did, the map
        // is still consistent enough to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict recorded for this version of the file, counting a hit or
    /// a miss.
    pub fn get(&self, id: &FileId) -> Option<V> {
        let v = self.lock().map.get(id).cloned();
        let counter = if v.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        v
    }

    /// Record the verdict for `id`, evicting the oldest entries beyond the
    /// capacity. Two threads that parsed the same file both insert; the
    /// last one wins, which is the same answer.
    pub fn insert(&self, id: FileId, verdict: V) {
        let mut inner = self.lock();
        if inner.map.insert(id, verdict).is_some() {
            return;
        }
        inner.order.push_back(id);
        while inner.order.len() > self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.map.remove(&old);
                }
                None => break,
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lock().map.len(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Drop every entry (the counters are kept).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, FileTimes};
    use std::time::{Duration, SystemTime};

    fn id(ino: u64) -> FileId {
        FileId {
            dev: 1,
            ino,
            size: 100,
            mtime_ns: 5,
            ctime_ns: 5,
        }
    }

    #[test]
    fn hit_after_insert_miss_before() {
        let c: ElfCache<&str> = ElfCache::new(8);
        assert_eq!(c.get(&id(1)), None);
        c.insert(id(1), "python");
        assert_eq!(c.get(&id(1)), Some("python"));
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 1,
                misses: 1,
                entries: 1
            }
        );
    }

    /// "This file defines no Python symbols" is a verdict like any other.
    #[test]
    fn negative_verdicts_are_cached() {
        let c: ElfCache<Option<u64>> = ElfCache::new(8);
        c.insert(id(7), None);
        assert_eq!(c.get(&id(7)), Some(None));
        assert_eq!(c.get(&id(8)), None);
        assert_eq!(c.stats().hits, 1);
    }

    #[test]
    fn any_change_of_identity_is_a_miss() {
        let c: ElfCache<u32> = ElfCache::new(8);
        let base = id(1);
        c.insert(base, 1);
        for changed in [
            FileId { dev: 2, ..base },
            FileId { ino: 2, ..base },
            FileId { size: 101, ..base },
            FileId {
                mtime_ns: 6,
                ..base
            },
            FileId {
                ctime_ns: 6,
                ..base
            },
        ] {
            assert_eq!(c.get(&changed), None, "{changed:?}");
        }
        assert_eq!(c.get(&base), Some(1));
    }

    #[test]
    fn bound_is_respected_oldest_evicted() {
        let c: ElfCache<u64> = ElfCache::new(4);
        for i in 0..10 {
            c.insert(id(i), i);
            assert!(c.stats().entries <= 4);
        }
        assert_eq!(c.stats().entries, 4);
        for i in 0..6 {
            assert_eq!(c.get(&id(i)), None, "{i} should be evicted");
        }
        for i in 6..10 {
            assert_eq!(c.get(&id(i)), Some(i));
        }
        // Re-inserting a present key neither grows nor evicts.
        c.insert(id(9), 99);
        assert_eq!(c.stats().entries, 4);
        assert_eq!(c.get(&id(6)), Some(6));
        assert_eq!(c.get(&id(9)), Some(99));
        let tiny: ElfCache<u8> = ElfCache::new(0);
        assert_eq!(tiny.capacity(), 1);
        tiny.insert(id(1), 1);
        tiny.insert(id(2), 2);
        assert_eq!((tiny.get(&id(1)), tiny.get(&id(2))), (None, Some(2)));
        c.clear();
        assert_eq!(c.stats().entries, 0);
    }

    /// Real files: a new mtime, or a file replaced by rename (new inode),
    /// gives a new identity; an untouched file keeps its own.
    #[test]
    fn file_ids_follow_changes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lib.so");
        std::fs::write(&path, b"one").unwrap();
        let meta = || std::fs::metadata(&path).unwrap();
        let first = FileId::of(&meta());
        assert_eq!(FileId::of(&meta()), first);
        let c: ElfCache<&str> = ElfCache::new(8);
        c.insert(first, "first");
        assert_eq!(c.get(&FileId::of(&meta())), Some("first"));

        // Same bytes, same inode, another mtime.
        let f = File::options().write(true).open(&path).unwrap();
        f.set_times(FileTimes::new().set_modified(SystemTime::now() - Duration::from_secs(3600)))
            .unwrap();
        drop(f);
        let touched = FileId::of(&meta());
        assert_eq!(touched.ino, first.ino);
        assert_ne!(touched, first);
        assert_eq!(c.get(&touched), None);

        // Replaced the way package managers do: a new file renamed over it.
        let tmp = dir.path().join("lib.so.new");
        std::fs::write(&tmp, b"one").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let replaced = FileId::of(&meta());
        assert_ne!(replaced.ino, first.ino);
        assert_eq!(c.get(&replaced), None);
    }

    #[test]
    fn shared_between_threads() {
        let c: std::sync::Arc<ElfCache<u64>> = std::sync::Arc::new(ElfCache::new(64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..32 {
                        if c.get(&id(i)).is_none() {
                            c.insert(id(i), i * 10 + t);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.stats().entries, 32);
        for i in 0..32 {
            assert_eq!(c.get(&id(i)).map(|v| v / 10), Some(i));
        }
    }
}
