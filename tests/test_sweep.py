"""k15.sweep: seeds parsing, the per-stage statistics and the results files.

`pipeline.run` is replaced by canned summaries here; the real runs are
covered by test_main.py and test_learning.py.
"""

import json

import ml_collections
import numpy as np
import pytest

from k15 import config_lib, pipeline, sweep


def test_parse_seeds():
  assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
  assert sweep.parse_seeds("0-4") == [0, 1, 2, 3, 4]
  assert sweep.parse_seeds("3, 5-6") == [3, 5, 6]
  for bad in ("", "a", "1,1", "2-x"):
    with pytest.raises(config_lib.ConfigError, match="--seeds"):
      sweep.parse_seeds(bad)


def _summary(sft, rl, control):
  res = {k: dict(pass1=v, greedy_acc=v + 0.01, mean_length=10.0,
                 finished=1.0, pass1_d2=v)
         for k, v in (("sft", sft), ("rl", rl), ("control", control))}
  return dict(results=res, rl_minus_sft_pass1=rl - sft,
              rl_minus_control_pass1=rl - control)


CANNED = {0: _summary(0.5, 0.8, 0.55), 1: _summary(0.4, 0.6, 0.5),
          2: _summary(0.6, 0.9, 0.6)}


def test_summarize_stats_and_targets():
  out = sweep.summarize(CANNED, {"rl_minus_sft_pass1": 0.15,
                                 "rl_minus_control_pass1": 0.10})
  rl = out["stages"]["rl"]["pass1"]
  assert rl["mean"] == pytest.approx(np.mean([0.8, 0.6, 0.9]))
  assert rl["std"] == pytest.approx(np.std([0.8, 0.6, 0.9], ddof=1))
  assert (rl["min"], rl["max"]) == (0.6, 0.9)
  assert out["deltas"]["rl_minus_sft_pass1"]["min"] == pytest.approx(0.2)
  # seed 1 is exactly at the bar (0.6 - 0.5 = 0.1 in floats: 0.0999...)
  assert out["targets"]["rl_minus_control_pass1"]["met"]
  out = sweep.summarize(CANNED, {"rl_minus_control_pass1": 0.2})
  assert not out["targets"]["rl_minus_control_pass1"]["met"]
  assert not out["all_targets_met"]
  out = sweep.summarize(CANNED, {"rl/pass1": 0.6})
  assert out["all_targets_met"]


def test_bad_targets_are_named():
  c = ml_collections.ConfigDict(dict(targets=dict(rl_beats_sft=0.1)))
  with pytest.raises(config_lib.ConfigError, match="targets.rl_beats_sft"):
    sweep.targets_of(c)
  c = ml_collections.ConfigDict(dict(targets={"rl/pass1": "high"}))
  with pytest.raises(config_lib.ConfigError, match="targets.rl/pass1"):
    sweep.targets_of(c)


def test_run_writes_results_per_seed(tmp_path, monkeypatch):
  calls = []

  def fake_run(config, workdir):
    calls.append((config.seed, workdir))
    return CANNED[config.seed]

  monkeypatch.setattr(pipeline, "run", fake_run)
  config = ml_collections.ConfigDict(dict(
      name="tiny", seed=7, targets=dict(rl_minus_sft_pass1=0.15)))
  about = sweep.environment("k15 --seeds", {"XLA_FLAGS": "--xla_foo="})
  assert about["XLA_FLAGS"] == "--xla_foo=" and about["cpu"]
  out = sweep.run(config, str(tmp_path), [0, 1, 2], about=about)
  # each seed ran in its own workdir with its own seed (config.seed ignored)
  assert calls == [(s, str(tmp_path / f"seed_{s}")) for s in (0, 1, 2)]
  assert out["all_targets_met"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["targets"]["rl_minus_sft_pass1"]["met"]
  md = (tmp_path / "results.md").read_text()
  assert "k15 --seeds" in md and "XLA_FLAGS=--xla_foo=" in md
  assert "| rl | 0.767 ± 0.153 [0.600, 0.900]" in md
  assert "rl_minus_sft_pass1 ≥ +0.15: met (+0.300, +0.200, +0.300)" in md
  for seed in (0, 1, 2):
    assert f"| {seed} | " in md
  # wall time accumulates over resumed calls
  sweep.run(config, str(tmp_path), [0, 1, 2])
  walls = json.loads((tmp_path / "seed_0" / "wall_time.json").read_text())
  assert walls["wall_s"] >= out["per_seed"][0]["wall_s"]


def _domain_summary(seed):
  """A prompt-file run's summary: pass@1 per domain, and its deltas."""
  vals = dict(sft=(0.5, 0.4), rl=(0.9, 0.7 + 0.1 * seed), control=(0.55, 0.4))
  res = {k: dict(pass1=(m + c) / 2, greedy_acc=0.9, mean_length=20.0,
                 finished=1.0, pass1_math=m, pass1_code=c,
                 greedy_acc_math=0.95, greedy_acc_code=0.85, pass1_d1=0.5)
         for k, (m, c) in vals.items()}
  out = dict(results=res)
  for base in ("sft", "control"):
    out[f"rl_minus_{base}_pass1"] = res["rl"]["pass1"] - res[base]["pass1"]
    for d in ("math", "code"):
      out[f"rl_minus_{base}_pass1_{d}"] = (res["rl"][f"pass1_{d}"]
                                           - res[base][f"pass1_{d}"])
  return out


def test_per_domain_deltas_targets_and_tables(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "run",
                      lambda config, workdir: _domain_summary(config.seed))
  config = ml_collections.ConfigDict(dict(name="mixed", seed=0, targets=dict(
      rl_minus_control_pass1_code=0.35, rl_minus_sft_pass1_math=0.3)))
  out = sweep.run(config, str(tmp_path), [0, 1, 2])
  code = out["deltas"]["rl_minus_control_pass1_code"]
  assert code["mean"] == pytest.approx(0.4) and code["min"] == pytest.approx(
      0.3)
  # seed 0's code gain over the control is 0.30 < 0.35: not met
  assert not out["targets"]["rl_minus_control_pass1_code"]["met"]
  assert out["targets"]["rl_minus_sft_pass1_math"]["met"]
  md = (tmp_path / "results.md").read_text()
  assert "| stage | math | code |" in md
  assert ("| rl | 0.900 ± 0.000 [0.900, 0.900] (greedy 0.950) | "
          "0.800 ± 0.100 [0.700, 0.900] (greedy 0.850) |") in md
  assert ("| seed | sft math | sft code | rl math | rl code | control math "
          "| control code | sft_pass1_math | sft_pass1_code | "
          "control_pass1_math | control_pass1_code |") in md
  assert "| 2 | 0.500 | 0.400 | 0.900 | 0.900 | 0.550 | 0.400 | +0.400 | " \
      "+0.500 | +0.350 | +0.500 |" in md
  assert "rl_minus_control_pass1_code ≥ +0.35: NOT met" in md
  with pytest.raises(config_lib.ConfigError, match="targets.rl_minus_x"):
    sweep.targets_of(ml_collections.ConfigDict(dict(targets=dict(
        rl_minus_x_pass1=0.1))))
