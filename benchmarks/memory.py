"""Benchmark 'memory' (see moecl.bench_memory): `python benchmarks/memory.py [--tiny] [--json]`, same as `moecl bench memory`."""

import sys

from moecl.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("memory"))
