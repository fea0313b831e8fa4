r"""Throughput of the stage-1 train step: compile time, step time, samples/s and MFU.

  python -m blip2_jax.benchmark --config=configs/stage1.py:demo --steps=20
  python -m blip2_jax.benchmark --config=configs/stage1.py --config.global_batch_size=128 --steps=20

Runs the trainer's own jitted update (same shardings, donation and dtypes) on random weights and a random
batch, so it needs no data or checkpoint. Model FLOPs, counted by XLA on the forward graphs, are the frozen ViT
forward once plus the Q-Former forward and backward (3 x its forward); MFU divides the achieved model FLOP/s by
the devices' dense bf16 peak where it is known.
"""
import json
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags
import numpy as np

from blip2_jax import cli
from blip2_jax import partitioning
from blip2_jax import train

FLAGS = flags.FLAGS

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


def _flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def run(config, steps: int) -> dict:
  tokenizer = train.load_tokenizer(config)
  setup = train.build(config, tokenizer)
  state, frozen = setup.init(jax.random.PRNGKey(0))
  b, s, L = config.global_batch_size, config.data.image_size, config.data.max_text_len
  rng = np.random.default_rng(0)
  local = {"image": rng.standard_normal((b // jax.process_count(), s, s, 3), np.float32),
           "text_ids": rng.integers(0, len(tokenizer), (b // jax.process_count(), L), dtype=np.int32),
           "text_mask": np.ones((b // jax.process_count(), L), np.int32)}
  batch = train.global_batch(local, setup.batch_sharding)

  # Model FLOPs per step, from the forward graphs.
  model = setup.model
  params = partitioning.merge(state["params"], frozen)
  vit_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
  qformer_fwd = jax.jit(lambda p, e, i, m: model.apply({"params": p}, e, i, m, train=False,
                                                       rngs={"itm": jax.random.PRNGKey(0)},
                                                       method="stage1_losses")["loss"])
  image_embeds = vit_fwd(params, batch["image"])
  flops_vit = _flops(vit_fwd, params, batch["image"])
  flops_qformer = 3 * _flops(qformer_fwd, params, image_embeds, batch["text_ids"], batch["text_mask"])
  del params, image_embeds

  step_fn = train.make_train_step(setup)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps

  devices = setup.mesh.devices.flat
  peak = peak_flops(next(iter(devices)))
  model_flops = flops_vit + flops_qformer
  out = {
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "mesh": dict(setup.mesh.shape), "global_batch_size": b, "steps_timed": steps,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "samples_per_s": round(b / step_s, 1),
      "model_tflop_per_step": round(model_flops / 1e12, 4),
      "model_gflop_per_sample": round(model_flops / b / 1e9, 3),
      "achieved_tflop_per_s": round(model_flops / step_s / 1e12, 3),
      "mfu": None if peak is None else round(model_flops / step_s / (peak * jax.device_count()), 4),
      "peak_tflop_per_s_per_device": None if peak is None else peak / 1e12,
  }
  return out


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  out = run(FLAGS.config, FLAGS.steps)
  if jax.process_index() == 0:
    width = max(map(len, out))
    for k, v in out.items():
      print(f"{k:<{width}}  {v if v is not None else 'n/a (peak unknown for this device)'}")
    print(json.dumps(out))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config to benchmark.", lock_config=True)
  flags.DEFINE_integer("steps", 20, "Timed steps (after compilation and 2 warm-up steps).")
  app.run(main, flags_parser=cli.parse_flags)
