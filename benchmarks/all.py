"""Every benchmark (moe, step, selector) plus the markdown table of docs/performance.md:
`python benchmarks/all.py [--tiny] [--json] [--repeats N]`. Ratios only mean something measured in one run on
one machine; nothing here is part of the test suite."""

import sys

from moecl.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main(None))
