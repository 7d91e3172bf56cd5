"""Fixed pure-Python CPU work for `cargo xtask bench` (target slowdown).

Usage:
  bench_work.py TAG calibrate SECONDS   prints "units_per_sec N" (one thread)
  bench_work.py TAG run UNITS THREADS   prints "ready", waits for a line on
                                        stdin, does UNITS units of work split
                                        over THREADS threads, then prints
                                        "elapsed WALL_SECONDS cpu CPU_SECONDS"
                                        (CPU: the whole process, user +
                                        system) and exits.

TAG is ignored: it marks the command line so the benchmark's daemon only
profiles its own processes.
"""
import sys
import threading
import time


def unit():
    # Pure Python, no allocation-heavy or C-heavy calls: interpreter work only.
    total = 0
    for i in range(2_000):
        total += (i * i) % 7
    return total


def work(units):
    for _ in range(units):
        unit()


def calibrate(seconds):
    work(50)  # warm up
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        work(50)
        n += 50
    print(f"units_per_sec {n / (time.perf_counter() - start):.1f}", flush=True)


def run(units, threads):
    print("ready", flush=True)
    sys.stdin.readline()
    per = [units // threads + (1 if i < units % threads else 0) for i in range(threads)]
    start = time.perf_counter()
    cpu = time.process_time()
    if threads == 1:
        work(units)
    else:
        ts = [threading.Thread(target=work, args=(n,)) for n in per]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    wall = time.perf_counter() - start
    print(f"elapsed {wall:.6f} cpu {time.process_time() - cpu:.6f}", flush=True)


def main(args):
    mode = args[1]
    if mode == "calibrate":
        calibrate(float(args[2]))
    elif mode == "run":
        run(int(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
