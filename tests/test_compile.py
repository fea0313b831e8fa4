"""`python -m blip2_jax.compile`: the real train step compiled ahead of time for a TPU slice, on the CPU (libtpu's
compile-only devices). Skipped where libtpu is not installed (`pip install -e '.[tpu]'`)."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO
import pytest

from blip2_jax import compile as compile_lib

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no compile-only TPU devices",
)


def _start(*args) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "blip2_jax.compile", *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(p: subprocess.Popen) -> tuple[int, list[str], str]:
  out, err = p.communicate(timeout=600)
  return p.returncode, out.strip().splitlines(), err


def test_topology_names():
  s = compile_lib.parse_topology("v5e-256")
  assert (s.chips, s.topology_name, s.chip_config_name, s.hbm_gib) == (256, "v5e:16x16", "default", 16.0)
  s = compile_lib.parse_topology("v4-8")  # Cloud TPU names count TensorCores: 2 per v4 / v5p chip
  assert (s.chips, s.topology_name, s.chip_config_name, s.hbm_gib) == (4, "v4:2x2x1", "megacore", 32.0)
  assert compile_lib.parse_topology("v5p-256").topology_name == "v5:4x4x8"
  assert compile_lib.parse_topology("v6e-8").topology_name == "v6e:2x4"
  for bad in ("v5e-3", "v4-4", "v7-8", "tpu"):
    with pytest.raises(ValueError, match="is not a TPU slice"):
      compile_lib.parse_topology(bad)


@needs_libtpu
def test_compiles_for_a_slice_and_says_whether_it_fits():
  tiny = "--config=configs/stage1.py:tiny"
  # The two compilations run at once (each is mostly one core).
  fits = _start(tiny, "--topology=v5e-4")
  too_big = _start(tiny, "--topology=v5e-4", "--config.global_batch_size=65536")  # ITC: 16384 x 65536 x 4 per chip
  bad_name = _start(tiny, "--topology=v5e-3")
  bad_batch = _start(tiny, "--topology=v4-8", "--config.global_batch_size=18")

  rc, lines, err = _finish(fits)
  assert rc == 0, err[-3000:]
  report = json.loads(lines[-2])
  assert lines[-1].startswith("fits: ") and "on v5e-4" in lines[-1]
  assert report["fits"] and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["topology"].startswith("v5e-4: 4 x TPU v5 lite")
  memory = report["memory_gib_per_chip"]
  assert memory["total"] > 0 and memory["arguments"] > 0 and memory["temporaries"] > 0
  assert memory["total"] == pytest.approx(
    memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] + memory["code"], abs=0.01
  )
  assert report["compile_s"] > 0 and report["model_tflop_per_step"] > 0 and report["trainable_params"] > 0

  rc, lines, err = _finish(too_big)
  assert rc == 1 and "Traceback" not in err
  assert lines[-1].startswith("does not fit: XLA ran out of HBM compiling for v5e-4") and "\n" not in lines[-1]
  assert json.loads(lines[-2])["fits"] is False

  for p, expected in (
    (bad_name, "error: --topology='v5e-3' is not a TPU slice"),
    (bad_batch, "error: config.global_batch_size=18 does not split over the batch's mesh axes"),
  ):
    rc, lines, err = _finish(p)
    assert rc == 1 and not lines and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(expected)
