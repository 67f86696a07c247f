"""Every benchmark (moe, step, selector, data) plus the markdown table of docs/performance.md, then `dist` (1 and
2 launched processes; only --tiny and --json are passed on to it):
`python benchmarks/all.py [--tiny] [--json] [--repeats N]`. Ratios only mean something measured in one run on
one machine; nothing here is part of the test suite."""

import sys

from moecl.bench import script_main
from moecl.bench_dist import script_main as dist_main

if __name__ == "__main__":
    sys.exit(script_main(None) or dist_main([flag for flag in ("--tiny", "--json") if flag in sys.argv[1:]]))
