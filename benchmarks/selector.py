"""Benchmark 'selector' (see moecl.bench): `python benchmarks/selector.py [--tiny] [--json] [--repeats N]`, same as `moecl bench selector`."""

import sys

from moecl.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("selector"))
