//! Native stacks of real Python processes blocked in known C code, checked
//! against gdb (which pauses the target: fine for a process of our own).
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::stacks::{NativeLimits, NativeStack, NativeStacks};
use super::unwind::{StopReason, UserRegs, UserStack};
use crate::process::maps;
use crate::process::memory::{ProcessMemory, RemoteMemory};
use crate::process::python::test_support::{path_python, spawn_ready, ChildGuard};

pub const DEBIAN_PYTHON: &str = "/usr/bin/python3.11";

/// The interpreters to test: pyenv's shared-library build and Debian's
/// static one (stripped, no frame pointers).
pub fn pythons() -> Vec<&'static Path> {
    let debian = Path::new(DEBIAN_PYTHON);
    assert!(debian.exists(), "{DEBIAN_PYTHON} is needed for these tests");
    vec![path_python(), debian]
}

/// `sp` and `pc` of thread `tid` once it blocks in syscall `nr`, from
/// `/proc/PID/task/TID/syscall` (`nr args... sp pc`).
pub fn blocked_in(pid: u32, tid: u32, nr: u64) -> (u64, u64) {
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() == 9 && f[0] == nr.to_string() {
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            return (hex(f[7]), hex(f[8]));
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} not blocked in syscall {nr}: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Up to `len` bytes of the stack from `sp` (to the end of its mapping).
pub fn copy_stack(pid: u32, sp: u64, len: u64) -> Vec<u8> {
    let maps = maps::read(pid).unwrap();
    let m = maps.iter().find(|m| m.contains(sp)).expect("sp is mapped");
    let len = len.min(m.end - sp) as usize;
    ProcessMemory::new(pid).read_vec(sp, len).unwrap()
}

/// One physical frame as gdb sees it: its pc (a return address, except in
/// the leaf) and function, `None` for `??`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdbFrame {
    pub pc: u64,
    pub name: Option<String>,
}

/// gdb's backtrace of thread `tid`, inlined frames folded into the frame
/// they were inlined in (we unwind physical frames).
pub fn gdb_frames(pid: u32, tid: u32) -> Vec<GdbFrame> {
    let script = format!(
        "import gdb\n\
         for t in gdb.selected_inferior().threads():\n\
         \x20   if t.ptid[1] == {tid}:\n\
         \x20       t.switch()\n\
         f = gdb.newest_frame()\n\
         while f is not None:\n\
         \x20   if f.type() != gdb.INLINE_FRAME:\n\
         \x20       print('FRAME %#x %s' % (f.pc(), f.name() or '??'))\n\
         \x20   f = f.older()\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bt.py");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-p", &pid.to_string(), "-x"])
        .arg(&path)
        .output()
        .expect("gdb is needed for these tests");
    let text = String::from_utf8_lossy(&out.stdout);
    let frames: Vec<GdbFrame> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FRAME "))
        .map(|l| {
            let (pc, name) = l.split_once(' ').unwrap();
            GdbFrame {
                pc: u64::from_str_radix(pc.trim_start_matches("0x"), 16).unwrap(),
                name: (name != "??").then(|| name.to_owned()),
            }
        })
        .collect();
    assert!(
        frames.len() > 3,
        "gdb gave no backtrace: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    frames
}

/// A Python process running `script` (which prints "ready" and the thread
/// id to look at, then blocks it in syscall `nr`), its stack copied.
pub struct Blocked {
    pub child: ChildGuard,
    pub tid: u32,
    pub regs: UserRegs,
    pub stack: Vec<u8>,
}

pub fn start_blocked(python: &Path, script: &str, nr: u64) -> Blocked {
    let (child, words) = spawn_ready(Command::new(python).args(["-c", script]));
    let pid = child.pid();
    let tid = words.first().map_or(pid, |w| w.parse().unwrap());
    let (sp, ip) = blocked_in(pid, tid, nr);
    let stack = copy_stack(pid, sp, 1 << 20);
    Blocked {
        child,
        tid,
        regs: UserRegs { ip, sp, bp: None },
        stack,
    }
}

impl Blocked {
    pub fn native(&self, stacks: &mut NativeStacks) -> NativeStack {
        stacks
            .native_stack(
                self.child.pid(),
                &UserStack {
                    regs: self.regs,
                    stack: &self.stack,
                },
            )
            .unwrap()
    }
}

fn names(stack: &NativeStack) -> Vec<String> {
    stack.symbols.iter().map(|s| s.to_string()).collect()
}

#[test]
#[ignore]
fn explore() {
    let script = "import time\ndef handler():\n    print('ready', flush=True)\n    time.sleep(100)\nhandler()\n";
    for py in pythons() {
        let b = start_blocked(py, script, libc::SYS_clock_nanosleep as u64);
        let mut stacks = NativeStacks::new(NativeLimits::default());
        let s = b.native(&mut stacks);
        let gdb = gdb_frames(b.child.pid(), b.tid);
        eprintln!("{py:?} stop {:?} used {}", s.unwound.stop, s.unwound.stack_bytes_used);
        for (i, f) in s.unwound.frames.iter().enumerate() {
            eprintln!("  {:#x} {}  | gdb {:?}", f.address, names(&s)[i], gdb.get(i));
        }
        assert_eq!(s.unwound.stop, StopReason::Outermost);
    }
}
