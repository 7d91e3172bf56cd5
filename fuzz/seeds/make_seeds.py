#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/corpus/<target>/.

Run once from the repository root with pyenv's Python 3.11 (line tables of
3.12/3.13 are added when those interpreters are installed) and gcc:
    python3 fuzz/seeds/make_seeds.py
The seeds then go through `cargo fuzz cmin` with the fuzzers' finds; the
committed corpora are the result, so this script is only needed to start
over. Each seed is small (< 64 KiB).
"""
import hashlib
import pathlib
import struct
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
SEEDS = pathlib.Path(__file__).resolve().parent
MAX_SEED = 64 * 1024


def put(target, data, name=None):
    if isinstance(data, str):
        data = data.encode()
    data = data[:MAX_SEED]
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    name = name or "seed-" + hashlib.sha1(data).hexdigest()[:16]
    (d / name).write_bytes(data)


# ---- line tables: first_line u32 LE, n_units u32 LE, co_linetable ----
LINETABLE_DUMP = r"""
import sys, struct, inspect, json, collections, textwrap
def sample(a, b=2):
    x = [i * a for i in range(b)
         if i % 2]
    try:
        y = {k: v for k, v in zip(x, x)}
    except Exception as e:
        y = None
    finally:
        pass
    while a:
        a -= 1
        if a > 1000000:
            break
    return x, y
async def agen():
    async with None as n:
        yield n
lam = lambda q: (q +
                 1)
codes = [sample.__code__, agen.__code__, lam.__code__]
for mod in (json, collections, inspect, textwrap):
    for name, obj in sorted(vars(mod).items()):
        code = getattr(obj, "__code__", None)
        if code is not None and len(codes) < 40:
            codes.append(code)
out = sys.stdout.buffer
for c in codes:
    t = c.co_linetable
    blob = struct.pack("<II", c.co_firstlineno, len(c.co_code) // 2) + t
    out.write(struct.pack("<I", len(blob)) + blob)
"""


def linetables():
    pythons = [sys.executable]
    pyenv = pathlib.Path.home() / ".pyenv" / "versions"
    for v in ("3.12", "3.13"):
        pythons += sorted(str(p / "bin" / "python3") for p in pyenv.glob(v + ".*"))
    for py in pythons:
        out = subprocess.run([py, "-c", LINETABLE_DUMP], check=True,
                             capture_output=True).stdout
        while out:
            (n,) = struct.unpack_from("<I", out)
            put("linetable", out[4:4 + n])
            out = out[4 + n:]


# ---- str data of each kind ----
def unicode():
    for s in ("main", "héllo wörld", "λ→∀ x", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🐍", ""):
        put("unicode", s.encode("latin-1", "replace"))
        put("unicode", s.encode("utf-16-le"))
        put("unicode", s.encode("utf-32-le"))
    put("unicode", b"\x00\xd8\x41\x00")  # lone surrogate, UCS-2
    put("unicode", struct.pack("<I", 0x110000))


# ---- ring-buffer sample records (the layout of events.rs's tests) ----
# Header: ktime u64; pid, tid, cpu, nframes, flags, error_step, kind, nkernel
# u32; weight_ns, user ip, sp, bp, syscall nr, syscall arg0 u64 (88 bytes).
# Body: nkernel u64 kernel addresses padded to 16 bytes, then the frames.
def events():
    def record(nframes, flags, frames, step=2, kind=0, kernel=(), nkernel=None,
               weight=10_101_010):
        nk = len(kernel) if nkernel is None else nkernel
        v = struct.pack("<Q", 123456789)
        v += struct.pack("<8I", 42, 43, 1, nframes, flags, step, kind, nk)
        v += struct.pack("<6Q", weight, 0x7f0000001234, 0x7ffc00000000,
                         0x7ffc00000100, 202, 0x555500000040)
        for a in kernel:
            v += struct.pack("<Q", a)
        if len(kernel) % 2:
            v += struct.pack("<Q", 0)
        for code, instr, checksum in frames:
            v += struct.pack("<QiI", code, instr, checksum)
        return v
    k = [0xffffffff81000000 + 0x100 * i for i in range(5)]
    put("events", record(0, 0, []))
    put("events", record(1, 0, [(0x7f0000001000, -1, 7)]))
    put("events", record(3, 1, [(0x1000, 0, 1), (0x2000, 17, 2), (0x3000, 255, 3)]))
    put("events", record(2, 2, [(0x1000, 4, 9), (0, 0, 0)], step=5))
    put("events", record(2, 3, [(0x1000, 4, 9)]))  # length mismatch
    # Off-CPU, preempted, user registers, in the kernel, odd kernel stack.
    put("events", record(1, 4 | 16 | 32, [(0x1000, 3, 9)], kind=1, kernel=k[:3],
                         weight=2_500_000))
    # CPU sample in the kernel with a cut stack of 64 (even: no pad).
    put("events", record(1, 8 | 16 | 32, [(0x1000, 3, 9)], kernel=k * 12 + k[:4]))
    put("events", record(0, 64, [], kind=1, kernel=k[:1]))
    put("events", record(0, 0, [], kind=7))  # unknown kind
    put("events", record(0, 0, [], kernel=k[:2], nkernel=3))  # missing pad
    put("events", record(0, 0, [], kernel=k * 13, nkernel=65))  # too deep

# ---- small ELF files ----
FAKE_PY = r"""
#include <stdint.h>
__attribute__((section(".PyRuntime"))) char _PyRuntime[64] = {1};
const uint64_t Py_Version = 0x030b07f0;
char PyCode_Type[32];
static __thread void *tstate;
void *PyGILState_GetThisThreadState(void) { return tstate; }
int main(void) { return PyGILState_GetThisThreadState() != 0; }
"""


def elf():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "p.c").write_text(FAKE_PY)
        (tmp / "m.c").write_text("int main(void) { return 0; }\n")
        builds = {
            "exe-pie": ["m.c", "-Os", "-s"],
            "exe-nopie": ["m.c", "-Os", "-no-pie", "-s"],
            "fakepy-exe": ["p.c", "-Os", "-Wl,--build-id"],
            "fakepy-so": ["p.c", "-Os", "-shared", "-fPIC", "-Wl,--build-id"],
            "fakepy-so-stripped": ["p.c", "-Os", "-shared", "-fPIC", "-s"],
            "fakepy-static-tls": ["p.c", "-Os", "-ftls-model=initial-exec", "-shared",
                                  "-fPIC"],
        }
        for name, args in builds.items():
            src, *flags = args
            out = tmp / name
            subprocess.run(["gcc", str(tmp / src), "-o", str(out), *flags], check=True)
            data = out.read_bytes()
            if len(data) <= MAX_SEED:
                put("elf", data, name)
        # Headers only: a file cut short of its sections.
        put("elf", (tmp / "fakepy-so").read_bytes()[:512], "truncated-512")


# ---- BTF blobs, built as the kernel lays them out (little-endian) ----
class Btf:
    def __init__(self):
        self.types = b""
        self.strings = b"\0"
        self.n = 0

    def s(self, name):
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def t(self, name, kind, vlen, size_or_type, extra=b"", kflag=0):
        self.types += struct.pack("<III", self.s(name),
                                  (kflag << 31) | (kind << 24) | vlen, size_or_type) + extra
        self.n += 1
        return self.n

    def int(self, name, size):
        return self.t(name, 1, 0, size, struct.pack("<I", size * 8))

    def struct(self, name, size, members, union=False, kflag=0):
        extra = b"".join(struct.pack("<III", self.s(m), ty, off) for m, ty, off in members)
        return self.t(name, 5 if union else 4, len(members), size, extra, kflag)

    def blob(self):
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def btf():
    b = Btf()
    ul = b.int("unsigned long", 8)
    i = b.int("int", 4)
    atomic = b.struct("", 4, [("counter", i, 0)])
    atomic_t = b.t("atomic_t", 8, 0, atomic)
    sig = b.struct("signal_struct", 64, [("nr_threads", i, 0), ("live", atomic_t, 32)])
    sigp = b.t("", 2, 0, sig)
    thread = b.struct("thread_struct", 32, [("sp", ul, 0), ("es", ul, 64), ("fsbase", ul, 128)])
    cthread = b.t("", 10, 0, thread)
    anon = b.struct("", 16, [("signal", sigp, 0), ("x", i, 64)], union=True)
    b.struct("task_struct", 512, [("state", i, 0), ("", anon, 64), ("thread", cthread, 1024)])
    put("btf", b.blob(), "task-signal-thread")

    # Anonymous members nested and a bitfield (kind_flag set).
    b = Btf()
    i = b.int("int", 4)
    c = b.struct("", 4, [("c", i, 0)])
    bb = b.struct("", 8, [("b", c, 32), ("", c, 0)])
    b.struct("s", 16, [("flag", i, 0x01000000 | 3), ("a", bb, 64)], kflag=1)
    put("btf", b.blob(), "nested-anon-bitfield")

    # A typedef chain and a forward declaration, big-endian header swapped.
    b = Btf()
    i = b.int("int", 4)
    td = b.t("t1", 8, 0, i)
    td2 = b.t("t2", 8, 0, td)
    b.t("fwd", 7, 0, 0)
    b.struct("s", 8, [("a", td2, 0)])
    put("btf", b.blob(), "typedef-chain")


# ---- configuration files ----
def config():
    for p in (ROOT / "deploy" / "pyebpf.yaml", ROOT / "deploy" / "kubernetes" / "daemonset.yaml"):
        put("config", p.read_bytes(), "deploy-" + p.name)
    put("config", "")
    put("config", "# comments only\n---\n")
    put("config", "aggregation:\n  window_secs: 60\n  retention_secs: 30\n")
    put("config", "sampling:\n  rate_hz: 99\n  max_depth: 5000\ndiscovery:\n  include:\n    - command: python3\n      cmdline: '^gunicorn .*'\n")
    put("config", "outputs:\n  pprof_dir:\n    path: /tmp/x\n    max_age_secs: 1\n")
    put("config", "a: &x [1, 2]\nb: *x\n")


# ---- HTTP query strings ----
def http_query():
    for q in ("pid=12", "seconds=300&service=a%20b", "service=web&seconds=5",
              "pid=1&pid=2&line=1&limit=7&seconds=all", "all=1", "all=0&all=1",
              "pid=4294967296", "service=&pid=", "seconds=+5", "pid=%FF%FE",
              "a=1&&b", "limit=100000&service=%E2%9C%93"):
        put("http_query", q)


# ---- /proc text ----
def proc():
    for p in ("/proc/self/maps", "/proc/1/maps"):
        try:
            put("maps", pathlib.Path(p).read_bytes())
        except OSError:
            pass
    put("maps", "55d0c8a00000-55d0c8a21000 r--p 00000000 08:01 1234 /usr/bin/python3.11 (deleted)\n"
                "7f00-7f01 rw-s 0 00:05 0 /memfd:x\\012y (deleted)\n"
                "7ffc0000-7ffd0000 rw-p 00000000 00:00 0                  [stack]\n")
    put("proc_stat", pathlib.Path("/proc/self/stat").read_bytes())
    put("proc_stat", "42 (a) (b)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n")
    put("proc_stat", ")(")
    cid = "a" * 64
    for text in (
        f"12:memory:/docker/{cid}\n0::/system.slice/containerd.service\n",
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2d3da189_6407_48e3"
        f"_9ab6_78188d75e609.slice/cri-containerd-{cid}.scope\n",
        f"0::/kubepods/burstable/podfd52ef25-a87d-11e9-9423-0800271a638e/{cid}\n",
        f"0::/ecs/0123456789abcdef0123456789abcdef/{cid}\n",
        "0::/ecs/0123456789abcdef0123456789abcdef/0123456789abcdef0123456789abcdef-1234\n",
        f"0::/kubepods.slice/crio-conmon-{cid}.scope\n",
        "0::/user.slice/user-0.slice/session-1.scope\n",
        b"OTEL_SERVICE_NAME=web\0DD_SERVICE=x\0PYEBPF_DISABLE=yes\0".decode(),
    ):
        put("cgroup", text)


def main():
    if CORPUS.exists() and "--force" not in sys.argv:
        print(f"{CORPUS} exists: pass --force to add seeds to it")
    linetables()
    unicode()
    events()
    elf()
    btf()
    config()
    http_query()
    proc()
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(f"seeds written to {CORPUS} ({total} bytes)")


if __name__ == "__main__":
    main()
