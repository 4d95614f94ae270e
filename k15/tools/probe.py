"""Decode a run's stage on its problems: accuracy per task and level, and
the responses it got wrong.

  python -m k15.tools.probe --config experiments/vision.py \\
      --checkpoint /tmp/k15_vis:joint [--task rendered] [--show 3]

The held-out metrics average over tasks and levels; this shows where a
stage fails and what it writes there, e.g. a scene task answering the
same cells whatever the image, or a long chain transcribed instead of
computed:

  [rendered L6] want ' 2 3 6 7 9 6 5. answer: 5'  got ' 2 3 4 7+3+3+2-2-1-1'
  ...
  task      n    L2    L3    L4    L5    L6   all
  rendered  100  1.00  0.96  0.00  0.00  0.05  0.36

`--checkpoint` is a source as `config.init` takes it (`k15.sources`):
DIR:stage, or DIR:stage@step for a kept step; DIR is one seed's workdir
(DIR/seed_1 of a `--seeds` run). The config is the run's own experiment
file and overrides (the same problems, tokenizer and model); nothing in
DIR is written. Decoding is greedy unless `--temperature` > 0; the
responses are scored as evaluation scores them, by the problems' own
reward kinds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys


@dataclasses.dataclass(frozen=True)
class Failure:
  task: str
  level: int
  question: str
  want: str  # the reference trace (or the answer when there is none)
  got: str


@dataclasses.dataclass(frozen=True)
class Report:
  source: str
  # (task, level) -> (correct, total)
  counts: dict[tuple[str, int], tuple[int, int]]
  failures: list[Failure]  # at most `show` per task, in problem order

  def accuracy(self, task: str, level: int | None = None) -> float:
    got = [c for (t, lv), c in self.counts.items()
           if t == task and level in (None, lv)]  # fmt: skip
    n = sum(c[1] for c in got)
    return sum(c[0] for c in got) / n if n else float("nan")

  def table(self) -> str:
    """Accuracy per task (rows) and level (columns), with counts."""
    tasks = list(dict.fromkeys(t for t, _ in self.counts))
    levels = sorted({lv for _, lv in self.counts})
    w = max(len(t) for t in tasks + ["task"])
    head = f"{'task':<{w}}  {'n':>4}" + "".join(f"  {'L' + str(lv):>4}"
                                               for lv in levels)  # fmt: skip
    lines = [head + "   all"]
    for t in tasks:
      n = sum(c[1] for (tt, _), c in self.counts.items() if tt == t)
      cells = "".join(
        f"  {self.accuracy(t, lv):4.2f}" if (t, lv) in self.counts
        else "     -" for lv in levels)  # fmt: skip
      lines.append(f"{t:<{w}}  {n:>4}{cells}  {self.accuracy(t):4.2f}")
    return "\n".join(lines)


def _task(p, default: str) -> str:
  """The row's task of a mix (visual), its domain (prompt files), else
  the run's task name."""
  return getattr(p, "task", "") or getattr(p, "domain", "") or default


def probe(config, checkpoint: str, *, split: str = "eval", task: str = "",
          show: int = 3, temperature: float = 0.0, max_problems: int = 0,
          seed: int = 0) -> Report:  # fmt: skip
  """Decodes `checkpoint` (DIR:stage[@step]) on the `split` problems of
  the run `config` describes (`task`: one task's only)."""
  import jax  # noqa: PLC0415

  from k15 import (  # noqa: PLC0415
    config_lib,
    evaluate,
    pipeline,
    rewards,
    sharding,
    sources,
    tasks,
    train,
  )
  from k15 import images as images_lib  # noqa: PLC0415
  from k15 import tokenizer as tokenizer_lib  # noqa: PLC0415
  from k15.rollout import generation  # noqa: PLC0415

  src = sources.resolve(sources.parse(checkpoint, "--checkpoint"),
                        "--checkpoint")  # fmt: skip
  if src.kind != "run":
    raise config_lib.ConfigError(
      f"--checkpoint={checkpoint!r}: name a run's stage, DIR:stage[@step]")
  tok_file = sources.tokenizer_file(src)
  if not tok_file:
    raise FileNotFoundError(f"--checkpoint: no tokenizer.model in {src.path}")
  tok = tokenizer_lib.load(tok_file)
  s = pipeline.settings(config, vocab_size=tok.vocab_size,
                        num_devices=jax.device_count())  # fmt: skip
  problems = s.task.splits(src.path)
  if split not in problems:
    raise config_lib.ConfigError(
      f"--split={split!r}: one of {sorted(problems)}")
  name = functools.partial(_task, default=s.task.name)
  probs = [p for p in problems[split] if not task or name(p) == task]
  if not probs:
    have = sorted({name(p) for p in problems[split]})
    raise config_lib.ConfigError(
      f"--task={task!r}: the {split} problems' tasks are {have}")
  if max_problems:
    probs = probs[:max_problems]
  mesh = sharding.make_mesh(s.mesh)
  abstract = train.sharded_abstract_state(
    s.model, train.make_optimizer(s.optim), mesh)
  params = sources.load_params(src, model=s.model,
                               abstract_params=abstract.params,
                               field="--checkpoint")  # fmt: skip
  enc = [images_lib.encode_problem(tok, p, model=s.model,
                                   where=f"{split} problem {i}")
         for i, p in enumerate(probs)]  # fmt: skip
  sampling = dataclasses.replace(
    s.sampler, temperature=temperature,
    stop_tokens=tuple(s.sampler.stop_tokens) or (tok.eos_id,))
  pool = rewards.RewardPool(s.reward.backends(), verifiers=tasks.verifiers())
  try:
    with sharding.mesh_context(mesh):
      gens = generation.generate(
        params, [e[0] for e in enc], jax.random.key(seed), model=s.model,
        sampling=sampling, gen=s.eval.gen(s.rollout.gen), pad_id=tok.pad_id,
        shard_fn=lambda t: sharding.shard_batch(t, mesh),
        images=[e[1] for e in enc])
    scores = evaluate.score_responses(tok, gens, [p.to_item() for p in probs],
                                      pool)  # fmt: skip
  finally:
    pool.close()
  counts: dict[tuple[str, int], list[int]] = collections.defaultdict(
    lambda: [0, 0])
  failures, shown = [], collections.Counter()
  for p, g, ok in zip(probs, gens, scores, strict=True):
    key = (name(p), int(getattr(p, "difficulty", 0)))
    counts[key][0] += bool(ok > 0)
    counts[key][1] += 1
    if ok <= 0 and shown[key[0]] < show:
      shown[key[0]] += 1
      failures.append(Failure(
        key[0], key[1], p.question, getattr(p, "trace", "") or p.answer,
        tok.decode([t for t in g.response.tolist() if t != tok.eos_id])))
  return Report(src.spec, {k: tuple(v) for k, v in counts.items()},
                failures)


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    "config", None, "The run's experiment file and overrides, e.g. "
    "experiments/vision.py:seed=1", lock_config=True)
  flags.DEFINE_string(
    "checkpoint", None, "DIR:stage or DIR:stage@step of a k15 run.")
  flags.DEFINE_string("split", "eval", "Problem set: sft, rl or eval.")
  flags.DEFINE_string("task", "", "Only this task's problems (default all).")
  flags.DEFINE_integer("show", 3, "Failed responses printed per task.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy decoding.")
  flags.DEFINE_integer("max_problems", 0, "At most this many (0: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (temperature > 0).")
  flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    rep = probe(f.config, f.checkpoint, split=f.split, task=f.task,
                show=f.show, temperature=f.temperature,
                max_problems=f.max_problems, seed=f.seed)  # fmt: skip
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    sys.exit(f"k15.tools.probe: error: {e}")
  for x in rep.failures:
    print(f"[{x.task} L{x.level}] Q={x.question!r} want={x.want!r} "
          f"got={x.got!r}")  # fmt: skip
  print(rep.table(), flush=True)


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
