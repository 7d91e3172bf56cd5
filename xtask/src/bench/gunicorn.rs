//! A gunicorn server (gthread workers) for the soaks of `bench --scale` and
//! `cargo xtask soak`: started, waited for, and its workers found.

use super::daemon::http_get;
use super::sys::{tied, Output, Proc};
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// How to start one.
pub struct GunicornConfig<'a> {
    pub python: &'a Path,
    /// The app's directory (`--chdir`).
    pub dir: &'a Path,
    /// `module:callable`.
    pub app: &'a str,
    /// A path answering 200 once a worker serves.
    pub ready_path: &'a str,
    pub workers: usize,
    pub threads: usize,
    /// Put in the command line (`--name`) for the daemon's include rule.
    pub tag: &'a str,
    /// `--error-logfile` at level info (worker boots and deaths); `None`:
    /// warnings only, to the harness's pipe.
    pub error_log: Option<&'a Path>,
}

/// A gunicorn master: SIGTERM (graceful) on drop, then its workers are killed.
pub struct Gunicorn {
    proc: Proc,
    pub addr: SocketAddr,
}

/// Pids whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(ppid)
        })
        .collect()
}

pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Gunicorn {
    /// Starts it on a free loopback port and waits (30 s at most) until it
    /// answers `ready_path` with 200.
    pub fn start(c: &GunicornConfig) -> Result<Gunicorn> {
        let port = free_port()?;
        let mut cmd = Command::new(c.python);
        cmd.args(["-m", "gunicorn", "-k", "gthread", "-w"])
            .arg(c.workers.to_string())
            .arg("--threads")
            .arg(c.threads.to_string())
            .arg("-b")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(c.dir)
            .arg("--name")
            .arg(c.tag);
        match c.error_log {
            Some(log) => cmd
                .args(["--log-level", "info", "--error-logfile"])
                .arg(log),
            None => cmd.args(["--log-level", "warning"]),
        };
        cmd.arg(c.app).current_dir(c.dir);
        let proc = Proc::spawn(tied(cmd), "gunicorn", Output::Stderr, false)?;
        let g = Gunicorn {
            proc,
            addr: ([127, 0, 0, 1], port).into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(g.addr, c.ready_path) {
                return Ok(g);
            }
            if Instant::now() > deadline || g.proc.exited() {
                bail!(
                    "gunicorn did not answer on {} (is it installed? `cargo xtask bootstrap`)",
                    g.addr
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// The current workers' pids, sorted.
    pub fn workers(&self) -> Vec<u32> {
        let mut w = children_of(self.proc.pid);
        w.sort_unstable();
        w
    }

    /// Whether the master has ended.
    pub fn exited(&self) -> bool {
        self.proc.exited()
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let workers = children_of(self.proc.pid);
        let _ = self.proc.stop(libc::SIGTERM, Duration::from_secs(10));
        for w in workers {
            // SAFETY: kill(2); a worker left behind by its master.
            unsafe { libc::kill(w as i32, libc::SIGKILL) };
        }
    }
}
