"""Runs scenarios.py's workloads under a tagged command line.

Usage: bench_scenarios.py TAG SCENARIO [SCENARIO ...]

The benchmark's daemon selects its processes by TAG (a discovery include
rule on the command line); scenarios.py itself takes only scenario names.
Frames, files and `# HOT:` lines stay those of scenarios.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios  # noqa: E402

if __name__ == "__main__":
    scenarios.main(sys.argv[2:])
