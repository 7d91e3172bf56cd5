//! Microbenchmarks of pyebpf's userspace hot paths, one per stage a sample
//! goes through: ring-buffer record decode, symbol cache hit, line lookup
//! (the table decoded once per code object, and the scan of the raw table
//! for comparison), aggregation (store add and query), native stacks
//! (unwinding a copied user stack from CFI and symbolising it, warm caches).
//!
//! `cargo bench -p profiler-daemon --bench userspace`; `cargo xtask bench`
//! runs them with a short measurement time and reports the medians.
//! The line tables are produced by the `python3` on PATH at bench time, so
//! lookups run on what CPython 3.11 really emits.
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use profiler_common::{
    code_checksum, words_of, RawFrame, CODE_READ_LEN, CODE_READ_START, HEADER_LEN, RAW_FRAME_LEN,
};
use pyebpf::bpf::events::{decode, RawSample};
use pyebpf::model::labels::ProcessLabels;
use pyebpf::model::query::Selector;
use pyebpf::native::stacks::{NativeLimits, NativeStacks};
use pyebpf::native::unwind::{StopReason, UserRegs, UserStack};
use pyebpf::process::memory::SliceMemory;
use pyebpf::process::memory::{ProcessMemory, RemoteMemory};
use pyebpf::python::code::CodeFormat;
use pyebpf::python::layout::Minor;
use pyebpf::python::linetable::{line_for_instr, LineTable};
use pyebpf::python::symbolizer::Symbolizer;
use pyebpf::store::{NewProcess, Store, StoreLimits};

/// A function of `lines` lines as CPython 3.11 compiles it:
/// (co_linetable, co_firstlineno, code units).
struct Table {
    linetable: Vec<u8>,
    first_line: u32,
    n_units: u32,
}

fn python_table(lines: usize) -> Table {
    let body: String = (0..lines)
        .map(|i| format!("    x{i} = a * {i} + b\n"))
        .collect();
    let src = format!("def f(a, b):\n{body}    return a\n");
    let script = format!(
        "import sys\nsrc = {src:?}\nns = {{}}\nexec(compile(src, 'bench.py', 'exec'), ns)\n\
         c = ns['f'].__code__\nassert sys.version_info[:2] == (3, 11), sys.version\n\
         print(c.co_linetable.hex(), c.co_firstlineno, len(c.co_code) // 2)\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("the line-table benchmarks need python3 (3.11) on PATH");
    assert!(out.status.success(), "python3 failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut it = text.split_whitespace();
    let hex = it.next().expect("linetable");
    let linetable = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    Table {
        linetable,
        first_line: it.next().expect("firstlineno").parse().expect("number"),
        n_units: it.next().expect("units").parse().expect("number"),
    }
}

/// A ring-buffer record as the BPF sampler writes it.
fn record(nframes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + nframes * RAW_FRAME_LEN);
    v.extend_from_slice(&123_456_789u64.to_le_bytes());
    for x in [4242u32, 4243, 1, nframes as u32, 0, 0] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for i in 0..nframes {
        v.extend_from_slice(&(0x7f00_0000_0000u64 + i as u64 * 0x100).to_le_bytes());
        v.extend_from_slice(&(i as i32 * 3).to_le_bytes());
        v.extend_from_slice(&(i as u32 ^ 0xabcd).to_le_bytes());
    }
    assert_eq!(v.len(), HEADER_LEN + nframes * RAW_FRAME_LEN);
    v
}

fn bench_decode(c: &mut Criterion) {
    for n in [16usize, 128] {
        let r = record(n);
        c.bench_function(&format!("decode/{n}_frames"), |b| {
            b.iter(|| decode(black_box(&r)).expect("valid record"))
        });
    }
}

const PYCODE_TYPE: u64 = 0x5555_0000_1000;
const CODE_ADDR: u64 = 0x7f00_0010_0000;

/// How the fake 3.11 code objects below are read.
fn format() -> CodeFormat {
    CodeFormat::new(PYCODE_TYPE, &Minor::V3_11.header_layout())
}

/// A compact ASCII `str` object (PEP 393) holding `s`.
fn ascii_str(s: &str) -> Vec<u8> {
    let mut v = vec![0u8; 48];
    v[16..24].copy_from_slice(&(s.len() as i64).to_le_bytes());
    v[32] = (1 << 2) | (1 << 5) | (1 << 6); // kind 1, compact, ascii
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// Target memory with one code object at [`CODE_ADDR`] (the fields
/// `python/code.rs` reads), its name strings and line table; returns the
/// memory and the checksum BPF would have sent.
fn fake_code_object(t: &Table) -> (SliceMemory, u32) {
    let (file_at, qual_at, table_at) = (CODE_ADDR + 0x1000, CODE_ADDR + 0x2000, CODE_ADDR + 0x3000);
    let mut hdr = vec![0u8; 192];
    let mut put = |off: usize, v: u64| hdr[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(8, PYCODE_TYPE); // ob_type
    put(16, u64::from(t.n_units)); // ob_size
    put(112, file_at); // co_filename
    put(128, qual_at); // co_qualname
    put(136, table_at); // co_linetable
    hdr[72..76].copy_from_slice(&(t.first_line as i32).to_le_bytes());
    let mut bytes = vec![0u8; 32]; // PyBytesObject: ob_size at +16, data at +32
    bytes[16..24].copy_from_slice(&(t.linetable.len() as i64).to_le_bytes());
    bytes.extend_from_slice(&t.linetable);
    let start = CODE_READ_START as usize;
    let mut sum = [0u8; CODE_READ_LEN];
    sum.copy_from_slice(&hdr[start..start + CODE_READ_LEN]);
    let masks = Minor::V3_11.header_layout().code.checksum_masks;
    let mut mem = SliceMemory::new();
    mem.add(CODE_ADDR, hdr)
        .add(file_at, ascii_str("/srv/app/handlers/orders.py"))
        .add(qual_at, ascii_str("OrderHandler.encode_orders"))
        .add(table_at, bytes);
    (mem, code_checksum(&words_of(&sum), &masks))
}

fn bench_symbols(c: &mut Criterion) {
    let t = python_table(200);
    let (mem, checksum) = fake_code_object(&t);
    let mut sym = Symbolizer::new(mem, format());
    let raw = RawFrame {
        code: CODE_ADDR,
        instr: t.n_units as i32 / 2,
        checksum,
    };
    // The first lookup reads the object (a miss); every later one is a hit.
    assert!(
        sym.code(&raw).is_ok(),
        "the fake code object must symbolise"
    );
    c.bench_function("symbols/cache_hit", |b| {
        b.iter(|| sym.code(black_box(&raw)).is_ok())
    });
    c.bench_function("symbols/cache_hit_frame_with_line", |b| {
        b.iter(|| sym.frame(black_box(&raw)))
    });
    // Not `hits > 0`: a name filter (`-- store/`) skips the loops above.
    assert_eq!(sym.stats.misses, 1, "every lookup after the first is a hit");
}

fn bench_lines(c: &mut Criterion) {
    for lines in [10usize, 200] {
        let t = python_table(lines);
        let last = i64::from(t.n_units) - 1;
        assert!(line_for_instr(&t.linetable, t.first_line, last).is_some());
        c.bench_function(&format!("linetable/{lines}_lines_last_instr"), |b| {
            b.iter(|| line_for_instr(black_box(&t.linetable), t.first_line, black_box(last)))
        });
        // What the symbol cache does: decode once when the code object is
        // read, then a binary search per frame.
        c.bench_function(&format!("linetable/{lines}_lines_decode_once"), |b| {
            b.iter(|| LineTable::decode(black_box(&t.linetable), t.first_line, t.n_units))
        });
        let table = LineTable::decode(&t.linetable, t.first_line, t.n_units);
        assert_eq!(
            table.line(last as u32),
            line_for_instr(&t.linetable, t.first_line, last)
        );
        c.bench_function(
            &format!("linetable/{lines}_lines_last_instr_decoded"),
            |b| b.iter(|| table.line(black_box(last as u32))),
        );
    }
}

const PID: u32 = 4242;

fn store() -> Store {
    let mut s = Store::new(
        StoreLimits {
            retention_secs: 600,
            max_processes: 1000,
            max_stacks_per_process: 100_000,
            max_bytes: 256 << 20,
            max_bytes_per_process: 32 << 20,
        },
        99,
    );
    let added = s.add_process(
        NewProcess {
            labels: ProcessLabels {
                pid: PID,
                command: "python3".into(),
                service: "bench".into(),
                ..Default::default()
            },
            start_time: 1,
            python_version: "3.11.7".into(),
            code_format: format(),
            gil: None,
        },
        SystemTime::now(),
    );
    assert!(added);
    s
}

/// `n` distinct stacks of `depth` frames sharing their root half, like the
/// stacks of one service. Code addresses point nowhere in this process, so
/// each new stack is symbolised once as unreadable frames (cached).
fn stacks(n: usize, depth: usize) -> Vec<RawSample> {
    (0..n)
        .map(|i| RawSample {
            pid: PID,
            tid: PID,
            cpu: 0,
            ktime_ns: 0,
            truncated: false,
            read_error: None,
            frames: (0..depth)
                .map(|d| RawFrame {
                    code: 0x10_0000
                        + if d < depth / 2 {
                            (i * depth + d) as u64
                        } else {
                            d as u64
                        } * 0x200,
                    instr: (d * 2) as i32,
                    checksum: 7,
                })
                .collect(),
            ..RawSample::default()
        })
        .collect()
}

fn bench_store(c: &mut Criterion) {
    let samples = stacks(100, 32);
    let now = SystemTime::now();
    let mut s = store();
    for x in &samples {
        s.add_sample(x.clone(), now);
    }
    let mut i = 0usize;
    c.bench_function("store/add_sample_known_stack_32_frames", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % samples.len();
                samples[i].clone()
            },
            |x| s.add_sample(x, now),
            BatchSize::SmallInput,
        )
    });
    // The daemon adds what one ring-buffer drain brings, in batches.
    let batch: Vec<RawSample> = (0..1024)
        .map(|i| samples[i % samples.len()].clone())
        .collect();
    c.bench_function("store/add_samples_1024_known_stacks_32_frames", |b| {
        b.iter_batched(
            || batch.clone(),
            |x| s.add_samples(x, now),
            BatchSize::LargeInput,
        )
    });
    c.bench_function("store/query_100_stacks", |b| {
        b.iter(|| {
            s.query(black_box(&Selector::Pid(PID)), 60, now)
                .expect("profiled")
        })
    });
    // The fake code objects are unreadable, so the 100 raw stacks symbolise
    // alike; the query still merges every bucket of every stack.
    let p = s.query(&Selector::Pid(PID), 60, now).expect("profiled");
    assert!(p.total_samples() > samples.len() as u64);
}

/// A python3 (pyenv's 3.11) blocked in `time.sleep` under three levels of
/// C calling Python (`list(map(...))`): about 30 native frames. Returns
/// the child, its registers and a copy of its stack.
fn blocked_python() -> (std::process::Child, UserRegs, Vec<u8>) {
    use std::io::{BufRead, BufReader};
    let script = "import threading, time\n\
                  def nest(n):\n\
                  \x20   if n == 0:\n\
                  \x20       print('ready', threading.get_native_id(), flush=True)\n\
                  \x20       time.sleep(600)\n\
                  \x20   else:\n\
                  \x20       list(map(lambda x: nest(n - 1), [n]))\n\
                  nest(3)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the native-stack benchmark needs python3 on PATH");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("ready line");
    let tid: u32 = line
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("bad ready line {line:?}"));
    // `nr args... sp pc` once it sleeps in clock_nanosleep.
    let (sp, ip) = loop {
        let text = std::fs::read_to_string(format!("/proc/{}/task/{tid}/syscall", child.id()))
            .expect("syscall file");
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() == 9 && f[0] == libc::SYS_clock_nanosleep.to_string() {
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
            break (hex(f[7]), hex(f[8]));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let maps = pyebpf::process::maps::read(child.id()).expect("maps");
    let end = maps.iter().find(|m| m.contains(sp)).expect("stack").end;
    let stack = ProcessMemory::new(child.id())
        .read_vec(sp, (end - sp).min(64 << 10) as usize)
        .expect("stack copy");
    (child, UserRegs { ip, sp, bp: None }, stack)
}

fn bench_native(c: &mut Criterion) {
    let (mut child, regs, bytes) = blocked_python();
    let pid = child.id();
    let stack = UserStack {
        regs,
        stack: &bytes,
    };
    let mut stacks = NativeStacks::new(NativeLimits::default());
    let first = stacks.native_stack(pid, &stack).expect("native stack");
    assert_eq!(first.unwound.stop, StopReason::Outermost);
    let n = first.unwound.frames.len();
    assert!((25..=40).contains(&n), "{n} frames");
    c.bench_function(
        &format!("native/unwind_and_symbolise_{n}_frames_warm"),
        |b| b.iter(|| black_box(stacks.native_stack(pid, black_box(&stack)).expect("stack"))),
    );
    c.bench_function(&format!("native/unwind_{n}_frames_warm"), |b| {
        b.iter(|| black_box(stacks.unwind(pid, black_box(&stack)).expect("stack")))
    });
    let lookups: Vec<u64> = first
        .unwound
        .frames
        .iter()
        .map(|f| f.lookup_address())
        .collect();
    c.bench_function(&format!("native/symbolise_{n}_frames_warm"), |b| {
        b.iter(|| black_box(stacks.symbolise(pid, black_box(&lookups)).expect("symbols")))
    });
    let _ = child.kill();
    let _ = child.wait();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_decode, bench_symbols, bench_lines, bench_native, bench_store
}
criterion_main!(benches);
