"""Benchmark 'dist' (see moecl.bench_dist): `python benchmarks/dist.py [--tiny] [--json] [--processes 1,2]
[--threads T] [--repeats R]`, same as `moecl bench dist`."""

import sys

from moecl.bench_dist import script_main

if __name__ == "__main__":
    sys.exit(script_main())
