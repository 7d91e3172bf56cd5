"""Workloads with known hot lines, for pyebpf's end-to-end tests.

Lines marked `# HOT:<name>` are where a scenario burns its CPU; lines marked
`# CALL:<name>` are the call sites on the way there. Tests read these markers
from this file, so line numbers are never hard-coded anywhere.

Usage: scenarios.py SCENARIO [SCENARIO ...]
Prints "ready" once set up, then runs the scenarios in a loop until killed
(or, for `exit-after`, until its time is up).
"""
import asyncio
import hashlib
import sys
import threading
import time

SLICE = 0.05  # CPU seconds per scenario step


def cpu_until(end):
    return time.thread_time() >= end


def plain_function(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:plain


class Worker:
    def method(self, seconds=SLICE):
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:method


def outer(seconds=SLICE):
    def inner():
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:nested
    inner()  # CALL:nested


busy_lambda = lambda n: sum(range(n))  # HOT:lambda


def call_lambda(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        busy_lambda(200_000)  # CALL:lambda


def comprehension(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        [x * x for x in range(20_000)]  # HOT:comprehension


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


def run_coroutine(seconds=SLICE):
    asyncio.run(coroutine_main(seconds))


def café(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:latin1


def функция(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:ucs2


def 𠀀(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:ucs4


def hash_worker():
    data = b"\x5a" * (32 << 20)
    while True:
        hashlib.sha256(data).digest()  # HOT:hash


def recurse(n, seconds):
    if n == 0:
        end = time.thread_time() + seconds
        while time.thread_time() < end: pass  # HOT:recurse
        return
    recurse(n - 1, seconds)  # CALL:recurse


def split_a(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:split_a


def split_b(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:split_b


def split_c(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass  # HOT:split_c


SHORT_LIVED_SOURCE = """
def short_lived_{n}(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass
"""
short_lived_count = 0


def short_lived():
    # A function compiled, run for 20 ms of CPU and dropped: its code object
    # is freed right after, so a profiler must read it while it runs. Each
    # starts (n % 50) lines lower, so a successor allocated at the same
    # address never looks like the same code object; its hot line is then
    # 4 + n % 50.
    global short_lived_count
    n = short_lived_count = short_lived_count + 1
    scope = {"time": time}
    source = "\n" * (n % 50) + SHORT_LIVED_SOURCE.format(n=n)
    exec(compile(source, "<short-lived>", "exec"), scope)
    # Popped, so no cycle (scope -> function -> its globals, scope) keeps
    # the function alive until a garbage collection.
    fn = scope.pop("short_lived_%d" % n)
    fn(0.02)  # CALL:short_lived


UNIQUE_SOURCE = """
def unique_{n}(depth, seconds):
    if depth:
        return unique_{n}(depth - 1, seconds)
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass
"""
unique_kept = []


def unique_stacks():
    # A new function per call, kept alive (so it can be read), recursing
    # 50 to 249 deep: every sample is a stack never seen before, the
    # hostile case for a profiler's memory.
    n = len(unique_kept)
    scope = {"time": time}
    exec(compile(UNIQUE_SOURCE.format(n=n), "<gen-%d>" % n, "exec"), scope)
    fn = scope["unique_%d" % n]
    if n < 50_000:
        unique_kept.append(fn)
    fn(50 + n * 37 % 200, 0.003)


def cpu_split():
    # True CPU split 1 : 2 : 3, measured in thread CPU time so that a busy
    # machine changes wall time but not the split.
    split_a(0.02)
    split_b(0.04)
    split_c(0.06)


SEQUENCE = {
    "plain": plain_function,
    "method": Worker().method,
    "nested": outer,
    "lambda": call_lambda,
    "comprehension": comprehension,
    "generator": consume_generator,
    "coroutine": run_coroutine,
    "latin1": café,
    "ucs2": функция,
    "ucs4": 𠀀,
    "split": cpu_split,
    "short-lived": short_lived,
    "unique-stacks": unique_stacks,
}


def loop_forever(steps):
    while True:
        for step in steps:
            step()  # CALL:loop


def main(args):
    names = args or ["all"]
    threads = []
    steps = []
    for name in names:
        if name == "all":
            steps.extend(SEQUENCE[n] for n in
                         ["plain", "method", "nested", "lambda", "comprehension",
                          "generator", "coroutine", "latin1", "ucs2", "ucs4"])
        elif name == "hash-thread":
            threads.append(threading.Thread(target=hash_worker, daemon=True))
        elif name.startswith("thread:"):
            fn = SEQUENCE[name.split(":", 1)[1]]
            threads.append(threading.Thread(target=loop_forever, args=([fn],), daemon=True))
        elif name.startswith("recurse:"):
            depth = int(name.split(":", 1)[1])
            sys.setrecursionlimit(depth + 1000)
            steps.append(lambda d=depth: recurse(d, SLICE))
        elif name.startswith("exit-after:"):
            seconds = float(name.split(":", 1)[1])
            threading.Timer(seconds, lambda: __import__("os")._exit(0)).start()
        elif name.startswith("exit-after-cpu:"):
            # After this much CPU time of the process, however busy the
            # machine: the samples it gets do not depend on the load.
            seconds = float(name.split(":", 1)[1])

            def exit_after_cpu(limit=seconds):
                while time.process_time() < limit:
                    time.sleep(0.01)
                __import__("os")._exit(0)
            threading.Thread(target=exit_after_cpu, daemon=True).start()
        elif name.startswith("--tag="):
            pass  # only there for a test's discovery rule to match
        elif name == "idle":
            steps.append(lambda: time.sleep(0.1))
        else:
            steps.append(SEQUENCE[name])
    for t in threads:
        t.start()
    print("ready", flush=True)
    if not steps:
        steps.append(lambda: time.sleep(0.1))
    loop_forever(steps)


if __name__ == "__main__":
    main(sys.argv[1:])  # CALL:main
