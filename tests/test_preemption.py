"""A SIGTERM (the notice a TPU VM, SLURM or Kubernetes gives before stopping a job) makes the trainer save the step
it is at and exit 0; the same command then resumes, and the run ends exactly where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO
from conftest import one_device_env
import jax
import numpy as np

from blip2_jax import state as state_lib

STEPS = 12


def command(workdir: str, data_dir: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "blip2_jax.train",
    "--config=configs/stage1.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    f"--config.total_steps={STEPS}",
    "--config.checkpoint_every=100",  # no checkpoint but the preemption's and the last
    "--config.log_every=1",
  ]


def logged_steps(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run(workdir: str, data_dir: str):
  r = subprocess.run(command(workdir, data_dir), cwd=REPO, env=one_device_env(), capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]


def test_sigterm_saves_the_current_step_exits_0_and_the_run_resumes_exactly(tiny_data_dir, tmp_path):
  straight = str(tmp_path / "straight")
  run(straight, tiny_data_dir)

  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(
    command(workdir, tiny_data_dir),
    cwd=REPO,
    env=one_device_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 600
  while max(logged_steps(workdir), default=0) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved
  assert f"Preempted: saved step {saved[0]}" in err

  run(workdir, tiny_data_dir)  # the same command resumes
  want, got = logged_steps(straight), logged_steps(workdir)
  assert [got[s] for s in range(saved[0] + 1, STEPS + 1)] == [want[s] for s in range(saved[0] + 1, STEPS + 1)]
  _, _, _, a, _ = state_lib.restore_workdir(straight, devices=jax.devices()[:1])
  _, _, _, b, _ = state_lib.restore_workdir(workdir, devices=jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)
