"""Every shape of Python frame, with the interpreter's own view of its stacks.

The main thread runs the scenarios below in a loop, each burning a slice of
CPU on one line. A truth thread samples the main thread with
sys._current_frames() every 2 ms: each frame's line is the interpreter's own
answer (f_lineno, from the code object's location table), so a profiler's
stacks can be checked against ground truth that this very interpreter
produced, whatever its version. A `hash` argument adds a thread that hashes
with the GIL released (its stack is checked separately, from the markers).

Works on CPython 3.11 to 3.15. Commands on stdin, one per line:
  reset   forget the truth collected so far
  truth   print {"samples": N, "stacks": {"frame;frame;...": count}} (root
          first, frames `qualname (filename:line)`) as one JSON line
Prints "ready" once the loop runs.
"""
import hashlib
import json
import sys
import threading
import time

SLICE = 0.02  # CPU seconds per scenario step


def plain(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:plain


class Worker:
    def method(self, seconds=SLICE):
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:method

    @staticmethod
    def static(seconds=SLICE):
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:static


def outer(seconds=SLICE):
    def inner():
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:nested
    inner()  # CALL:nested


busy_lambda = lambda n: sum(range(n))  # HOT:lambda


def call_lambda(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        busy_lambda(50_000)  # CALL:lambda


def comprehensions(seconds=SLICE):
    # A list comprehension (its own frame in 3.11, inlined from 3.12) and a
    # generator expression (a frame in every version).
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        [x * x for x in range(5_000)]  # HOT:listcomp
        sum(x * x for x in range(5_000))  # HOT:genexpr


def counting_generator(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: yield None  # HOT:generator


def consume_generator(seconds=SLICE):
    for _ in counting_generator(seconds): pass  # CALL:generator


async def busy_coroutine(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:coroutine


async def coroutine_main(seconds):
    await busy_coroutine(seconds)  # CALL:coroutine


def drive_coroutine(seconds=SLICE):
    # Driven by hand: the stack is the coroutines, no event loop in between.
    coro = coroutine_main(seconds)
    try:
        coro.send(None)  # CALL:drive
    except StopIteration:
        pass


class Point:
    # Instances created in a hot loop: 3.13+ specialise the call into a
    # `__init__` run behind an interpreter shim frame, which must not show.
    def __init__(self, seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:init


def make_points(seconds=SLICE):
    for _ in range(8):
        Point(seconds / 8)  # CALL:init


def leaf_from_c(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:from_c


def call_through_c(seconds=SLICE):
    # map() calls back into Python from C: an interpreter entry frame sits
    # between the two Python frames in 3.12+.
    list(map(leaf_from_c, [seconds / 4] * 4))  # CALL:from_c


def café(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:latin1


def функция(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:ucs2


def 𠀀(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:ucs4


SCENARIOS = [plain, Worker().method, Worker.static, outer, call_lambda,
             comprehensions, consume_generator, drive_coroutine, make_points,
             call_through_c, café, функция, 𠀀]


def hash_worker():
    data = b"\x5a" * (8 << 20)
    while True:
        hashlib.sha256(data).digest()  # HOT:hash


def frame_text(f):
    code = f.f_code
    return "%s (%s:%s)" % (code.co_qualname.replace(";", ":"), code.co_filename, f.f_lineno)


class Truth:
    """The main thread's stacks as the interpreter reports them."""

    def __init__(self, ident):
        self.ident = ident
        self.lock = threading.Lock()
        self.stacks = {}
        self.samples = 0

    def run(self):
        while True:
            frame = sys._current_frames().get(self.ident)
            if frame is not None:
                names = []
                while frame is not None:
                    names.append(frame_text(frame))
                    frame = frame.f_back
                key = ";".join(reversed(names))
                with self.lock:
                    self.stacks[key] = self.stacks.get(key, 0) + 1
                    self.samples += 1
            del frame
            time.sleep(0.002)

    def commands(self):
        for line in sys.stdin:
            with self.lock:
                if line.strip() == "reset":
                    self.stacks, self.samples = {}, 0
                    print("reset", flush=True)
                elif line.strip() == "truth":
                    print(json.dumps({"samples": self.samples, "stacks": self.stacks}), flush=True)


def loop_forever():
    while True:
        for step in SCENARIOS:
            step()  # CALL:loop


def main(args):
    truth = Truth(threading.get_ident())
    threading.Thread(target=truth.run, daemon=True).start()
    threading.Thread(target=truth.commands, daemon=True).start()
    if "hash" in args:
        threading.Thread(target=hash_worker, daemon=True).start()
    print("ready", flush=True)
    loop_forever()


if __name__ == "__main__":
    main(sys.argv[1:])  # CALL:main
