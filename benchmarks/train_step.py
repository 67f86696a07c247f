"""Benchmark 'step' (see moecl.bench): `python benchmarks/train_step.py [--tiny] [--json] [--repeats N]`, same as `moecl bench step`."""

import sys

from moecl.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("step"))
