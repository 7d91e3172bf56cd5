"""scenarios.py's `recurse` and `split` in one process that switches between them.

Usage: bench_versions.py TAG MODE

MODE is `recurse:N` (one busy thread whose stack is `recurse` N + 1 times under
`<module>`, `main` and `run`), `split` (scenarios.py's 1 : 2 : 3 CPU split) or
`idle` (waits for stdin, off CPU). Prints "ready", then runs MODE in steps of
scenarios.SLICE seconds of CPU. Between steps it reads stdin without blocking: a
line with another MODE switches to it (and prints "mode MODE" before the first step
of the new mode); end of input exits.

The benchmark (section 7, CPython versions) keeps one process per interpreter and
has one recorder measure several modes, and several processes, in turn, so that
interpreters and recorders are started rarely.
Written for every CPython the benchmark runs (3.11 and newer); TAG marks the
command line, as in bench_scenarios.py. Frames, files and `# HOT:` lines of the
work are those of scenarios.py.
"""
import os
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios  # noqa: E402


def parse(mode):
    mode = mode.strip()
    if mode in ("split", "idle"):
        return (mode, 0)
    if mode.startswith("recurse:"):
        return ("recurse", int(mode.split(":", 1)[1]))
    raise SystemExit("unknown mode %r" % mode)


def run(mode):
    if mode[0] == "recurse":
        scenarios.recurse(mode[1], scenarios.SLICE)
    elif mode[0] == "split":
        scenarios.cpu_split()
    else:
        select.select([sys.stdin], [], [], 0.1)


def main(args):
    mode = parse(args[0])
    sys.setrecursionlimit(10000)
    print("ready", flush=True)
    while True:
        run(mode)
        if select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline()
            if not line:
                return
            mode = parse(line)
            print("mode", line.strip(), flush=True)


if __name__ == "__main__":
    main(sys.argv[2:])
