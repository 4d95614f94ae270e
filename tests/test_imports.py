"""The import graph of k15/ goes down the floors: no cycles, and rewards/
stays a leaf that imports nothing that trains or samples.

A small AST scan of every module under k15/ (function-level imports
included: a lazy import is still a dependency). No module is imported.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "k15")
# what rewards/ may not import (DESIGN.md: rewards is a leaf)
NOT_FROM_REWARDS = ("k15.train", "k15.rollout", "k15.sampler", "k15.stages")


def _modules() -> dict[str, str]:
  """Dotted module name -> file, packages as their __init__."""
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(d, f), ROOT)[: -len(".py")]
      name = rel.replace(os.sep, ".").removesuffix(".__init__")
      out[name] = os.path.join(d, f)
  return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
  """The k15 modules `name` imports (a package's submodule when the
  imported name is one, else the package)."""
  is_pkg = path.endswith("__init__.py")
  base = name if is_pkg else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if node.level:
        parts = base.split(".")
        parts = parts[: len(parts) - node.level + 1]
        mod = ".".join(parts + ([mod] if mod else []))
      targets = [
        f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
        for a in node.names
      ]
    else:
      continue
    for t in targets:
      while t and t not in known:  # `import k15.x.y` -> the longest known
        t = t.rpartition(".")[0]
      if t and t != name:
        out.add(t)
  return out


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_scan_sees_the_known_edges():
  g = _graph()
  assert "k15.sampler" in g["k15.rollout.generation"]
  assert "k15.stages.common" in g["k15.stages.rl"]
  assert "k15.model" in g["k15.train"]
  assert "k15.pipeline" in g["k15.main"]  # a function-level import


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_cycles_are_found():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(g) == [["a", "b", "c"]]


def test_rewards_import_no_training_or_sampling():
  g = _graph()
  bad = sorted(
    f"{m} -> {t}"
    for m, ts in g.items()
    if m == "k15.rewards" or m.startswith("k15.rewards.")
    for t in ts
    if any(t == f or t.startswith(f + ".") for f in NOT_FROM_REWARDS)
  )
  assert bad == []


def _private_uses(path: str, known: set[str]) -> list[str]:
  """`alias._name` where alias is an imported k15 module, and
  `from k15.x import _name`: another module's private helper."""
  tree = ast.parse(open(path).read(), path)
  aliases, out = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      aliases |= {a.asname or a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
      "k15"
    ):
      for a in node.names:
        if f"{node.module}.{a.name}" in known:
          aliases.add(a.asname or a.name)
        elif a.name.startswith("_"):
          out.append(f"from {node.module} import {a.name}")
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      out.append(f"{node.value.id}.{node.attr}")
  return out


# Uses that predate this check; nothing may be added.
KNOWN_PRIVATE_USES: dict[str, set[str]] = {}


def test_no_private_helpers_across_modules():
  mods = _modules()
  bad = {}
  for m, p in mods.items():
    uses = set(_private_uses(p, set(mods))) - KNOWN_PRIVATE_USES.get(m, set())
    if uses:
      bad[m] = sorted(uses)
  assert bad == {}


# Who may read the environment: the entry point, the fault hooks (their
# variables are the one way into a subprocess run), and code that builds a
# child process's environment.
ENV_MODULES = {"k15.main", "k15.faults"}
ENV_FUNCTIONS = {
  ("k15.tools.plan", "_run_child"),
  ("k15.tools.bench.attention", "_run_one"),
  ("k15.rewards.workers", "__init__"),  # _Worker: the worker process's env
}


def _env_reads(path: str) -> list[tuple[str, int]]:
  """(enclosing function, line) of every os.environ / os.getenv."""
  out = []

  def visit(node, func):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      func = node.name
    if (
      isinstance(node, ast.Attribute)
      and node.attr in ("environ", "getenv")
      and isinstance(node.value, ast.Name)
      and node.value.id == "os"
    ):
      out.append((func, node.lineno))
    for child in ast.iter_child_nodes(node):
      visit(child, func)

  visit(ast.parse(open(path).read(), path), "<module>")
  return out


def test_only_main_faults_and_child_builders_read_the_environment():
  bad = [
    f"{m}:{line} ({func})"
    for m, p in _modules().items()
    if m not in ENV_MODULES
    for func, line in _env_reads(p)
    if (m, func) not in ENV_FUNCTIONS
  ]
  assert bad == []
