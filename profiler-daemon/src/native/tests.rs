//! Native stacks of real Python processes blocked in known C code, checked
//! against gdb (which pauses the target: fine for a process of our own).
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::merge::{merge, Marker, Merged, PythonFrameKind, Side};
use super::stacks::{NativeLimits, NativeStack, NativeStacks};
use super::unwind::{StopReason, UnwindLimits, UserRegs, UserStack};
use super::user::{Symbol, Unsymbolised};
use crate::process::maps;
use crate::process::memory::{ProcessMemory, RemoteMemory};
use crate::process::python::test_support::{spawn_ready, ChildGuard};
use crate::python::layout::Minor;
use crate::python::test_python::{self, TestPython};
use crate::python::unicode::read_str;

/// The host's 3.11 builds: pyenv's shared-library one and Debian's static
/// one (stripped, no frame pointers).
fn host_pythons() -> Vec<TestPython> {
    let all = test_python::all();
    let host: Vec<TestPython> = all.into_iter().filter(|p| p.root.is_none()).collect();
    assert_eq!(
        host.len(),
        2,
        "pyenv's python3 and /usr/bin/python3.11 are needed"
    );
    host
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
/// (gdb's tail-call frames, made up from DWARF call-site data, are not
/// frames on the stack either.) Libraries are read through
/// `/proc/PID/root`, so targets in a chroot work too.
/// Also the leaf's registers (rip, rsp, rbp) as gdb reads them.
pub fn gdb_frames(pid: u32, tid: u32) -> ([u64; 3], Vec<GdbFrame>) {
    let script = format!(
        "import gdb\n\
         for t in gdb.selected_inferior().threads():\n\
         \x20   if t.ptid[1] == {tid}:\n\
         \x20       t.switch()\n\
         f = gdb.newest_frame()\n\
         r = [int(f.read_register(n)) & (2**64 - 1) for n in ('rip', 'rsp', 'rbp')]\n\
         print('REGS %#x %#x %#x' % tuple(r))\n\
         while f is not None:\n\
         \x20   if f.type() not in (gdb.INLINE_FRAME, gdb.TAILCALL_FRAME):\n\
         \x20       print('FRAME %#x %s' % (f.pc(), f.name() or '??'))\n\
         \x20   f = f.older()\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bt.py");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex"])
        .arg(format!("set sysroot /proc/{pid}/root"))
        .args(["-p", &pid.to_string(), "-x"])
        .arg(&path)
        .output()
        .expect("gdb is needed for these tests");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let regs: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("REGS "))
        .unwrap_or_else(|| panic!("gdb gave no registers: {text}"))
        .split(' ')
        .map(hex)
        .collect();
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
    (regs.try_into().unwrap(), frames)
}

/// A Python process running `script`, which prints "ready", the native id
/// of the thread to look at and its `PyThreadState` address, then blocks
/// that thread in syscall `nr`; its stack copied (up to 1 MiB).
pub struct Blocked {
    pub child: ChildGuard,
    pub tid: u32,
    pub tstate: u64,
    pub regs: UserRegs,
    pub stack: Vec<u8>,
}

pub fn start_blocked(python: &TestPython, script: &str, nr: i64) -> Blocked {
    let (child, words) = spawn_ready(python.command().args(["-c", script]));
    let pid = child.pid();
    let word = |i: usize| -> u64 { words[i].parse().unwrap() };
    let (tid, tstate) = (word(0) as u32, word(1));
    let (sp, ip) = blocked_in(pid, tid, nr as u64);
    let stack = copy_stack(pid, sp, 1 << 20);
    Blocked {
        child,
        tid,
        tstate,
        regs: UserRegs { ip, sp, bp: None },
        stack,
    }
}

impl Blocked {
    pub fn user_stack(&self) -> UserStack<'_> {
        UserStack {
            regs: self.regs,
            stack: &self.stack,
        }
    }

    pub fn native(&self, stacks: &mut NativeStacks) -> NativeStack {
        stacks
            .native_stack(self.child.pid(), &self.user_stack())
            .unwrap()
    }
}

/// Prints what [`start_blocked`] reads: ready, thread id, thread state.
const READY: &str = r#"
import ctypes, threading
ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
def ready():
    print("ready", threading.get_native_id(), ctypes.pythonapi.PyThreadState_Get(), flush=True)
"#;

fn script(body: &str) -> String {
    format!("{READY}{body}")
}

const SLEEP: &str = "import time\ndef handler():\n    ready()\n    time.sleep(100)\nhandler()\n";
const SELECT: &str = "import os, select\nr, w = os.pipe()\nready()\nselect.select([r], [], [])\n";
const RECV: &str = "import socket\na, b = socket.socketpair()\nready()\na.recv(10)\n";
/// A thread blocked in a Python callback called from C (libc's qsort,
/// through libffi): three eval-loop activations on a thread's stack.
const CTYPES: &str = r#"
import time
libc = ctypes.CDLL(None)
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
def compare(a, b):
    ready()
    time.sleep(100)
    return 0
def worker():
    arr = (ctypes.c_int * 2)(1, 2)
    libc.qsort(arr, 2, ctypes.sizeof(ctypes.c_int), CMP(compare))
t = threading.Thread(target=worker, daemon=True)
t.start()
t.join()
"#;

/// Unwinds and symbolises the blocked thread, then checks every frame
/// against gdb: the same addresses, the same functions (an unsymbolised
/// frame where gdb says `??`), the stack complete. Returns the stack and
/// its function names (`None`: unsymbolised) for further checks.
fn check_against_gdb(
    python: &TestPython,
    body: &str,
    nr: i64,
) -> (Blocked, NativeStack, Vec<Option<String>>) {
    let mut b = start_blocked(python, &script(body), nr);
    let mut stacks = NativeStacks::new(NativeLimits::default());
    // What /proc/PID/syscall gives: ip and sp, rbp unknown.
    let without_bp = b.native(&mut stacks);
    let ([ip, sp, bp], gdb) = gdb_frames(b.child.pid(), b.tid);
    let label = &python.label;
    assert_eq!((ip, sp), (b.regs.ip, b.regs.sp), "{label}: registers");
    // What the sampler gives: rbp too.
    b.regs.bp = Some(bp);
    let s = b.native(&mut stacks);
    let ours: Vec<GdbFrame> = s
        .unwound
        .frames
        .iter()
        .zip(&s.symbols)
        .map(|(f, sym)| GdbFrame {
            pc: f.address,
            name: sym.function().map(str::to_owned),
        })
        .collect();
    assert_eq!(
        ours, gdb,
        "{label}: frames differ from gdb's; ours ended: {}",
        s.unwound.stop
    );
    assert_eq!(s.unwound.stop, StopReason::Outermost, "{label}");
    for sym in &s.symbols {
        if sym.function().is_none() {
            assert!(
                matches!(sym.symbol, Symbol::Unsymbolised(Unsymbolised::NoSymbol(_))),
                "{label}: {sym:?}"
            );
        }
    }
    // Without rbp: the same stack, or the part of it before a function
    // whose CFA is computed from rbp, and a stop that says so.
    let n = without_bp.unwound.frames.len();
    assert_eq!(without_bp.unwound.frames, s.unwound.frames[..n], "{label}");
    if n < s.unwound.frames.len() {
        assert!(
            matches!(
                without_bp.unwound.stop,
                StopReason::FramePointerUnknown { .. }
            ),
            "{label}: {}",
            without_bp.unwound.stop
        );
    }
    let names = ours.into_iter().map(|f| f.name).collect();
    (b, s, names)
}

/// `expected` appear in `names` in this order (other frames between).
fn assert_chain(label: &str, names: &[Option<String>], expected: &[&str]) {
    let mut it = names.iter().flatten();
    for e in expected {
        assert!(
            it.any(|n| n == e),
            "{label}: {e} missing or out of order in {names:?}"
        );
    }
}

fn module_of<'a>(s: &'a NativeStack, function: &str) -> &'a str {
    let sym = s
        .symbols
        .iter()
        .find(|sym| sym.function() == Some(function))
        .unwrap_or_else(|| panic!("{function} not in the stack"));
    &sym.module
}

/// Whether the libc that `pid` maps has its debug file where blazesym and
/// gdb look (`/usr/lib/debug/.build-id/`, from libc6-dbg).
fn libc_has_debug_file(pid: u32) -> bool {
    let maps = maps::read(pid).unwrap();
    let libc = maps
        .iter()
        .find(|m| m.file_name() == Some("libc.so.6"))
        .expect("libc is mapped");
    let path = crate::process::elf::root_path(pid, libc.path.as_deref().unwrap());
    let elf = crate::process::elf::ElfFile::open(&path).unwrap();
    let id = elf.build_id_hex().expect("libc has a build-id");
    Path::new(&format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ))
    .exists()
}

/// `time.sleep` from a known function, on every build: 3.11 (pyenv's
/// shared, Debian's static) and the Debian roots' 3.13-3.15 (static and
/// shared, in a chroot: every file is found through /proc/PID/root).
#[test]
fn sleep_stack_matches_gdb_on_every_build() {
    for py in test_python::all_builds() {
        let (b, s, names) = check_against_gdb(&py, SLEEP, libc::SYS_clock_nanosleep);
        let label = &py.label;
        assert_chain(
            label,
            &names,
            &["PyEval_EvalCode", "Py_RunMain", "Py_BytesMain", "_start"],
        );
        // Debian sid's static builds (LTO, stripped) run the eval loop in
        // an unnamed local clone; the exported _PyEval_EvalFrameDefault is
        // a small wrapper that is not on the stack (gdb agrees above).
        let unnamed_eval = py.root.is_some() && py.label.contains("sid") && !py.shared;
        if !unnamed_eval {
            assert_chain(
                label,
                &names,
                &["_PyEval_EvalFrameDefault", "PyEval_EvalCode"],
            );
        }
        // The syscall's wrapper (glibc 2.41 enters the kernel one frame
        // deeper, in an unnamed cancellation helper).
        let sleep = names
            .iter()
            .position(|n| n.as_deref().is_some_and(|n| n.contains("clock_nanosleep")))
            .unwrap_or_else(|| panic!("{label}: no clock_nanosleep in {names:?}"));
        assert!(sleep <= 1, "{label}: {names:?}");
        assert_eq!(&*s.symbols[sleep].module, "libc.so.6", "{label}");
        if py.shared && py.root.is_none() {
            // time_sleep is static: pyenv's libpython names it (.symtab,
            // DWARF); Debian's are stripped like its static builds.
            assert_eq!(names[sleep + 1].as_deref(), Some("time_sleep"), "{label}");
            assert!(
                s.symbols[sleep + 1].module.starts_with("libpython3.1"),
                "{label}"
            );
        }
        if py.root.is_none() && libc_has_debug_file(b.child.pid()) {
            // With the host libc's debug file (libc6-dbg): DWARF names,
            // file and line.
            assert_chain(
                label,
                &names,
                &["__libc_start_call_main", "__libc_start_main_impl"],
            );
            assert!(
                matches!(&s.symbols[0].symbol, Symbol::Function { source: Some(src), .. }
                    if src.file.ends_with("clock_nanosleep.c") && src.line.is_some()),
                "{label}: {:?}",
                s.symbols[0]
            );
        }
    }
}

#[test]
fn select_and_recv_stacks_match_gdb() {
    for py in host_pythons() {
        let (b, s, names) = check_against_gdb(&py, SELECT, libc::SYS_pselect6);
        // libc's names: DWARF's with its debug file, else .dynsym's.
        let dbg = libc_has_debug_file(b.child.pid());
        let select = if dbg { "__GI___select" } else { "select" };
        assert_chain(
            &py.label,
            &names,
            &[select, "_PyEval_EvalFrameDefault", "_start"],
        );
        if py.shared {
            assert_eq!(names[1].as_deref(), Some("select_select_impl"));
            assert_eq!(
                module_of(&s, "select_select_impl"),
                "select.cpython-311-x86_64-linux-gnu.so"
            );
        }
        let (_b, s, names) = check_against_gdb(&py, RECV, libc::SYS_recvfrom);
        let recv = if dbg { "__libc_recv" } else { "recv" };
        assert_chain(
            &py.label,
            &names,
            &[recv, "_PyEval_EvalFrameDefault", "_start"],
        );
        if py.shared {
            assert_eq!(names[1].as_deref(), Some("sock_recv"));
            assert_eq!(
                module_of(&s, "sock_recv"),
                "_socket.cpython-311-x86_64-linux-gnu.so"
            );
        }
    }
}

/// A thread's stack through libffi's assembly (whose CFA is computed from
/// rbp) and libc's qsort, back into Python, down to `clone3`.
#[test]
fn ctypes_callback_thread_stack_matches_gdb() {
    for py in host_pythons() {
        let (b, _s, names) = check_against_gdb(&py, CTYPES, libc::SYS_clock_nanosleep);
        let chain: &[&str] = if libc_has_debug_file(b.child.pid()) {
            &[
                "_PyEval_EvalFrameDefault",
                "msort_with_tmp",
                "__GI___qsort_r",
                "ffi_call",
                "_PyEval_EvalFrameDefault",
                "_PyEval_EvalFrameDefault",
                "start_thread",
                "clone3",
            ]
        } else {
            &[
                "_PyEval_EvalFrameDefault",
                "qsort_r",
                "ffi_call",
                "_PyEval_EvalFrameDefault",
                "_PyEval_EvalFrameDefault",
            ]
        };
        assert_chain(&py.label, &names, chain);
    }
}

/// A Python frame read from the target's memory.
#[derive(Clone, Debug)]
struct PyFrame {
    name: String,
    entry: bool,
    anchor: Option<u64>,
}

impl PythonFrameKind for PyFrame {
    fn is_entry(&self) -> bool {
        self.entry
    }
    fn anchor(&self) -> Option<u64> {
        self.anchor
    }
}

/// The Python frames of thread state `tstate`, leaf first, each marked
/// entry as the BPF walker will (3.11's `is_entry`; 3.12+'s frame just
/// above a shim frame, owned by the C stack), entries anchored to their
/// activation's C stack (3.11: its `_PyCFrame`, from the `previous` chain
/// of `tstate->cframe`; 3.12+: the shim frame).
fn python_frames(pid: u32, tstate: u64, minor: Minor) -> Vec<PyFrame> {
    let l = minor.header_layout();
    let mem = ProcessMemory::new(pid);
    let byte = |addr: u64| -> u8 {
        let mut b = [0u8; 1];
        mem.read(addr, &mut b).unwrap();
        b[0]
    };
    let mut frame = mem.read_u64(tstate + l.threads.tstate_frame).unwrap();
    // 3.11 and 3.12: `tstate->cframe`, whose `previous` (+16) is the
    // calling activation's.
    let mut cframe = l.threads.cframe_frame.map(|_| frame);
    if let Some(cf) = l.threads.cframe_frame {
        frame = mem.read_u64(frame + cf).unwrap();
    }
    let mut out: Vec<PyFrame> = Vec::new();
    while frame != 0 {
        assert!(out.len() < 100, "frame chain too long");
        let owner = byte(frame + l.frame.owner);
        if l.frame.owner_boundary.is_some_and(|b| owner >= b) {
            if let Some(last) = out.last_mut() {
                last.entry = true;
                last.anchor = Some(frame);
            }
        } else {
            let code =
                mem.read_u64(frame + l.frame.code).unwrap() & !u64::from(l.frame.code_tag_bits);
            let qualname = mem.read_u64(code + l.code.qualname).unwrap();
            // 3.11: `_PyInterpreterFrame.is_entry`, the byte before `owner`.
            let entry = minor == Minor::V3_11 && byte(frame + 68) != 0;
            let anchor = cframe.filter(|_| entry);
            if entry {
                cframe = cframe.map(|c| mem.read_u64(c + 16).unwrap());
            }
            out.push(PyFrame {
                name: read_str(&mem, qualname, 200, &l.string).unwrap(),
                entry,
                anchor,
            });
        }
        frame = mem.read_u64(frame + l.frame.previous).unwrap();
    }
    out
}

fn show<N: std::fmt::Debug>(
    merged: &[Merged<'_, N, PyFrame>],
    name: impl Fn(&N) -> String,
) -> Vec<String> {
    merged
        .iter()
        .map(|m| match m {
            Merged::Native(n) => name(n),
            Merged::Python(p) => format!("py:{}", p.name),
            Merged::Marker(k) => k.to_string(),
        })
        .collect()
}

/// The thread blocked in a Python callback of qsort: several activations
/// of the eval loop, as many runs of Python frames read from the target's
/// memory; merged, each run sits where its activation was, the C frames
/// between them (libffi, qsort) in place. On every build: paired by
/// anchors (stack addresses), and where the eval loop has a name, by name
/// too, with the same result.
#[test]
fn merged_stack_of_a_python_callback_from_c() {
    for py in test_python::all_builds() {
        let label = &py.label;
        let mut b = start_blocked(&py, &script(CTYPES), libc::SYS_clock_nanosleep);
        let ([_, _, bp], _) = gdb_frames(b.child.pid(), b.tid);
        b.regs.bp = Some(bp);
        let mut stacks = NativeStacks::new(NativeLimits::default());
        let native = b.native(&mut stacks);
        assert_eq!(native.unwound.stop, StopReason::Outermost, "{label}");
        let python = python_frames(b.child.pid(), b.tstate, py.minor);
        let runs = python.iter().filter(|p| p.entry).count();
        assert!(runs >= 2, "{label}: {python:?}");
        assert!(
            python.iter().all(|p| p.entry == p.anchor.is_some()),
            "{label}"
        );
        let frames = native.frames();
        let side = |complete| Side {
            frames: &python,
            complete,
        };
        let by_anchor = merge(
            Side {
                frames: &frames,
                complete: true,
            },
            side(true),
        );
        let shown = show(&by_anchor, |(_, s)| s.function().unwrap_or("?").to_owned());
        let named = frames.iter().filter(|f| f.1.is_eval_loop()).count();
        let top = b.regs.sp + b.stack.len() as u64;
        let on_stack = |a: &u64| (b.regs.sp..top).contains(a);
        if named == 0 && !python.iter().filter_map(|p| p.anchor).all(|a| on_stack(&a)) {
            // 3.15 enters a thread's first activation from the thread
            // state's base frame, not from a shim on the C stack: with an
            // unnamed eval loop (sid's static build) nothing pairs that
            // run, and the merge says so.
            assert!(
                by_anchor
                    .iter()
                    .any(|m| matches!(m, Merged::Marker(Marker::Mismatch { .. }))),
                "{label}: {shown:?}"
            );
            continue;
        }
        assert!(
            !by_anchor.iter().any(|m| matches!(m, Merged::Marker(_))),
            "{label}: {shown:?}\nanchors {:x?}\nsps {:x?}",
            python.iter().map(|p| p.anchor).collect::<Vec<_>>(),
            frames.iter().map(|f| f.0.sp).collect::<Vec<_>>()
        );
        // As many activations replaced as runs (how many depends on the
        // version: 3.11 calls the thread's target through PyObject_Call,
        // 3.13 inlines that call, 3.14 runs the thread in a context).
        assert_eq!(
            frames.len() - shown.iter().filter(|s| !s.starts_with("py:")).count(),
            runs,
            "{label}: {shown:?}"
        );
        let opt: Vec<Option<String>> = shown.iter().cloned().map(Some).collect();
        assert_chain(
            label,
            &opt,
            &[
                "py:compare",
                "ffi_call",
                "py:worker",
                "py:Thread.run",
                "py:Thread._bootstrap_inner",
                "py:Thread._bootstrap",
            ],
        );
        // The callback's run sits above qsort's frames, not below.
        let pos = |s: &str| shown.iter().position(|x| x == s).unwrap();
        assert!(pos("py:compare") < pos("ffi_call"), "{label}: {shown:?}");
        // Named eval loops: names pair the same way.
        if named > 0 {
            assert_eq!(named, runs, "{label}");
            let by_name = merge(
                Side {
                    frames: &native.symbols,
                    complete: true,
                },
                side(true),
            );
            assert_eq!(
                show(&by_name, |s| s.function().unwrap_or("?").to_owned()),
                shown,
                "{label}"
            );
        } else {
            assert!(
                label.contains("sid") && !py.shared,
                "{label}: no named eval loop"
            );
        }
    }
}

/// The blocked thread of [`CTYPES`] with its real rbp (from gdb), and the
/// complete stack unwound from a whole copy.
fn ctypes_thread(py: &TestPython) -> (Blocked, NativeStack) {
    let mut b = start_blocked(py, &script(CTYPES), libc::SYS_clock_nanosleep);
    let ([_, _, bp], _) = gdb_frames(b.child.pid(), b.tid);
    b.regs.bp = Some(bp);
    let full = b.native(&mut NativeStacks::new(NativeLimits::default()));
    assert_eq!(full.unwound.stop, StopReason::Outermost, "{}", py.label);
    (b, full)
}

/// Every copy shorter than what the walk reads gives the frames found
/// before the copy ended, and says so: never a different frame.
#[test]
fn short_copies_stop_where_the_copy_ends() {
    for py in host_pythons() {
        let (b, full) = ctypes_thread(&py);
        let used = full.unwound.stack_bytes_used as usize;
        assert!(used > 1000 && used <= b.stack.len(), "{}: {used}", py.label);
        let mut stacks = NativeStacks::new(NativeLimits::default());
        for len in (0..=used + 64).step_by(8) {
            let short = UserStack {
                regs: b.regs,
                stack: &b.stack[..len.min(b.stack.len())],
            };
            let u = stacks.unwind(b.child.pid(), &short).unwrap();
            let n = u.frames.len();
            assert_eq!(
                u.frames,
                full.unwound.frames[..n],
                "{}: {len} bytes",
                py.label
            );
            if len >= used {
                assert_eq!(u, full.unwound, "{}: {len} bytes", py.label);
            } else {
                assert!(
                    matches!(u.stop, StopReason::StackCopyEnded { needed }
                        if needed as usize > len && needed as usize <= used),
                    "{}: {len} bytes: {}",
                    py.label,
                    u.stop
                );
            }
        }
    }
}

/// Unwind tables bounded in bytes: one file larger than the whole budget
/// ends the walk there, saying so; a budget below the stack's total makes
/// files evict each other (counted), and the stack is still right.
#[test]
fn unwind_tables_cache_is_bounded_in_bytes() {
    let py = &host_pythons()[0];
    assert!(py.shared, "pyenv's python3 first");
    let (b, full) = ctypes_thread(py);
    let pid = b.child.pid();
    let maps = super::maps::ProcessMaps::read(pid).unwrap();
    let mut sizes: Vec<(String, usize)> = Vec::new();
    for f in &full.unwound.frames {
        let m = maps.find(f.lookup_address()).unwrap();
        let path = m.resolve_path(pid).unwrap();
        let size = super::cfi::UnwindSections::open(&path).unwrap().bytes();
        if !sizes.iter().any(|(n, _)| *n == *m.name) {
            sizes.push((m.name.to_string(), size));
        }
    }
    assert!(sizes.len() >= 4, "{sizes:?}");
    let (biggest, max) = sizes.iter().max_by_key(|(_, s)| *s).unwrap().clone();

    // The biggest file does not fit: the walk stops at its first frame.
    let limits = |module_bytes| NativeLimits {
        unwind: UnwindLimits {
            module_bytes,
            ..UnwindLimits::default()
        },
        ..NativeLimits::default()
    };
    let mut stacks = NativeStacks::new(limits(max - 1));
    let u = stacks.unwind(pid, &b.user_stack()).unwrap();
    let first = full
        .unwound
        .frames
        .iter()
        .position(|f| *maps.find(f.lookup_address()).unwrap().name == *biggest)
        .unwrap();
    assert_eq!(u.frames, full.unwound.frames[..=first]);
    assert!(
        matches!(&u.stop, StopReason::NoUnwindTables { module, reason, .. }
            if **module == *biggest && reason.contains("exceed")),
        "{}",
        u.stop
    );

    // Each fits, not all at once.
    let total: usize = sizes.iter().map(|(_, s)| s).sum();
    assert!(total > max + 1);
    let mut stacks = NativeStacks::new(limits(max + 1));
    for _ in 0..3 {
        let u = stacks.unwind(pid, &b.user_stack()).unwrap();
        assert_eq!(u, full.unwound);
        let st = stacks.stats().unwind;
        assert!(st.module_bytes <= max + 1, "{st:?}");
    }
    let st = stacks.stats().unwind;
    assert!(st.module_evictions > 0, "{st:?}");
    // Evicted tables were loaded again.
    assert!(st.modules_loaded > sizes.len() as u64, "{st:?}");
}

/// Symbols bounded in bytes: with room for a few entries, the same names
/// come out, evictions are counted and the bound holds; forgetting the
/// process and asking again gives them again.
#[test]
fn symbol_cache_is_bounded_in_bytes() {
    let py = &host_pythons()[0];
    let (b, full) = ctypes_thread(py);
    let pid = b.child.pid();
    let lookups: Vec<u64> = full
        .unwound
        .frames
        .iter()
        .map(|f| f.lookup_address())
        .collect();
    let budget = 1500;
    let mut stacks = NativeStacks::new(NativeLimits {
        symbols: super::user::SymbolLimits { bytes: budget },
        ..NativeLimits::default()
    });
    for round in 0..3 {
        let syms = stacks.symbolise(pid, &lookups).unwrap();
        assert_eq!(syms, full.symbols, "round {round}");
        let st = stacks.stats().symbols;
        assert!(st.bytes <= budget && st.entries < lookups.len(), "{st:?}");
        if round == 1 {
            stacks.forget_pid(pid);
        }
    }
    let st = stacks.stats().symbols;
    assert!(
        st.evictions > 0 && st.misses > lookups.len() as u64,
        "{st:?}"
    );
    // Unbounded, the second pass is all hits.
    let mut stacks = NativeStacks::new(NativeLimits::default());
    stacks.symbolise(pid, &lookups).unwrap();
    stacks.symbolise(pid, &lookups).unwrap();
    let st = stacks.stats().symbols;
    assert_eq!(st.evictions, 0);
    assert!(st.hits >= lookups.len() as u64, "{st:?}");
}

/// How deep the C stack goes per eval-loop activation (C calling Python
/// calling C...: `list(map(...))` nested), checked against gdb at depth
/// 30; the bytes a complete unwind needs are printed for sizing the copy.
#[test]
fn stack_bytes_per_activation() {
    let body = |depth: usize| {
        format!(
            "import time\n\
             def nest(n):\n\
             \x20   if n == 0:\n\
             \x20       ready()\n\
             \x20       time.sleep(100)\n\
             \x20   else:\n\
             \x20       list(map(lambda x: nest(n - 1), [n]))\n\
             nest({depth})\n"
        )
    };
    for py in host_pythons() {
        let mut used = Vec::new();
        for depth in [0, 30] {
            let mut b = start_blocked(&py, &script(&body(depth)), libc::SYS_clock_nanosleep);
            let ([_, _, bp], gdb) = gdb_frames(b.child.pid(), b.tid);
            b.regs.bp = Some(bp);
            let mut stacks = NativeStacks::new(NativeLimits {
                unwind: UnwindLimits {
                    max_frames: 1024,
                    ..UnwindLimits::default()
                },
                ..NativeLimits::default()
            });
            let s = b.native(&mut stacks);
            assert_eq!(s.unwound.stop, StopReason::Outermost, "{}", py.label);
            let pcs: Vec<u64> = s.unwound.frames.iter().map(|f| f.address).collect();
            let gdb_pcs: Vec<u64> = gdb.iter().map(|f| f.pc).collect();
            assert_eq!(pcs, gdb_pcs, "{} depth {depth}", py.label);
            let activations = s.symbols.iter().filter(|s| s.is_eval_loop()).count();
            assert_eq!(activations, depth + 1, "{}", py.label);
            used.push((depth, s.unwound.frames.len(), s.unwound.stack_bytes_used));
        }
        let per = (used[1].2 - used[0].2) / 30;
        eprintln!(
            "{}: (depth, frames, bytes) {used:?}: {per} bytes per activation",
            py.label
        );
        assert!(per > 100, "{used:?}");
    }
}

/// The vDSO has no file: its symbols and unwind tables come from memory.
/// In our own process: `clock_gettime`'s entry is named, and a step from
/// it follows its CFI to the return address we put on a stack.
#[test]
fn vdso_is_symbolised_and_unwound_from_memory() {
    use object::{Object, ObjectSymbol};
    let pid = std::process::id();
    let maps = super::maps::ProcessMaps::read(pid).unwrap();
    let vdso = maps
        .mappings()
        .iter()
        .find(|m| m.backing == super::maps::Backing::Vdso)
        .expect("a vDSO");
    let image = ProcessMemory::new(pid)
        .read_vec(vdso.start, (vdso.end - vdso.start) as usize)
        .unwrap();
    let elf = object::File::parse(image.as_slice()).unwrap();
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("__vdso_clock_gettime"))
        .expect("__vdso_clock_gettime");
    let tables = super::cfi::UnwindSections::parse(image.as_slice()).unwrap();
    let bias = tables.bias(vdso.start, 0).unwrap();
    let entry = bias + sym.address();
    assert!(vdso.contains(entry));

    let mut stacks = NativeStacks::new(NativeLimits::default());
    let named = stacks.symbolise(pid, &[entry]).unwrap();
    assert_eq!(&*named[0].module, "[vdso]");
    assert!(
        named[0]
            .function()
            .is_some_and(|f| f.ends_with("clock_gettime")),
        "{:?}",
        named[0]
    );

    // At a function's entry the return address is at sp.
    let ret = vdso_is_symbolised_and_unwound_from_memory as fn() as usize as u64 + 1;
    let stack = ret.to_le_bytes();
    let u = stacks
        .unwind(
            pid,
            &UserStack {
                regs: UserRegs {
                    ip: entry,
                    sp: 0x7000_0000,
                    bp: None,
                },
                stack: &stack,
            },
        )
        .unwrap();
    assert_eq!(
        u.frames.iter().map(|f| f.address).collect::<Vec<_>>(),
        [entry, ret]
    );
    // The next step needs bytes past the 8 we gave.
    assert!(
        matches!(u.stop, StopReason::StackCopyEnded { needed } if needed > 8),
        "{}",
        u.stop
    );
}

/// The project's own case: a gunicorn worker (threads) whose Flask
/// handler blocks. Its native stack matches gdb, merged with its Python
/// frames the handler sits where its activation was, and the bytes a
/// complete unwind reads are printed (sizing the sampler's copy).
#[test]
fn gunicorn_flask_handler_stack() {
    use std::io::Write;
    let py = &host_pythons()[0];
    assert!(py.shared, "pyenv's python3 (with gunicorn and flask) first");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        r#"
import ctypes, os, threading, time
from flask import Flask
ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
app = Flask(__name__)
@app.route("/")
def handler():
    print("ready", os.getpid(), threading.get_native_id(),
          ctypes.pythonapi.PyThreadState_Get(), flush=True)
    time.sleep(100)
    return "ok"
"#,
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The request, once gunicorn listens.
    std::thread::spawn(move || {
        for _ in 0..300 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                std::thread::sleep(Duration::from_secs(120));
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut cmd = py.command();
    cmd.current_dir(dir.path()).args([
        "-m",
        "gunicorn",
        "-w",
        "1",
        "--threads",
        "2",
        "-b",
        &format!("127.0.0.1:{port}"),
        "app:app",
    ]);
    let (_master, words) = spawn_ready(&mut cmd);
    let word = |i: usize| -> u64 { words[i].parse().unwrap() };
    let (pid, tid, tstate) = (word(0) as u32, word(1) as u32, word(2));
    // The worker's pool thread would outlive the master by its sleep.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill has no memory preconditions; the pid is our
            // grandchild, still unreaped (its parent is alive until the
            // master guard drops after this one).
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _worker = Kill(pid);
    let (sp, ip) = blocked_in(pid, tid, libc::SYS_clock_nanosleep as u64);
    let bytes = copy_stack(pid, sp, 1 << 20);
    let ([gip, gsp, bp], gdb) = gdb_frames(pid, tid);
    assert_eq!((gip, gsp), (ip, sp));
    let mut stacks = NativeStacks::new(NativeLimits::default());
    let s = stacks
        .native_stack(
            pid,
            &UserStack {
                regs: UserRegs {
                    ip,
                    sp,
                    bp: Some(bp),
                },
                stack: &bytes,
            },
        )
        .unwrap();
    let ours: Vec<GdbFrame> = s
        .unwound
        .frames
        .iter()
        .zip(&s.symbols)
        .map(|(f, sym)| GdbFrame {
            pc: f.address,
            name: sym.function().map(str::to_owned),
        })
        .collect();
    assert_eq!(ours, gdb, "ended: {}", s.unwound.stop);
    assert_eq!(s.unwound.stop, StopReason::Outermost);
    let python = python_frames(pid, tstate, py.minor);
    let merged = merge(
        Side {
            frames: &s.symbols,
            complete: true,
        },
        Side {
            frames: &python,
            complete: true,
        },
    );
    let shown: Vec<Option<String>> = merged
        .iter()
        .map(|m| {
            Some(match m {
                Merged::Native(n) => n.function().unwrap_or("?").to_owned(),
                Merged::Python(p) => format!("py:{}", p.name),
                Merged::Marker(k) => k.to_string(),
            })
        })
        .collect();
    assert!(
        !merged.iter().any(|m| matches!(m, Merged::Marker(_))),
        "{shown:?}"
    );
    assert_chain(
        "gunicorn",
        &shown,
        &[
            "time_sleep",
            "py:handler",
            "py:Flask.dispatch_request",
            "py:Flask.wsgi_app",
            "py:ThreadWorker.handle",
            "start_thread",
        ],
    );
    eprintln!(
        "gunicorn gthread worker, Flask handler in time.sleep: {} native frames, {} Python \
         frames, {} eval activations, a complete unwind reads {} bytes of stack",
        s.unwound.frames.len(),
        python.len(),
        s.symbols.iter().filter(|s| s.is_eval_loop()).count(),
        s.unwound.stack_bytes_used
    );
}
