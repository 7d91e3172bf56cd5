"""Threads whose wall time is known, for pyebpf's off-CPU and wall tests.

Lines marked `# WAIT:<name>` are where a thread spends its time (blocked, or
burning CPU for `spin`); `# CALL:<name>` marks call sites. Tests read the
markers from this file, so line numbers are never hard-coded anywhere.

Usage: waits.py split | gil | kernel
  split: four workers, each at one place all the time:
         sleeper   in time.sleep,
         reader    in a blocking recv on a socketpair (a feeder thread sends
                   a byte every PERIOD),
         waiter    in threading.Lock.acquire (a holder thread keeps the lock
                   PERIOD at a time),
         spinner   in a pure-Python loop;
         the main thread and the helpers sleep PERIOD at a time.
  gil:   two pure-Python loops fighting for the GIL (each waits for it about
         half of the time) and a thread hashing a large buffer with
         hashlib (the GIL released while it hashes). Each line read on
         stdin is answered with the truth: a JSON object of the monotonic
         clock and each thread's CPU time (thread_time) so far.
  kernel: one thread reading /dev/zero 1 MiB at a time: on CPU, mostly
         in the kernel (clearing the buffer).
Prints "ready" once every thread runs; runs until killed.
"""
import hashlib
import json
import os
import socket
import sys
import threading
import time

# Longest a waiting thread blocks at once: the part of a wait the profiler
# cannot see at the recording's start and end (an interval is timed from
# a switch-out to a switch-in).
PERIOD = 0.05


def sleeper():
    while True:
        time.sleep(PERIOD)  # WAIT:sleep


def feeder(sock):
    while True:
        time.sleep(PERIOD)  # WAIT:feed
        sock.send(b"x")


def reader(sock):
    while True:
        sock.recv(1)  # WAIT:recv


def holder(lock, held):
    while True:
        with lock:
            held.set()
            time.sleep(PERIOD)  # WAIT:hold
        # Long enough for the waiter to take the lock and give it back.
        time.sleep(0.0005)  # WAIT:gap


def waiter(lock, held):
    held.wait()
    while True:
        lock.acquire()  # WAIT:lock
        lock.release()


def spinner():
    n = 0
    while True:
        n += 1  # WAIT:spin


# Each thread's CPU time (time.thread_time), as of its last report.
cpu = {}


def fighter(name):
    n = 0
    while True:
        n += 1  # WAIT:fight
        if n % 20000 == 0:
            cpu[name] = time.thread_time()


def hasher():
    data = bytes(64 << 20)
    while True:
        h = hashlib.sha256()
        h.update(data)  # WAIT:hash
        cpu["hasher"] = time.thread_time()


def zeros():
    fd = os.open("/dev/zero", os.O_RDONLY)
    while True:
        os.read(fd, 1 << 20)  # WAIT:zero


def start(target, *args):
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def split():
    a, b = socket.socketpair()
    lock, held = threading.Lock(), threading.Event()
    start(sleeper)
    start(feeder, a)
    start(reader, b)
    start(holder, lock, held)
    start(waiter, lock, held)
    start(spinner)


def gil():
    start(fighter, "a")
    start(fighter, "b")
    start(hasher)


def kernel():
    start(zeros)


def main():
    mode = sys.argv[1]
    {"split": split, "gil": gil, "kernel": kernel}[mode]()
    print("ready", flush=True)
    if mode == "gil":
        for _ in sys.stdin:
            print(json.dumps({"wall": time.monotonic(), "cpu": cpu}), flush=True)
    # Short sleeps, like every waiter: a thread blocked for the whole
    # recording is never seen (intervals are timed when they end).
    while True:
        time.sleep(PERIOD)  # WAIT:main


if __name__ == "__main__":
    main()
