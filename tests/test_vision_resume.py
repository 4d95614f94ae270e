"""Checkpoint and resume cover the tower: experiments/vision.py:runlocal
(sft -> tower -> joint -> rl, images in every stage after sft), SIGKILLed
mid tower update and preempted mid joint update, restarted with the same
command each time, ends bit for bit where an uninterrupted run ends (every
stage's checkpoint, tower and projector included, the host state, the
summary and the metric records). The run's own checkpoints also show the
tower stage left the LM bitwise as `sft` left it.

The main command runs in subprocesses (`test_resume`'s helpers), sharing
compiled programs through JAX's persistent compilation cache.
"""

import os
import signal

import pytest
from test_resume import final_checkpoint, metric_records, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
from k15 import config_lib


def get_config(arg=None):
  c = config_lib.load({vision!r}, "runlocal")
  c.stages = ("sft", "tower", "joint", "rl")
  c.task.update(num_sft=40, num_rl=40, num_eval=16)
  for stage in ("sft", "tower", "joint"):
    c[stage].update(steps=4, batch_size=8)  # 8 fake devices
  c.rl.iterations = 2
  c.ckpt.every = 1
  return c
"""
STAGES = ("sft", "tower", "joint", "rl")
POINTS = ("tower:3:update", "joint:2:update:TERM", "rl:2:rollout")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "vision_resume.py"
  path.write_text(
    CONFIG.format(vision=os.path.join(REPO, "experiments/vision.py"))
  )
  return str(path)


@pytest.mark.slow
def test_vision_run_resumes_exactly_and_the_tower_stage_freezes_the_lm(
  tmp_path, config
):
  want = str(tmp_path / "uninterrupted")
  rc, err = run_main(want, config, timeout=1200)
  assert rc == 0, err[-3000:]
  got = str(tmp_path / "run")
  for point in (*POINTS, None):
    rc, err = run_main(got, config, timeout=1200,
                       **({"K15_TEST_KILL_AT": point} if point else {}))
    if point is None or point.endswith(":TERM"):
      assert rc == 0, (point, err[-3000:])
    else:
      assert rc == -signal.SIGKILL, (point, rc, err[-3000:])
  for stage in STAGES:
    g_step, g, g_host = final_checkpoint(f"{got}/ckpt/{stage}")
    w_step, w, w_host = final_checkpoint(f"{want}/ckpt/{stage}")
    assert (g_step, g_host) == (w_step, w_host), stage
    assert g.keys() == w.keys()
    assert any("['vision']" in k for k in g) and any(
      "['projector']" in k for k in g)
    for k in w:
      assert g[k].tobytes() == w[k].tobytes(), f"{stage} {k} differs"
  strip = [{k: v for k, v in r.items() if k != "stage_wall_s"}
           for r in metric_records(got)]  # fmt: skip
  assert strip == [{k: v for k, v in r.items() if k != "stage_wall_s"}
                   for r in metric_records(want)]  # fmt: skip
  # the frozen-LM stage, end to end: every LM param of the tower stage's
  # final checkpoint is bitwise the sft stage's; the tower moved
  _, sft, _ = final_checkpoint(f"{want}/ckpt/sft")
  _, tower, _ = final_checkpoint(f"{want}/ckpt/tower")
  params = [k for k in sft if "params" in k and "opt_state" not in k]
  lm = [k for k in params if "['vision']" not in k
        and "['projector']" not in k]  # fmt: skip
  assert lm and len(lm) < len(params)
  for k in lm:
    assert tower[k].tobytes() == sft[k].tobytes(), k
  assert any(tower[k].tobytes() != sft[k].tobytes()
             for k in params if "['vision']" in k)  # fmt: skip
