"""Where a stage's initial weights come from: `config.init` (and the
models `merge.models` averages).

  ""               none: a fresh init (sft), or this workdir's stages
  DIR:stage        the final weights of `stage` in another k15 workdir
  DIR:stage@step   that stage's checkpoint at `step` (one `ckpt.keep` kept)
  HF_DIR           a Llama/Qwen2 safetensors checkpoint (config.json there)

A run reads only the params of a k15 source (its optimizer state and step
are not taken: the stage starts a fresh optimizer at step 0), through the
read-only functions of `k15.checkpoint`, so the source run is never
touched. Its architecture must be the run's `model` section: a parameter
that differs is named in the error. An HF directory gives the
architecture itself (`pipeline.settings`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax

from k15 import checkpoint as ckpt_lib
from k15 import config_lib
from k15 import model as model_lib

_RUN = re.compile(r"^(?P<dir>.+):(?P<stage>[A-Za-z_][A-Za-z0-9_]*)"
                  r"(@(?P<step>\d+))?$")  # fmt: skip
TOKENIZER_FILE = "tokenizer.model"  # what a k15 run trains into its workdir


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed spec: kind "run" (DIR:stage[@step]) or "hf" (a directory)."""

  kind: str
  path: str  # the workdir (run) or the checkpoint directory (hf)
  stage: str = ""
  step: int | None = None  # None: the stage's final checkpoint
  spec: str = ""  # as written, for messages

  @property
  def ckpt_dir(self) -> str:
    return os.path.join(self.path, "ckpt", self.stage)


def parse(spec: str, field: str = "init") -> Source | None:
  """`spec` as a Source (None for ""); `field` names it in errors. Only the
  form is checked here; `resolve` checks that the checkpoint exists."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  m = _RUN.match(spec)
  if m and not os.path.isfile(os.path.join(spec, "config.json")):
    step = m.group("step")
    return Source("run", os.path.abspath(m.group("dir")), m.group("stage"),
                  None if step is None else int(step), spec)  # fmt: skip
  if os.path.isdir(spec) or not m:
    return Source("hf", os.path.abspath(spec), spec=spec)
  raise config_lib.ConfigError(f"config: {field}={spec!r} is not a source")


def is_hf(spec: str) -> bool:
  src = parse(spec)
  return src is not None and src.kind == "hf"


def resolve(src: Source, field: str = "init") -> Source:
  """`src` with its step filled in, after checking it can be read.

  A run source without a step is its stage's final checkpoint and the stage
  must have finished; with a step, that step must still be kept. Errors
  name the field, the directory and the steps there are."""
  if src.kind == "hf":
    if not os.path.isfile(os.path.join(src.path, "config.json")):
      raise config_lib.ConfigError(
        f"config: {field}={src.spec!r}: no config.json in {src.path} (a k15 "
        "run is named DIR:stage or DIR:stage@step)"
      )
    return src
  steps = ckpt_lib.committed_steps(src.ckpt_dir)
  where = f"config: {field}={src.spec!r}"
  if not steps:
    root = os.path.join(src.path, "ckpt")
    there = sorted(
      d for d in (os.listdir(root) if os.path.isdir(root) else ())
      if ckpt_lib.committed_steps(os.path.join(root, d))
    )  # fmt: skip
    raise config_lib.ConfigError(
      f"{where}: no saved checkpoint of stage {src.stage!r} in {src.path} "
      f"(stages saved there: {', '.join(there) or 'none'})"
    )
  if src.step is not None:
    if src.step not in steps:
      raise config_lib.ConfigError(
        f"{where}: step {src.step} of {src.stage} is not in "
        f"{src.ckpt_dir} (kept steps: {', '.join(map(str, steps))})"
      )
    return src
  host = ckpt_lib.read_host(src.ckpt_dir, steps[-1])
  if not host.get("done"):
    raise config_lib.ConfigError(
      f"{where}: {src.stage} in {src.path} has not finished (newest step "
      f"{steps[-1]}); name a step, e.g. {src.path}:{src.stage}@{steps[-1]}"
    )
  return dataclasses.replace(src, step=steps[-1])


def load_params(
  src: Source,
  *,
  model: model_lib.ModelConfig,
  abstract_params: Any,
  field: str = "init",
) -> Any:
  """The source's params, placed into the shardings of `abstract_params`
  (the run's sharded ShapeDtypeStructs), never whole on one device."""
  src = resolve(src, field)
  if src.kind == "run":
    return ckpt_lib.restore_params(src.ckpt_dir, src.step, abstract_params)
  from k15 import hf  # noqa: PLC0415 - safetensors only needed for HF

  params = hf.import_params(src.path, model=model)
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  return jax.device_put(params, shardings)


def param_shapes(src: Source, field: str = "init") -> dict[str, tuple]:
  """{parameter path: (shape, dtype)} of the source, read from metadata
  (a run's checkpoint) or config.json (HF); no weights are read."""
  src = resolve(src, field)
  if src.kind == "run":
    return ckpt_lib.param_metadata(src.ckpt_dir, src.step)
  from k15 import hf  # noqa: PLC0415 - safetensors only needed for HF

  return hf.param_shapes(hf.config_from_hf(src.path))


def tokenizer_file(src: Source) -> str | None:
  """The tokenizer a run source trained (None for HF: pipeline loads the
  checkpoint's own tokenizer files)."""
  if src.kind != "run":
    return None
  path = os.path.join(src.path, TOKENIZER_FILE)
  return path if os.path.exists(path) else None
