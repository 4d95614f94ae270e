"""Dispatch `python -m k15.bench NAME [args...]` to `k15.bench.NAME.main`.

Each benchmark prints ratios measured in the same run (speed targets are never
asserted by timed tests).
"""

import importlib
import pkgutil
import sys

import k15.bench


def _names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(k15.bench.__path__)
                if not m.name.startswith("_"))


def run(argv: list[str]) -> None:
  if len(argv) < 1 or argv[0] not in _names():
    sys.exit(f"usage: python -m k15.bench {{{','.join(_names())}}} [flags]")
  module = importlib.import_module(f"k15.bench.{argv[0]}")
  module.main(argv[1:])


if __name__ == "__main__":
  run(sys.argv[1:])
