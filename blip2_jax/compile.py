r"""Ahead-of-time compilation of the real train step for a TPU slice, on this machine's CPU: does it fit?

  python -m blip2_jax.compile --config=configs/stage1.py --topology=v4-32
  python -m blip2_jax.compile --config=configs/stage2_opt.py:opt6.7b --topology=v5e-32 \
      --config.sharding.mesh.data=2 --config.sharding.mesh.fsdp=16 --config.model.llm.remat_policy=full

It builds the model, the mesh and every sharding from the config exactly as the trainer does (state.build,
train.make_train_step), over the compile-only devices of the named slice that libtpu describes
(jax.experimental.topologies.get_topology_desc, as MaxText's train_compile.py), and compiles the trainer's jitted
update for them. Nothing is allocated and no weight is read: the state, the frozen towers and the batch are
jax.ShapeDtypeStructs with their shardings (stage 1 without a tokenizer directory uses a stand-in of
config.model.qformer.vocab_size tokens; stage 2 takes the LLM's sizes from config.model.llm, or from the
config.json of config.init.llm_weights). It needs libtpu (`pip install -e '.[tpu]'`), not a TPU.

It prints the mesh, the per-chip memory of the compiled step from XLA's memory analysis (arguments, outputs,
temporaries, total) against the HBM of a chip that XLA may use, the compile time and the model FLOPs of one step,
and its last line says whether the step fits. When it does not (XLA runs out of HBM while compiling, or the total
exceeds that HBM) the last line says so and the exit status is 1. Errors (an unknown slice, a batch the mesh cannot
split) are one line too, with exit status 1. docs/compile.md has the paper recipes' smallest slices.

Slices are Cloud TPU names: v5e-N and v6e-N (N chips; 1, 4, 8, ... 256) and v4-N and v5p-N (N TensorCores, two
per chip: v4-8 is 4 chips; 8 ... 4096). One device of the mesh is one chip (v4 and v5p: a megacore).

Model FLOPs per step are XLA's count of the whole update's graph (frozen ViT forward, Q-Former forward and
backward, stage 2: the frozen LLM's forward and its backward to the soft prompt, the optimizer) for the global
batch, before partitioning, with scans unrolled and without rematerialisation (remat recomputes, it adds no model
FLOPs): the same count as blip2_jax.benchmark's, on the whole step.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
from ml_collections import config_flags

from blip2_jax import checkpointing
from blip2_jax import cli
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.models import llms

FLAGS = flags.FLAGS
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice as libtpu's topology description wants it."""

  name: str  # the Cloud name, e.g. v5e-256
  generation: str  # v4, v5e, v5p, v6e
  chips: int
  topology_name: str  # libtpu's, e.g. v5e:16x16
  chip_config_name: str  # megacore (v4, v5p) or default
  wrap: tuple[bool, bool, bool]  # torus wrap-around per dimension
  hbm_gib: float  # per chip
  usable_gib: float  # what XLA may use of it (the runtime keeps the rest), from its out-of-memory errors


# Per generation: its libtpu topology prefix, chip config, HBM per chip and the part of it XLA may use (GiB; the
# "available HBM" of libtpu 0.0.42's out-of-memory errors).
GENERATIONS = {
  "v4": ("v4", "megacore", 32.0, 30.75),
  "v5e": ("v5e", "default", 16.0, 15.75),
  "v5p": ("v5", "megacore", 95.0, 95.74),
  "v6e": ("v6e", "default", 32.0, 31.25),
}
# Chips -> the slice's chip grid (as Cloud TPU and MaxText's accelerator_to_spec_map lay them out).
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
GRIDS_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  192: (4, 4, 12),
  256: (4, 8, 8),
  384: (4, 8, 12),
  512: (8, 8, 8),
  768: (8, 8, 12),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
}


def parse_topology(name: str) -> Slice:
  """'v5e-256' -> its Slice; an unknown name is a ValueError that lists the known ones."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
  if m:
    generation, n = m.group(1), int(m.group(2))
    prefix, chip_config, hbm, usable = GENERATIONS[generation]
    if chip_config == "megacore":  # the name counts TensorCores, two per chip
      grid = GRIDS_3D.get(n // 2) if n % 2 == 0 else None
      wrap = (n // 2 >= 64,) * 3  # full cubes of 4x4x4 and up are tori
    else:
      grid = GRIDS_2D.get(n)
      wrap = (n == 256, n >= 128, False)
    if grid is not None:
      return Slice(
        name=f"{generation}-{n}",
        generation=generation,
        chips=math.prod(grid),
        topology_name=f"{prefix}:{'x'.join(map(str, grid))}",
        chip_config_name=chip_config,
        wrap=wrap,
        hbm_gib=hbm,
        usable_gib=min(hbm, usable),
      )
  known = (
    f"v5e-N or v6e-N with N chips in {sorted(GRIDS_2D)}; v4-N or v5p-N with N = 2 x chips (TensorCores) in "
    f"{sorted(2 * c for c in GRIDS_3D)}"
  )
  raise ValueError(f"--topology={name!r} is not a TPU slice this tool knows: {known}.")


def topology_devices(tpu: Slice) -> list:
  """The slice's compile-only TPU devices (libtpu describes them; no TPU is needed)."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
      f"libtpu is not installed: `pip install -e '.[tpu]'` (or 'jax[tpu]=={jax.__version__}') compiles for TPUs "
      "on this machine."
    )
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # No TPU metadata server to ask (nor TPU_ACCELERATOR_TYPE to set: it makes libtpu take /tmp/libtpu_lockfile as
  # a TPU runtime would, and then refuse a second process); libtpu still warns once that it knows no accelerator.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once (pytest workers)
  desc = topologies.get_topology_desc(
    topology_name=tpu.topology_name,
    platform="tpu",
    chip_config_name=tpu.chip_config_name,
    chips_per_host_bounds=(1, 1, 1) if tpu.chips == 1 else (2, 2, 1),
    num_slices=1,
    wrap=tpu.wrap,
  )
  if len(desc.devices) != tpu.chips:
    raise RuntimeError(f"libtpu described {len(desc.devices)} devices for {tpu.name}, expected {tpu.chips}.")
  return desc.devices


class _StandInVocab:
  """What state.model_config reads of a stage-1 tokenizer (its size; [DEC], the last id), when the config names
  no tokenizer directory: the sizes are config.model.qformer.vocab_size's."""

  def __init__(self, size: int):
    self.size, self.bos_token_id = size, size - 1

  def __len__(self) -> int:
    return self.size


def _tokenizer(config):
  if state_lib.kind(config) != llms.RETRIEVAL:
    if config.init.llm_weights == "demo":
      raise ValueError(
        "config.init.llm_weights='demo' is made by training; compile for the sizes of config.model.llm with "
        "--config.init.llm_weights= (or use a stage-2 variant with the paper's LLM, e.g. :opt2.7b)."
      )
    return None  # random weights: the LLM's sizes come from config.model.llm
  if config.tokenizer:
    return state_lib.load_tokenizer(config)
  if config.model.qformer.vocab_size <= 0:
    raise ValueError("config.tokenizer is empty and config.model.qformer.vocab_size is 0: give either.")
  return _StandInVocab(config.model.qformer.vocab_size)


def abstract_inputs(config, setup: state_lib.Setup) -> tuple:
  """(state, frozen, batch) of the train step as ShapeDtypeStructs on their shardings: nothing is allocated."""
  state, frozen = jax.eval_shape(setup.init, jax.random.PRNGKey(0))
  batch = jax.eval_shape(lambda: state_lib.dummy_batch(config, config.global_batch_size))
  return (
    checkpointing.abstract_like(state, setup.state_shardings),
    checkpointing.abstract_like(frozen, setup.frozen_shardings),
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding), batch),
  )


def _check_batch(config, setup: state_lib.Setup) -> int:
  """The number of batch shards (the product of the batch rule's mesh axes); it must divide the global batch."""
  n = partitioning.batch_shards(setup.batch_sharding)
  if config.global_batch_size % n:
    axes = setup.batch_sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    raise ValueError(
      f"config.global_batch_size={config.global_batch_size} does not split over the batch's mesh axes "
      f"{dict((a, setup.mesh.shape[a]) for a in axes)} ({n} devices): choose a mesh whose batch axes divide it "
      "(e.g. a 'tensor' axis > 1) or another batch size."
    )
  return n


@contextlib.contextmanager
def _unrolled_scans():
  """Every lax.scan traced inside is fully unrolled: XLA's cost analysis counts a loop body once, whatever its trip
  count (the LLMs scan their layers). The same computation; only its loop structure differs."""
  scan = jax.lax.scan
  jax.lax.scan = lambda *args, **kwargs: scan(*args, **dict(kwargs, unroll=True))
  try:
    yield
  finally:
    jax.lax.scan = scan


def step_flops(setup: state_lib.Setup, state, frozen, batch) -> float:
  """XLA's FLOP count of the whole train step on the global batch (before partitioning), with scans unrolled and
  without remat, lowered for the CPU (a lowered program's cost analysis needs no compile)."""
  model = setup.model
  towers = [t for t in ("vit", "llm") if t in model.cfg and model.cfg[t].get("remat_policy", "none") != "none"]
  if towers:
    cfg = ml_collections.ConfigDict(model.cfg.to_dict())
    for t in towers:
      cfg[t].remat_policy = "none"
    model = model.clone(cfg=cfg)
  step = train.make_train_step(dataclasses.replace(setup, model=model)).__wrapped__
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), (state, frozen, batch))
  with _unrolled_scans():
    cost = jax.jit(step).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _gib(n: float) -> float:
  return round(n / GIB, 3)


def _oom_message(e: Exception) -> str | None:
  """XLA's out-of-HBM compile error, as one sentence; None for any other error."""
  text = " ".join(str(e).split())
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  m = re.search(r"(Ran out of memory[^.]*(?:\.\d+[^.]*)*\.)", text)
  return m.group(1) if m else text[:300]


def compile_for(config, topology: str, flops: bool = True) -> dict:
  """Compiles config's train step for the TPU slice `topology` (e.g. 'v5e-256'); returns the report (a dict whose
  'fits' says whether one chip's HBM holds it). Call it with JAX on the CPU platform (main does)."""
  tpu = parse_topology(topology)
  tokenizer = _tokenizer(config)
  devices = topology_devices(tpu)
  setup = state_lib.build(config, tokenizer, devices)
  batch_shards = _check_batch(config, setup)
  state, frozen, batch = abstract_inputs(config, setup)
  stage2 = state_lib.kind(config) != llms.RETRIEVAL
  usable = tpu.usable_gib * GIB
  b = config.global_batch_size
  report = {
    "topology": f"{tpu.name}: {tpu.chips} x {devices[0].device_kind} ({tpu.topology_name}), {tpu.hbm_gib:g} GiB HBM "
    "per chip",
    "stage": 2 if stage2 else 1,
    "llm": f"{config.model.llm.kind} {setup.model.cfg.llm.get('hidden_size', setup.model.cfg.llm.get('d_model'))}"
    if stage2
    else None,
    "mesh": dict(setup.mesh.shape),
    "global_batch_size": b,
    "batch_per_chip": b // batch_shards,
    "remat_policy": {"vit": config.model.vit.remat_policy} | ({"llm": config.model.llm.remat_policy} if stage2 else {}),
    "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
    "frozen_params": sum(math.prod(x.shape) for x in jax.tree.leaves(frozen)),
    "hbm_gib_per_chip": tpu.hbm_gib,
    "usable_hbm_gib_per_chip": tpu.usable_gib,
  }
  if not stage2:
    del report["llm"]

  t0 = time.perf_counter()
  try:
    compiled = train.make_train_step(setup).lower(state, frozen, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _oom_message(e)
    if oom is None:
      raise
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    report["fits"] = False
    report["verdict"] = (
      f"does not fit: XLA ran out of HBM compiling for {tpu.name} ({tpu.hbm_gib:g} GiB per chip): {oom}"
    )
    return report
  report["compile_s"] = round(time.perf_counter() - t0, 1)

  mem = compiled.memory_analysis()
  args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp, code = mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
  total = args + outs - alias + temp + code  # donated state: its outputs reuse the arguments' buffers
  report["memory_gib_per_chip"] = {
    "arguments": _gib(args),
    "outputs": _gib(outs),
    "aliased": _gib(alias),
    "temporaries": _gib(temp),
    "code": _gib(code),
    "total": _gib(total),
  }
  report["usable_hbm_used"] = round(total / usable, 3)
  if flops:
    model_flops = step_flops(setup, state, frozen, batch)
    report["model_tflop_per_step"] = float(f"{model_flops / 1e12:.4g}")
    report["model_gflop_per_sample"] = float(f"{model_flops / b / 1e9:.4g}")
  report["fits"] = total <= usable
  report["verdict"] = (
    f"fits: {_gib(total):.2f} GiB per chip of the {tpu.usable_gib:g} GiB usable HBM ({100 * total / usable:.0f}%) "
    f"on {tpu.name}"
    if report["fits"]
    else f"does not fit: {_gib(total):.2f} GiB per chip, more than the {tpu.usable_gib:g} GiB of HBM XLA may use on a "
    f"{tpu.generation} chip ({tpu.name})"
  )
  return report


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Compile-only TPU devices need no TPU backend; the CPU is the default platform (and counts the FLOPs).
  jax.config.update("jax_platforms", "cpu")
  try:
    report = compile_for(FLAGS.config, FLAGS.topology, flops=FLAGS.flops)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    raise SystemExit(f"error: {' '.join(str(e).split())}") from None
  verdict = report.pop("verdict")
  width = max(map(len, report))
  for k, v in report.items():
    if k != "fits":
      print(f"{k:<{width}}  {v}")
  print(json.dumps(report))
  print(verdict, flush=True)
  if not report["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The training config to compile.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5e-N, v6e-N (N chips), v4-N, v5p-N (N TensorCores).")
  flags.DEFINE_bool("flops", True, "Also count the model FLOPs of one step (lowers the step once more, on the CPU).")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main, flags_parser=cli.parse_flags)
