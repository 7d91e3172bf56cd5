"""A CPython 3.11 target that corrupts its own interpreter state, for
pyebpf's fault-injection tests (profiler-daemon/tests/corrupt.rs).

Each phase breaks one thing the profiler's walker follows, only while the
interpreter itself does not use it, spins in a pure-arithmetic loop (the
`# HOT:` lines) so that the profiler samples the broken state, and restores
it before the interpreter can notice:

- cycle:   a caller frame's `previous` points back at the leaf frame;
- badcode: a caller frame's `f_code` points into an unmapped page;
- name:    a code object's `co_name` and `co_qualname` point into an
           unmapped page while it runs;
- tss:     another thread's thread-specific-storage slot (where the profiler
           finds that thread's `PyThreadState`) holds a pointer into an
           unmapped page, then another thread's `PyThreadState`.

Each spin function runs only while its corruption is in place, so a test can
tell the samples taken during a corruption by their leaf's name and line.

Usage: corrupt.py [--clean] [--wait] [--rounds=N] PHASE...   (cycle badcode name tss; all)
Prints "ready", with --wait reads a line from stdin, runs the phases once
(or N times), and prints "result <n>": a checksum of
every loop's arithmetic, which does not depend on the profiler or on the
corruption (`--clean` runs the same arithmetic without corrupting anything:
the ground truth).
"""
import ctypes
import gc
import mmap
import sys
import threading

# CPython 3.11, x86-64 (checked below where the interpreter lets us).
FRAME_OBJ_F_FRAME = 24  # PyFrameObject.f_frame
IFRAME_F_CODE = 32  # _PyInterpreterFrame.f_code
IFRAME_PREVIOUS = 48  # _PyInterpreterFrame.previous
CODE_CO_NAME = 120
CODE_CO_QUALNAME = 128
RUNTIME_TSS_INITIALIZED = 592  # _PyRuntime.gilstate.autoTSSkey._is_initialized
RUNTIME_TSS_KEY = 596  # _PyRuntime.gilstate.autoTSSkey._key
# glibc x86-64: struct pthread.specific_1stblock, of {seq, data} pairs.
GLIBC_SPECIFIC_1STBLOCK = 0x310

ITERATIONS = 1_000_000
MASK = (1 << 61) - 1

CLEAN = "--clean" in sys.argv


def word(addr):
    return ctypes.c_uint64.from_address(addr)


def iframe_of(frame):
    """Address of the _PyInterpreterFrame of a (running) frame object."""
    return word(id(frame) + FRAME_OBJ_F_FRAME).value


class Corruption:
    """Writes `value` at `addr` on enter, puts the old word back on exit."""

    def __init__(self, addr, value):
        self.addr, self.value = addr, value

    def __enter__(self):
        if not CLEAN:
            self.old = word(self.addr).value
            word(self.addr).value = self.value
        return self

    def __exit__(self, *exc):
        if not CLEAN:
            word(self.addr).value = self.old


def junk_address():
    """Address of a page unmapped just now (8-aligned, inside it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
    page = libc.mmap(None, mmap.PAGESIZE, 3, 0x22, -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    if libc.munmap(page, mmap.PAGESIZE) != 0:
        raise OSError(ctypes.get_errno(), "munmap")
    return page + 0x100


# ---------------------------------------------------------------- cycle

def cycle_leaf(x):
    leaf = sys._getframe()
    outer = leaf.f_back.f_back
    with Corruption(iframe_of(outer) + IFRAME_PREVIOUS, iframe_of(leaf)):
        for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:cycle
    return x


def cycle_middle(x):
    return cycle_leaf(x)  # CALL:cycle_middle


def cycle_outer(x):
    return cycle_middle(x)  # CALL:cycle_outer


# -------------------------------------------------------------- badcode

def badcode_leaf(x):
    outer = sys._getframe().f_back.f_back
    with Corruption(iframe_of(outer) + IFRAME_F_CODE, junk_address()):
        for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:badcode
    return x


def badcode_middle(x):
    return badcode_leaf(x)  # CALL:badcode_middle


def badcode_outer(x):
    return badcode_middle(x)  # CALL:badcode_outer


# ----------------------------------------------------------------- name

def named_victim(x):
    for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:name
    return x


def name_caller(x):
    code = id(named_victim.__code__)
    junk = junk_address()
    # Never run before: the profiler has not read this code object yet.
    with Corruption(code + CODE_CO_NAME, junk), Corruption(code + CODE_CO_QUALNAME, junk):
        x = named_victim(x)  # CALL:name
    return x


# ------------------------------------------------------------------ tss

def tss_slot(thread_ident):
    """Address of the word in thread `thread_ident`'s glibc thread-specific
    data holding its PyThreadState (CPython's autoTSSkey)."""
    runtime = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    if ctypes.c_int.from_address(runtime + RUNTIME_TSS_INITIALIZED).value != 1:
        raise RuntimeError("autoTSSkey is not initialised")
    key = ctypes.c_uint32.from_address(runtime + RUNTIME_TSS_KEY).value
    if key >= 32:
        raise RuntimeError(f"autoTSSkey {key} is not in the first glibc block")
    # A pthread_t is the thread's struct pthread, its FS base.
    return thread_ident + GLIBC_SPECIFIC_1STBLOCK + key * 16 + 8


def current_tstate():
    ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
    return ctypes.pythonapi.PyThreadState_Get()


def tss_unmapped_spin(x):
    for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:tss_unmapped
    return x


def tss_foreign_spin(x):
    for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:tss_foreign
    return x


def tss_restored_spin(x):
    for _ in range(ITERATIONS): x = (x * 1103515245 + 12345) & MASK  # HOT:tss_restored
    return x


def tss_phase(x):
    """Thread B spins while thread A (this one) has corrupted B's slot.
    B never calls a PyGILState_* function (the only readers of the slot in
    a release build) between the corruption and the restore."""
    out = {}
    started, go, done = threading.Event(), threading.Event(), threading.Event()

    def worker():
        out["tstate"] = current_tstate()
        started.set()
        go.wait()
        y = tss_unmapped_spin(x)  # CALL:tss_unmapped
        done.set()
        go2.wait()
        y = tss_foreign_spin(y)  # CALL:tss_foreign
        done2.set()
        go3.wait()
        out["result"] = tss_restored_spin(y)  # CALL:tss_restored

    go2, done2, go3 = threading.Event(), threading.Event(), threading.Event()
    t = threading.Thread(target=worker, name="tss-victim")
    t.start()
    started.wait()
    slot = tss_slot(t.ident)
    if word(slot).value != out["tstate"]:
        raise RuntimeError(
            f"TSS slot {slot:#x} holds {word(slot).value:#x}, not the thread's "
            f"PyThreadState {out['tstate']:#x}: glibc layout not as expected")
    mine = current_tstate()
    with Corruption(slot, junk_address()):
        go.set()
        done.wait()  # CALL:tss_wait_unmapped
    with Corruption(slot, mine):
        go2.set()
        done2.wait()  # CALL:tss_wait_foreign
    go3.set()
    t.join()
    return out["result"]


PHASES = {
    "cycle": cycle_outer,
    "badcode": badcode_outer,
    "name": name_caller,
    "tss": tss_phase,
}


def main(args):
    names = [a for a in args if not a.startswith("--")]
    if names == ["all"]:
        names = list(PHASES)
    gc.disable()  # no collection walks a frame or code object mid-corruption
    print("ready", flush=True)
    if "--wait" in args:
        sys.stdin.readline()  # the profiler is attached
    rounds = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--rounds=")), 1)
    x = 1
    for _ in range(rounds):
        for name in names:
            x = PHASES[name](x)  # CALL:main
            print(f"done {name}", flush=True)
    print(f"result {x}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])  # CALL:module
