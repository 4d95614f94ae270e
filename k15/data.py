"""grain pipelines: supervised (warm-up / control / rejection-sampling)
batches, and DPO's preference-pair batches.

A dataset is a `grain.MapDataset`, indexed by step: `ds[step]` is the batch
of that step, reshuffled each epoch. Its position in a run is therefore just
the step number, which the checkpoint already holds, and a resumed run draws
exactly the batches it would have drawn. Each process reads its own slice of
every batch (`process_slice`), so hosts never load each other's rows.

Examples may carry their prompt's images (`images.Patches`, third item):
with `vision` given, every batch holds the tower's inputs
(`vision.IMAGE_KEYS`; text rows empty). `mixed_dataset` joins an image and
a text dataset row-wise, so each batch has a fixed image share.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import jax
import numpy as np

from k15 import images as images_lib
from k15 import rollout, vision


def sft_dataset(examples: list[tuple], *,
                batch_size: int, prompt_len: int, response_len: int,
                pad_id: int, seed: int,
                vision_cfg: vision.VisionConfig | None = None
                ) -> grain.MapDataset:
  """Infinite, per-epoch reshuffled batches in the `rollout.to_batch` layout.

  examples: (prompt ids, response ids[, images.Patches or None]).
  vision_cfg: with it, batches carry the tower's inputs (`images.pack`).
  Raises naming the first example that does not fit the lengths.
  """
  if not examples:
    raise ValueError("sft: no examples")
  for i, (p, r, *_) in enumerate(examples):
    if len(p) > prompt_len or len(r) > response_len:
      raise ValueError(
          f"sft example {i}: prompt {len(p)} / response {len(r)} tokens "
          f"exceed prompt_len={prompt_len} / response_len={response_len}")

  def collate(rows):
    prompts = [r[0] for r in rows]
    responses = [np.asarray(r[1], np.int32) for r in rows]
    batch = rollout.to_batch(prompts, responses, prompt_len=prompt_len,
                             response_len=response_len, pad_id=pad_id)
    if vision_cfg is not None:
      batch.update(images_lib.pack([r[2] if len(r) > 2 else None
                                    for r in rows], vision_cfg))
    return batch

  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True, batch_fn=collate)


def pair_dataset(pairs: list[tuple[list[int], list[int], list[int], float,
                                    float]], *,
                 batch_size: int, prompt_len: int, response_len: int,
                 pad_id: int, seed: int) -> grain.MapDataset:
  """Batches of `batch_size` preference pairs (prompt, chosen, rejected,
  the reference's sequence log-prob of each) as 2 * batch_size rows, each
  pair's chosen row right before its rejected one (so a contiguous share
  of the rows, `process_slice`, holds whole pairs; `objective.dpo_loss`),
  with `ref_logp_B`. Infinite, reshuffled per epoch, like `sft_dataset`."""
  if not pairs:
    raise ValueError("dpo: no preference pairs")
  for i, (p, w, l, _, _) in enumerate(pairs):
    if len(p) > prompt_len or max(len(w), len(l)) > response_len:
      raise ValueError(
          f"dpo pair {i}: prompt {len(p)} / responses {len(w)}, {len(l)} "
          f"tokens exceed prompt_len={prompt_len} / "
          f"response_len={response_len}")

  def collate(rows):
    prompts = [r[0] for r in rows for _ in (1, 2)]
    responses = [np.asarray(r[k], np.int32) for r in rows for k in (1, 2)]
    batch = rollout.to_batch(prompts, responses, prompt_len=prompt_len,
                             response_len=response_len, pad_id=pad_id)
    batch["ref_logp_B"] = np.array([r[k] for r in rows for k in (3, 4)],
                                   np.float32)
    return batch

  ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True, batch_fn=collate)


class MixedDataset:
  """Batch i = the batches i of `parts` stacked row-wise (same keys)."""

  def __init__(self, parts: Sequence[grain.MapDataset]):
    self.parts = tuple(parts)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    got = [p[i] for p in self.parts]
    return {k: np.concatenate([g[k] for g in got]) for k in got[0]}


def mixed_dataset(parts: Sequence[grain.MapDataset]) -> MixedDataset:
  return MixedDataset(parts)


def process_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch (multi-host)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch

  def take(x):
    if x.shape[0] % n:
      raise ValueError(f"global batch {x.shape[0]} not divisible by "
                       f"{n} processes")
    per = x.shape[0] // n
    return x[i * per:(i + 1) * per]

  return {k: take(v) for k, v in batch.items()}
