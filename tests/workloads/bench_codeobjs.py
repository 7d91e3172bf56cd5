"""Many distinct code objects, all on sampled stacks (daemon memory benchmark).

Usage: bench_codeobjs.py TAG FUNCTIONS CHAIN [PAUSE]

Creates FUNCTIONS distinct functions with exec(compile(...)), as
FUNCTIONS / CHAIN call chains of CHAIN functions each (f_<c>_<i> calls
f_<c>_<i+1>), then calls the chains round-robin forever. The last function of
a chain burns a little CPU, so every sample holds a whole chain: all code
objects are sampled within seconds. PAUSE (seconds, default 0) is slept
after each chain, so that many such processes together do not take every
CPU. Prints "ready" once they exist.
"""
import sys
import time

SLICE = 0.004  # CPU seconds at the bottom of each chain


def burn(seconds=SLICE):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass


def make_chains(functions, chain):
    heads = []
    for c in range((functions + chain - 1) // chain):
        n = min(chain, functions - c * chain)
        lines = []
        for i in range(n):
            callee = f"f_{c}_{i + 1}()" if i + 1 < n else "burn()"
            lines.append(f"def f_{c}_{i}():\n    return {callee}\n")
        namespace = {"burn": burn}
        exec(compile("".join(lines), f"<generated chain {c}>", "exec"), namespace)
        heads.append(namespace[f"f_{c}_0"])
    return heads


def main(args):
    functions, chain = int(args[1]), int(args[2])
    pause = float(args[3]) if len(args) > 3 else 0.0
    sys.setrecursionlimit(chain + 1000)
    heads = make_chains(functions, chain)
    print("ready", flush=True)
    while True:
        for head in heads:
            head()
            if pause:
                time.sleep(pause)


if __name__ == "__main__":
    main(sys.argv[1:])
