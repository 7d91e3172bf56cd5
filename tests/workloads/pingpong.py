"""Two threads handing a byte back and forth through two pipes: a steady
stream of context switches (each hand-off blocks one thread in read() and
wakes the other), for the off-CPU cost measurement (`cargo xtask bench
--offcpu`).

Usage: pingpong.py ROUNDS_PER_SEC | pingpong.py idle
Prints "ready", then hands off until killed, pacing itself to about
ROUNDS_PER_SEC round trips a second (three blocking waits each: the two
reads and the pacing sleep); "idle" only sleeps.
"""
import os
import sys
import threading
import time


def server(inbox, outbox, pause):
    while True:
        os.write(outbox, b"x")
        os.read(inbox, 1)  # WAIT:read
        time.sleep(pause)  # WAIT:pace


def echo(inbox, outbox):
    while True:
        os.read(inbox, 1)  # WAIT:echo
        os.write(outbox, b"x")


def main():
    if sys.argv[1:] == ["idle"]:
        print("ready", flush=True)
        while True:
            time.sleep(3600)
    a_in, b_out = os.pipe()
    b_in, a_out = os.pipe()
    pause = 1.0 / float(sys.argv[1])
    threading.Thread(target=server, args=(a_in, a_out, pause), daemon=True).start()
    threading.Thread(target=echo, args=(b_in, b_out), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
