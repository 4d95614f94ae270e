"""Dispatch `python -m k15.tools.bench NAME [args...]` to the module
`k15.tools.bench.NAME`'s `main`.

Each benchmark prints ratios measured in the same run (speed targets are never
asserted by timed tests).
"""

import importlib
import pkgutil
import sys

import k15.tools.bench


def _names() -> list[str]:
  path = k15.tools.bench.__path__
  return sorted(
    m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")
  )


def run(argv: list[str]) -> None:
  if len(argv) < 1 or argv[0] not in _names():
    names = ",".join(_names())
    sys.exit(f"usage: python -m k15.tools.bench {{{names}}} [flags]")
  module = importlib.import_module(f"k15.tools.bench.{argv[0]}")
  module.main(argv[1:])


if __name__ == "__main__":
  run(sys.argv[1:])
