"""Alias: `python -m k15.bench NAME [args...]` runs k15.tools.bench NAME."""

import sys

from k15.tools.bench import __main__ as bench_main

if __name__ == "__main__":
  bench_main.run(sys.argv[1:])
