"""The workload of `cargo xtask bench --modes`: a service-like process whose
time goes to pure Python, C code and waiting.

Usage: bench_modes.py TAG SECONDS
  a worker thread alternates a pure-Python loop with zlib.crc32 of a 1 MiB
  buffer (C code, the GIL released); two threads wake every millisecond
  (time.sleep), two wait on a queue that never fills (idle threads).
Prints "ready", waits for "go" on stdin, works SECONDS, prints
"units N" (work units done by the worker), and exits.
"""
import queue
import sys
import threading
import time
import zlib

DATA = bytes(range(256)) * 4096
stop = threading.Event()


def python_part(n):
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) % 1000003
    return acc


def worker(out):
    units = 0
    while not stop.is_set():
        python_part(2000)
        zlib.crc32(DATA)
        units += 1
    out.append(units)


def ticker():
    while not stop.is_set():
        time.sleep(0.001)


def idle(q):
    q.get()


def main():
    secs = float(sys.argv[2])
    q = queue.Queue()
    for _ in range(2):
        threading.Thread(target=ticker, daemon=True).start()
        threading.Thread(target=idle, args=(q,), daemon=True).start()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    out = []
    w = threading.Thread(target=worker, args=(out,))
    w.start()
    time.sleep(secs)
    stop.set()
    w.join()
    print(f"units {out[0]}", flush=True)


main()
