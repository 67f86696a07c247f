"""Benchmark 'moe' (see moecl.bench): `python benchmarks/moe_layer.py [--tiny] [--json] [--repeats N]`, same as `moecl bench moe`."""

import sys

from moecl.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("moe"))
