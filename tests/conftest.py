"""Test setup: 8 fake CPU devices (for the sharding tests) must be requested before jax is imported."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# The suite compiles hundreds of tiny programs whose run time is negligible: XLA's CPU optimisation passes cost more
# than they save (measured: a tiny stage-2 run 49 s -> 40 s). Every comparison in the tests is between programs
# compiled alike, or against PyTorch with float32 tolerances. The trainer subprocesses inherit these flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most tests compile the same tiny train step (in this process and in the trainer subprocesses they start):
# a persistent compilation cache for the session compiles it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="blip2_jax_test_jit_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `configs/` is not a package; make `from configs import stage1` work from the repository root.
sys.path.insert(0, REPO)


def one_device_env():
  """The environment of a CLI subprocess: one CPU device (like the in-process 1-device runs, so they share the
  compilation cache), the session's other flags."""
  flags = os.environ["XLA_FLAGS"].replace(
    "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"
  )
  return dict(os.environ, XLA_FLAGS=flags)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """The TFDS directory of the tiny configs' synthetic data (configs/stage{1,2_*}.py:tiny share it), generated
  once by the first test that reads it."""
  return str(tmp_path_factory.mktemp("tiny_tfds"))


# pytest.ini runs the suite on pytest-xdist workers with --dist=loadgroup: each test file is one group, so a
# module-scoped fixture is built once; the files that read `stage1_workdir` share a group, so it is built once too.
SHARED_GROUPS = {"test_train": "stage1_workdir", "test_api": "stage1_workdir", "test_finetune": "stage1_workdir"}


# The longest file first: pytest-xdist hands the groups out in collection order, and test_multiprocess.py (about a
# third of the suite's work, on one worker) started mid-way would leave the other worker idle at the end.
FIRST = ("test_multiprocess",)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks
def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.stem not in FIRST)  # stable: the rest keep their order
  for item in items:
    item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(item.path.stem, item.path.stem)))


STAGE1_STEPS = 8  # stage1_workdir: steps, checkpoints every STAGE1_STEPS // 2


@pytest.fixture(scope="session")
def stage1_workdir(tiny_data_dir, tmp_path_factory):
  """A workdir of `python -m blip2_jax.train --config=configs/stage1.py:tiny`, STAGE1_STEPS steps with checkpoints
  at the half and the end, made once for the tests that resume, evaluate or export one. Read it, don't write it."""
  n = STAGE1_STEPS // 2
  workdir = str(tmp_path_factory.mktemp("stage1_tiny") / "workdir")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "blip2_jax.train",
      "--config=configs/stage1.py:tiny",
      f"--workdir={workdir}",
      f"--config.data.data_dir={tiny_data_dir}",
      f"--config.total_steps={2 * n}",
      f"--config.checkpoint_every={n}",
      f"--config.log_every={n}",
      "--config.keep_checkpoints=5",
    ],
    cwd=REPO,
    env=one_device_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir
