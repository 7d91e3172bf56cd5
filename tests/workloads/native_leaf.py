"""Threads in C code, for pyebpf's native-leaf tests.

Lines marked `# HOT:<name>` are where a thread spends its time; tests read
the markers from this file, so line numbers are never hard-coded.

  checksum: zlib.crc32 of a 64 MiB buffer, over and over (in libz, with the
            GIL released);
  digest:   hashlib.sha256 of the same buffer (in libcrypto);
  spin:     a pure-Python loop (in the eval loop: no native leaf).
Prints "ready" once every thread runs, then each thread's native id (one
line, `name=tid` pairs); runs until stdin closes.
"""
import hashlib
import sys
import threading
import zlib

DATA = bytes(range(256)) * (1 << 18)
started = threading.Barrier(4)
tids = {}


def checksum():
    tids["checksum"] = threading.get_native_id()
    started.wait()
    while True:
        zlib.crc32(DATA)  # HOT:checksum


def digest():
    tids["digest"] = threading.get_native_id()
    started.wait()
    while True:
        hashlib.sha256(DATA).digest()  # HOT:digest


def spin():
    tids["spin"] = threading.get_native_id()
    started.wait()
    n = 0
    while True:
        n = (n * 31 + 7) % 1000003  # HOT:spin


for f in (checksum, digest, spin):
    threading.Thread(target=f, name=f.__name__, daemon=True).start()
started.wait()
print("ready", flush=True)
print(" ".join(f"{k}={v}" for k, v in sorted(tids.items())), flush=True)
sys.stdin.read()
