"""Several JAX processes on this machine (CPU collectives) train as one: 2 processes x 4 devices give the losses,
parameters and evaluation of 1 process x 8 devices, and a checkpoint of either resumes in the other.

Each process is `python -m blip2_jax.train --multihost` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (cli.initialize_distributed), as launch/local.sh starts them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from conftest import REPO
import jax
import numpy as np
import pytest

from blip2_jax import state as state_lib
from blip2_jax.data import pipeline
from configs import stage1

STEPS, HALF = 6, 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def train(workdir: str, data_dir: str, processes: int, devices: int, sigterm_after: int | None = None):
  """The tiny stage-1 config for STEPS steps (checkpoints at HALF and STEPS) on processes x devices; on failure
  the test fails with each process's last output lines, and no process outlives it. sigterm_after: SIGTERM to
  the last process once that many steps are logged."""
  port = _free_port()
  flags = os.environ["XLA_FLAGS"].replace(
    "--xla_force_host_platform_device_count=8", f"--xla_force_host_platform_device_count={devices}"
  )
  args = [
    sys.executable,
    "-m",
    "blip2_jax.train",
    "--config=configs/stage1.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    f"--config.total_steps={STEPS}",
    f"--config.checkpoint_every={HALF}",
    "--config.log_every=1",
  ] + (["--multihost"] if processes > 1 else [])
  procs = []
  for i in range(processes):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    if sigterm_after is not None:
      deadline = time.time() + 600
      while max(losses(workdir), default=0) < sigterm_after and procs[-1].poll() is None and time.time() < deadline:
        time.sleep(0.2)
      procs[-1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  failed = [(i, out) for i, (p, out) in enumerate(zip(procs, outs)) if p.returncode]
  assert not failed, "\n".join(f"process {i}:\n{out[-3000:]}" for i, out in failed)


def losses(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.endswith("\n")]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def evaluation(workdir: str) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
  return {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}


def params(workdir: str) -> dict:
  _, _, _, state, _ = state_lib.restore_workdir(workdir)
  return jax.device_get(state["params"])


def assert_same_params(a, b):
  """Equal up to float-sum differences, which Adam magnifies where a gradient is about zero (it divides each by its
  own running scale): entries of a 32-wide bias differed by 1.3e-5 after 6 steps here, where weights are ~1e-2."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny configs' data, generated once here, not by the processes at the same time."""
  path = str(tmp_path_factory.mktemp("multiprocess_tfds"))
  cfg = stage1.get_config("tiny")
  cfg.data.data_dir = path
  pipeline.get_source(cfg.data, "train")
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("multiprocess")
  out = {}
  for name, (processes, devices) in {"one": (1, 8), "two": (2, 4)}.items():
    out[name] = str(root / name)
    train(out[name], data_dir, processes, devices)
  out["data_dir"] = data_dir
  return out


MAKE_DEMO_LLM = """
import hashlib, logging, os, sys
logging.basicConfig(level=logging.INFO)
from blip2_jax import cli, state
from configs import stage2_opt
cli.initialize_distributed()
config = stage2_opt.get_config("tiny")
config.data.data_dir, config.init.demo_llm_steps = sys.argv[1], 3
path = state.resolve_demo_llm(config, sys.argv[2]).init.llm_weights
with open(os.path.join(path, "model.safetensors"), "rb") as f:
  digest = hashlib.sha256(f.read()).hexdigest()
with open(sys.argv[3], "w") as f:  # a file, not stdout: a printed line was twice lost at process 0's exit
  f.write(f"{path} {digest}")
"""


def test_stage2_demo_llm_is_made_by_one_process_and_read_by_all(data_dir, tmp_path):
  """Stage-2 demo configs make their LLM in the shared workdir: process 0 pretrains it while the others wait."""
  port, workdir = _free_port(), str(tmp_path / "wd")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", MAKE_DEMO_LLM, data_dir, workdir, str(tmp_path / f"made{i}.txt")],
      cwd=REPO,
      env=dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
        PYTHONPATH=REPO,
      ),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(out[-3000:] for out in outs)
  made = [(tmp_path / f"made{i}.txt").read_text() if (tmp_path / f"made{i}.txt").exists() else None for i in range(2)]
  assert made[0] == made[1] and made[0], [made, *(out[-3000:] for out in outs)]  # the same directory and weights
  assert ["Pretrained the demo" in out for out in outs] == [True, False]


def test_two_processes_train_and_evaluate_as_one(runs):
  one, two = losses(runs["one"]), losses(runs["two"])
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  assert_same_params(params(runs["two"]), params(runs["one"]))
  assert evaluation(runs["two"]) == evaluation(runs["one"]) and evaluation(runs["one"])
  # Only process 0 writes the run's files: one line per logged step, not one per process.
  lines = open(os.path.join(runs["two"], "metrics.jsonl"), encoding="utf-8").read().splitlines()
  assert len([line for line in lines if '"loss"' in line]) == STEPS


@pytest.mark.parametrize("written_by, resumed_by", [("one", (2, 4))])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, written_by, resumed_by):
  """The half-way checkpoint of one run, resumed on the other process count, ends where the straight run did:
  the data position is the global batch count, not a process's own. (Two processes' checkpoint resumed by one:
  the preemption test below.)"""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(runs[written_by], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  os.remove(os.path.join(workdir, "metrics.jsonl"))  # to hold the resumed steps only
  train(workdir, runs["data_dir"], *resumed_by)
  straight, resumed = losses(runs[written_by]), losses(workdir)
  assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
  assert [resumed[s] for s in range(HALF + 1, STEPS + 1)] == pytest.approx(
    [straight[s] for s in range(HALF + 1, STEPS + 1)], rel=1e-5
  )
  assert_same_params(params(workdir), params(runs[written_by]))


def test_sigterm_to_one_process_saves_every_process_at_one_step_and_the_run_resumes(runs, tmp_path):
  """A preemption notice reaching one host: JAX's preemption sync point makes both processes save the same step
  and exit 0; the run then resumes on one process of 8 devices (the other process count) and ends where the
  uninterrupted 2-process run did."""
  workdir = str(tmp_path / "preempted")
  train(workdir, runs["data_dir"], 2, 4, sigterm_after=2)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved and saved[-1] < STEPS, saved
  train(workdir, runs["data_dir"], 1, 8)
  straight, resumed = losses(runs["two"]), losses(workdir)
  assert [resumed[s] for s in range(saved[-1] + 1, STEPS + 1)] == pytest.approx(
    [straight[s] for s in range(saved[-1] + 1, STEPS + 1)], rel=1e-5
  )
  assert_same_params(params(workdir), params(runs["two"]))
