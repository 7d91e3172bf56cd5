//! `pprof_dir`'s writes on a thread of their own: encoding, gzip and an
//! `fsync` per file take time the ingest thread must spend draining the
//! ring buffer. Closed windows wait in a short queue; a window that finds it
//! full (the disk has fallen two windows behind) is dropped and counted.
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use super::pprof_dir::PprofDir;
use crate::daemon::WindowProfile;

/// Windows waiting to be written, beyond the one being written.
const QUEUE_WINDOWS: usize = 2;

/// `pyebpf_export_total{target="pprof_dir"}`, by result.
#[derive(Clone)]
pub struct WriteCounters {
    pub ok: IntCounter,
    pub error: IntCounter,
    pub dropped: IntCounter,
}

/// The writer thread and its queue.
pub struct Writer {
    tx: SyncSender<Vec<WindowProfile>>,
    thread: JoinHandle<()>,
    counters: WriteCounters,
}

impl Writer {
    pub fn spawn(dir: PprofDir, counters: WriteCounters) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_WINDOWS);
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("pyebpf-pprof".into())
            .spawn(move || write_all(&dir, rx, &c))?;
        Ok(Writer {
            tx,
            thread,
            counters,
        })
    }

    /// Queues one closed window's profiles; never blocks.
    pub fn write_window(&self, window: Vec<WindowProfile>) {
        if window.is_empty() {
            return;
        }
        match self.tx.try_send(window) {
            Ok(()) => {}
            Err(TrySendError::Full(w)) => {
                self.counters.dropped.inc_by(w.len() as u64);
                tracing::warn!(
                    profiles = w.len(),
                    "pprof_dir: writes are {QUEUE_WINDOWS} windows behind, dropped this window"
                );
            }
            Err(TrySendError::Disconnected(w)) => {
                self.counters.error.inc_by(w.len() as u64);
                tracing::error!(profiles = w.len(), "pprof_dir: the writer thread is gone");
            }
        }
    }

    /// Writes what is queued, waiting at most `deadline`; `false` if the
    /// thread was still writing then (it goes on while the process lives).
    pub async fn shutdown(self, deadline: Duration) -> bool {
        drop(self.tx);
        let until = Instant::now() + deadline;
        while !self.thread.is_finished() {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.thread.join().is_err() {
            tracing::error!("pprof_dir: the writer thread panicked");
        }
        true
    }
}

fn write_all(dir: &PprofDir, rx: Receiver<Vec<WindowProfile>>, c: &WriteCounters) {
    for window in rx {
        for w in &window {
            match dir.write_file(w) {
                Ok(_) => c.ok.inc(),
                Err(e) => {
                    tracing::warn!("pprof_dir: {e}");
                    c.error.inc();
                }
            }
        }
        drop(window);
        if let Err(e) = dir.enforce_retention() {
            tracing::warn!("pprof_dir retention: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::export::pprof_dir::PprofDirConfig;
    use crate::model::labels::ProcessLabels;
    use crate::profile::folded::tests::sample_profile;
    use std::time::UNIX_EPOCH;

    fn counters() -> WriteCounters {
        let c = || IntCounter::new("c", "c").unwrap();
        WriteCounters {
            ok: c(),
            error: c(),
            dropped: c(),
        }
    }

    /// A writer into a fresh directory (no retention limits).
    fn writer() -> (tempfile::TempDir, Writer, WriteCounters) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PprofDir::new(PprofDirConfig {
            path: tmp.path().to_path_buf(),
            max_age: Duration::ZERO,
            max_total_bytes: 0,
        })
        .unwrap();
        let c = counters();
        let w = Writer::spawn(dir, c.clone()).unwrap();
        (tmp, w, c)
    }

    fn window(pids: std::ops::Range<u32>, start: u64) -> Vec<WindowProfile> {
        let start = UNIX_EPOCH + Duration::from_secs(start);
        pids.map(|pid| WindowProfile {
            labels: ProcessLabels::python3(pid, "web"),
            profile: (&sample_profile()).into(),
            start,
            end: start + Duration::from_secs(60),
        })
        .collect()
    }

    fn files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".pb.gz")
            })
            .count()
    }

    #[tokio::test]
    async fn writes_every_queued_window_before_shutdown_returns() {
        let (tmp, w, c) = writer();
        w.write_window(window(1..4, 1_700_000_000));
        w.write_window(window(1..3, 1_700_000_060));
        assert!(w.shutdown(Duration::from_secs(30)).await);
        assert_eq!(c.ok.get() + c.dropped.get(), 5);
        assert_eq!(files(tmp.path()) as u64, c.ok.get());
        assert_eq!(c.error.get(), 0);
    }

    #[tokio::test]
    async fn a_window_that_finds_the_queue_full_is_dropped_and_counted() {
        let (tmp, w, c) = writer();
        // Far more windows than the queue holds, faster than files are
        // written: some are dropped, every one is accounted for.
        for i in 0..50u64 {
            w.write_window(window(1..20, 1_700_000_000 + 60 * i));
        }
        assert!(w.shutdown(Duration::from_secs(60)).await);
        assert!(c.dropped.get() > 0);
        assert_eq!(c.ok.get() + c.dropped.get(), 50 * 19);
        assert_eq!(files(tmp.path()) as u64, c.ok.get());
    }
}
