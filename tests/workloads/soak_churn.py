"""Thread churn beside the gunicorn soak of `cargo xtask soak`.

Usage: soak_churn.py TAG THREADS

Keeps about THREADS Python threads alive, each living a few milliseconds
(a little work, a short sleep) before it ends and the main loop starts a
replacement: threads are born and die continuously, so the profiler keeps
meeting thread states being created and torn down. TAG only marks the
command line for the daemon's include rule. Prints "ready" once running.
"""
import random
import sys
import threading
import time


def churn(n):
    total = sum(i * i for i in range(n))  # HOT:churn
    time.sleep(random.uniform(0.01, 0.05))
    return total


def main(args):
    slots = int(args[1])
    alive = []
    print("ready", flush=True)
    while True:
        alive = [t for t in alive if t.is_alive()]
        while len(alive) < slots:
            t = threading.Thread(target=churn, args=(random.randint(100, 1000),))
            t.start()
            alive.append(t)
        time.sleep(0.002)


if __name__ == "__main__":
    main(sys.argv[1:])
