"""Processes for `cargo xtask bench --scale`.

Usage: scale_procs.py TAG ROLE INDEX [ARGS...]

Roles:
  idle FUNCS PERIOD BURST  creates FUNCS distinct functions (names and file
                           unique to INDEX), then sleeps PERIOD seconds between
                           bursts of BURST CPU seconds that run them all, so
                           each process holds its own code objects on sampled
                           stacks while staying mostly idle.
  busy FUNCS DUTY          the same, but on CPU DUTY of each 20 ms.
  hostile                  as fast as it can: exec()s freshly generated
                           mutually recursive functions and recurses into
                           them to a random depth of 50 to 1500, so nearly
                           every sample is a new stack of new code objects.

Prints "ready" once set up.
"""
import random
import sys
import time


def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end: pass


def make_functions(index, funcs, chain=10):
    """FUNCS functions in chains of CHAIN; each chain's head is returned."""
    heads = []
    for c in range((funcs + chain - 1) // chain):
        n = min(chain, funcs - c * chain)
        src = []
        for i in range(n):
            callee = f"p{index}_c{c}_f{i + 1}(s)" if i + 1 < n else "burn(s)"
            src.append(f"def p{index}_c{c}_f{i}(s):\n    return {callee}\n")
        ns = {"burn": burn}
        exec(compile("".join(src), f"<scale proc {index} chain {c}>", "exec"), ns)
        heads.append(ns[f"p{index}_c{c}_f0"])
    return heads


def run_chains(heads, seconds):
    each = seconds / len(heads)
    for h in heads:
        h(each)


def idle(index, funcs, period, burst):
    heads = make_functions(index, funcs)
    print("ready", flush=True)
    # Spread the bursts of many processes over the period.
    time.sleep(random.random() * period)
    while True:
        run_chains(heads, burst)
        time.sleep(period)


def busy(index, funcs, duty):
    heads = make_functions(index, funcs)
    print("ready", flush=True)
    while True:
        run_chains(heads, 0.02 * duty)
        time.sleep(0.02 * (1 - duty))


def hostile(index):
    sys.setrecursionlimit(5000)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        # Three mutually recursive functions, new code objects every round,
        # with a varying line for the recursive call.
        pad = "\n" * random.randrange(8)
        src = (
            f"def h{n}_a(d):\n{pad}    return h{n}_b(d - 1) if d > 0 else burn(0.0005)\n"
            f"def h{n}_b(d):\n    return h{n}_c(d - 1) if d > 0 else burn(0.0005)\n"
            f"def h{n}_c(d):\n    return h{n}_a(d - 1) if d > 0 else burn(0.0005)\n"
        )
        ns = {"burn": burn}
        exec(compile(src, f"<hostile {index} gen {n}>", "exec"), ns)
        ns[f"h{n}_a"](random.randint(50, 1500))


def main(args):
    role, index = args[1], int(args[2])
    if role == "idle":
        idle(index, int(args[3]), float(args[4]), float(args[5]))
    elif role == "busy":
        busy(index, int(args[3]), float(args[4]))
    elif role == "hostile":
        hostile(index)
    else:
        sys.exit(f"unknown role {role}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
