"""Prints `ready <sys.hexversion> <os.getpid()>`, then sleeps until killed.

The smoke test of the Debian-root interpreters (profiler-daemon/tests/roots_smoke.rs).
"""
import os
import sys
import time

print("ready", sys.hexversion, os.getpid(), flush=True)
while True:
    time.sleep(3600)
