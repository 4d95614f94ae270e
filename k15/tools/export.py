"""Export a run's checkpoint as an HF (Llama / Qwen2) safetensors directory.

  python -m k15.tools.export --config experiments/tiny.py \\
      --checkpoint /tmp/k15_tiny:rl[@40] --out /tmp/tiny_hf [--family llama]

`--checkpoint` is a source as `config.init` takes it (`k15.sources`):
DIR:stage is the stage's final checkpoint, DIR:stage@step one it kept.
The config gives the architecture (the run's own experiment file and
overrides); the run's tokenizer is copied beside the weights
(tokenizer.model), and config.json names its pad/bos/eos ids. The result
is what transformers' `from_pretrained` loads, and what `config.init`
takes back: import(export(params)) == params exactly
(tests/test_sources.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any


def export(
  config,
  checkpoint: str,
  out: str,
  *,
  family: str = "llama",
  dtype: str | None = None,
) -> dict[str, Any]:
  """Writes `out`; returns what was exported (source, step, shapes)."""
  import jax  # noqa: PLC0415

  from k15 import config_lib, hf, pipeline, sharding, sources, train  # noqa: PLC0415
  from k15 import tokenizer as tokenizer_lib  # noqa: PLC0415

  src = sources.resolve(sources.parse(checkpoint, "--checkpoint"),
                        "--checkpoint")  # fmt: skip
  if src.kind != "run":
    raise config_lib.ConfigError(
      f"--checkpoint={checkpoint!r}: name a run's stage, DIR:stage[@step]"
    )
  pre = pipeline.settings(config)
  tok_file = (
    pre.tokenizer.path
    if pre.tokenizer.kind == "file"
    else sources.tokenizer_file(src)
  )
  if not tok_file:
    raise FileNotFoundError(f"--checkpoint: no tokenizer.model in {src.path}")
  tok = tokenizer_lib.load(tok_file)
  s = pipeline.settings(
    config, vocab_size=tok.vocab_size, num_devices=jax.device_count()
  )
  mesh = sharding.make_mesh(s.mesh)
  abstract = train.sharded_abstract_state(
    s.model, train.make_optimizer(s.optim), mesh
  )
  params = sources.load_params(
    src, model=s.model, abstract_params=abstract.params, field="--checkpoint"
  )
  ids = dict(
    pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
  )
  hf.export_params(
    params, model=s.model, path=out, family=family, dtype=dtype,
    extra_config=ids,
  )  # fmt: skip
  if tok_file.endswith(".model"):
    shutil.copyfile(tok_file, os.path.join(out, "tokenizer.model"))
  return dict(
    source=src.spec, step=src.step, out=os.path.abspath(out), family=family,
    params=s.model.num_params(),
  )  # fmt: skip


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    "config",
    None,
    "The run's experiment file (its model section is the architecture), "
    "e.g. experiments/tiny.py",
    lock_config=True,
  )
  flags.DEFINE_string(
    "checkpoint", None, "DIR:stage or DIR:stage@step of a k15 run."
  )
  flags.DEFINE_string("out", None, "HF directory to write.")
  flags.DEFINE_enum("family", "llama", ["llama", "qwen2"], "HF model family.")
  flags.DEFINE_string("dtype", None, "Weight dtype (default: as trained).")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    done = export(f.config, f.checkpoint, f.out, family=f.family, dtype=f.dtype)
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    sys.exit(f"k15.tools.export: error: {e}")
  print(
    f"exported {done['source']} (step {done['step']}, {done['params']:,} "
    f"params) as {done['family']} to {done['out']}",
    flush=True,
  )


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
