#!/usr/bin/env python3
"""Ground truth for the co_linetable decoder.

Compiles every .py file of this interpreter's standard library (or the paths
given as arguments), walks all code objects through co_consts and writes one
JSON line per code object:
  {"first": co_firstlineno, "table": co_linetable hex, "n": code units,
   "lines": [line or null for each code unit, from co_positions()]}
A final line {"done": <objects>, "files": <files>, "skipped": <files>} lets
the consumer check the stream was not cut short.
"""
import json
import os
import sys
import sysconfig
import types
import warnings


def py_files(roots):
    for root in roots:
        if os.path.isfile(root):
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            # site-packages is not the stdlib; keep the corpus reproducible.
            dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def code_objects(code):
    stack = [code]
    while stack:
        co = stack.pop()
        yield co
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))


def main():
    warnings.simplefilter("ignore")  # SyntaxWarnings from odd test files
    roots = sys.argv[1:] or [sysconfig.get_paths()["stdlib"]]
    out = sys.stdout
    objects = files = skipped = 0
    for path in py_files(roots):
        try:
            with open(path, "rb") as f:
                source = f.read()
            top = compile(source, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            # e.g. lib2to3 test data written in Python 2, deliberately bad files.
            skipped += 1
            continue
        files += 1
        for co in code_objects(top):
            n = len(co.co_code) // 2
            lines = [p[0] for p in co.co_positions()]
            if len(lines) != n:
                raise SystemExit(f"{path}: {co.co_qualname}: {len(lines)} positions for {n} units")
            out.write(json.dumps({
                "first": co.co_firstlineno,
                "table": co.co_linetable.hex(),
                "n": n,
                "lines": lines,
            }, separators=(",", ":")))
            out.write("\n")
            objects += 1
    out.write(json.dumps({"done": objects, "files": files, "skipped": skipped}) + "\n")


if __name__ == "__main__":
    main()
