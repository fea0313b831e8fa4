r"""Throughput of training (stage 1 or 2) and of generation (stage 2), optionally against transformers' BLIP-2.

  python -m blip2_jax.benchmark --config=configs/stage1.py:demo --steps=20
  python -m blip2_jax.benchmark --config=configs/stage1.py --config.global_batch_size=128 --steps=20
  python -m blip2_jax.benchmark --config=configs/stage1.py:demo --steps=5 --profile=/tmp/blip2_profile
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m blip2_jax.benchmark --config=configs/stage2_opt.py \
      --config.global_batch_size=64 --config.data.max_text_len=32 --mode=train --steps=10 --compare=transformers
  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m blip2_jax.benchmark --config=configs/stage2_opt.py \
      --config.global_batch_size=32 --mode=generate --new_tokens=30 --steps=3 --compare=transformers

Everything runs on random weights and random inputs of the config's shapes, so it needs no data or checkpoint
(stage 2: the frozen LLM has the sizes of config.model.llm, or of config.init.llm_weights' config.json when that
names a directory; its weights are never read).

--mode=train (default): the trainer's own jitted update (same shardings, donation and dtypes) on a random batch
with state.dummy_batch's structure (random token ids, all-ones masks; OPT's label_mask is ones after the first
token). Reports compile time, step time, samples/s, model FLOPs and MFU. Model FLOPs are counted by XLA on the
forward graphs (before partitioning, so they are the global batch's FLOPs on any mesh):
- stage 1: the frozen ViT forward once + the Q-Former forward and backward (3 x its forward);
- stage 2: the frozen ViT forward once + the Q-Former and language projection forward and backward (3 x) + the
  frozen LLM forward and backward (2 x its forward: the LLM has no weight gradients, its backward only carries
  the gradient to its input, the soft prompt, which costs about one more forward).
  The LLM's forward is the whole stage-2 loss graph minus the ViT and Q-Former graphs.
Stage 2 also reports vit_forward_s, the frozen ViT's forward on the batch timed alone (with --compare, beside
transformers' vision_model forward): the step's image-encoder share, the rest being Q-Former and LLM. On a GPU
with a bfloat16 ViT it also reports vit_forward_cudnn_attention_s, the same forward with model.vit.attention='cudnn'.
MFU divides the achieved model FLOP/s by the devices' dense bf16 peak where it is known.

--mode=generate (stage 2): captioning, greedy or with --num_beams beams (length penalty 1), through the jitted
BLIP-2 generation path of tasks.py (soft prompt + prompt -> the whole search in one program) at
config.global_batch_size images, `--new_tokens` new tokens with
min_new_tokens = max_new_tokens so that every sequence generates exactly that many (the comparison is like for
like). Without a tokenizer for random weights, the prompt is PROMPT_LENGTH random token ids (OPT: "</s>" first,
as "</s>a photo of" is 4 tokens; T5: "</s>" last; an LLM config without a BOS, Qwen2's: 3 ids). Reports compile
time, time per batch, images/s and tokens/s.

--mode=data: the host's input work per training example, on one core: decode + RandomResizedCrop to
data.image_size + flip + tokenisation, from prepared JPEG data, timed for both decode paths in the same run:
`full` (PIL decodes the whole image, then crops) and `fast` (data.fast_decode: libjpeg-turbo decodes at the
smallest DCT scale that keeps the crop's resolution, images.random_crop). Normalisation is not host work: the
pipeline sends uint8 pixels and the ViT normalises them on the accelerator (its cost on the host is reported
beside, for reference). The examples are the config's training sources (data.sources, or data.name's train
split), or, with --photos=N, N synthetic photo-like JPEGs of --photo_size (default 640x480, quality 90, about the
size of a COCO photo) written to a temporary prepared folder. It also runs the whole grain pipeline
(make_train_iterator, data.num_threads threads) for --steps batches and reports its samples/s on this machine.

--profile=DIR (train and generate): after the timed steps, PROFILE_CALLS (3) more calls of the same compiled program
run under jax.profiler.trace(DIR); blip2_jax.profiling then reads the trace written there and the program's HLO and
prints, before the figures, the ops' time per step by category (attention, matmul, layer_norm, collective, copy,
other) and the 15 longest ops (with the end of their JAX name stack), also written to DIR/profile.txt and
DIR/profile.json; the result's `profile` entry holds them. docs/benchmarks.md says what the categories count and how
to open the full trace.

--compare=transformers (stage 2): builds transformers' PyTorch `Blip2ForConditionalGeneration` at the same sizes
(benchmark_torch.py, from hf.hf_config_from_ours; random init) on the same accelerator (cuda if torch sees one,
else CPU), with the ViT and the LLM in config.frozen_dtype and the Q-Former, query tokens and language projection
in float32 (fp32 master weights) run under torch.autocast in config.model.qformer.dtype, as our config computes
them. It times
- train: the forward and LM loss on the same batch (num_query_tokens image placeholder tokens first in input_ids,
  as transformers >= 4.47 wants; no KV cache), backward, and an AdamW step (config.optimizer's lr, betas, weight
  decay) over the Q-Former, query tokens and language_projection (the ViT and the LLM have requires_grad=False
  and run in eval mode: no dropout, as ours; ours also trains ln_vision, HF's frozen post_layernorm);
- generate: `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False, num_beams=--num_beams)` on the same
  images and prompt,
after 2 warm-up calls, with torch.cuda.synchronize(). It runs first and frees its model and torch's cached memory
before JAX starts; the JAX side then prints both and ours / theirs. When JAX and torch share a GPU, JAX must not
preallocate 75% of it: --compare sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless the environment already sets it
(it must happen before JAX first touches the GPU; exporting it yourself, as in the commands above, is safest).
"""

import collections
import contextlib
import io
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
import transformers

from blip2_jax import benchmark_torch
from blip2_jax import cli
from blip2_jax import hf
from blip2_jax import partitioning
from blip2_jax import profiling
from blip2_jax import state as state_lib
from blip2_jax import tasks
from blip2_jax import train
from blip2_jax.data import images as images_lib
from blip2_jax.data import pipeline
from blip2_jax.data import prepared as prepared_lib
from blip2_jax.models import layers
from blip2_jax.models import llms
from blip2_jax.models import vit as vit_lib

FLAGS = flags.FLAGS

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "H800": 989e12,
  "GH200": 989e12,
  "B200": 2250e12,
  "A100": 312e12,
  "A800": 312e12,
  "L4": 121e12,
  "A10": 125e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}
PROMPT_LENGTH = 4  # "</s>a photo of" in OPT's tokenizer
WARMUP = 2
PROFILE_CALLS = 3  # calls traced by --profile, after the timed ones


def peak_flops(device) -> float | None:
  return _peak(device.device_kind)


def _peak(kind: str) -> float | None:
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


def _sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def _abstract(tree):
  """Shapes and dtypes only, without shardings: what XLA counts is then the whole (global) computation."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@contextlib.contextmanager
def _unrolled_scans():
  """Every lax.scan traced inside is fully unrolled. XLA's cost analysis counts a loop body once, whatever its trip
  count, and the LLMs stack their layers with nn.scan (flax calls jax.lax.scan); unrolled, each layer is counted.
  The computation is the same; only its loop structure differs."""
  scan = jax.lax.scan

  def unrolled(*args, **kwargs):
    return scan(*args, **dict(kwargs, unroll=True))

  jax.lax.scan = unrolled
  try:
    yield
  finally:
    jax.lax.scan = scan


def _flops(fn, *args) -> float:
  """FLOPs of fn(*args) (abstract args) counted by XLA on the graph before compilation and partitioning, with
  scans unrolled, lowered for the CPU: its cost analysis needs no compile (GPU plugins only analyse compiled
  programs, which would cost minutes of compilation on the accelerator)."""
  cost = None
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu
    cpu = None
  with _unrolled_scans():
    if cpu is not None:
      on_cpu = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
      cost = jax.jit(fn).lower(*on_cpu).cost_analysis()
    if not cost or "flops" not in cost:
      cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _check_config(config, mode: str, compare: str):
  if mode not in ("train", "generate"):
    raise ValueError(f"--mode={mode!r}: choose train or generate.")
  stage2 = state_lib.kind(config) != llms.RETRIEVAL
  if not stage2 and (mode == "generate" or compare):
    what = "--mode=generate" if mode == "generate" else f"--compare={compare}"
    raise ValueError(
      f"{what} needs a stage-2 config (configs/stage2_opt.py or stage2_t5.py); stage 1 has "
      "--mode=train only, without --compare."
    )
  if stage2 and config.init.llm_weights == "demo":
    raise ValueError(
      "config.init.llm_weights='demo' is made by training; the benchmark uses random weights: "
      "add --config.init.llm_weights= (sizes from config.model.llm)."
    )


def random_batch(config, batch_size: int, vocab_size: int, seed: int = 0) -> dict:
  """Host arrays with state.dummy_batch's keys and shapes: normal images, token ids in [4, vocab_size - 1) (clear of
  special ids, and of the last id, which the transformers comparison uses as its image placeholder), all-ones
  masks, label_mask ones after the first token ("</s>" is never a label)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, x in jax.eval_shape(lambda: state_lib.dummy_batch(config)).items():
    shape = (batch_size,) + x.shape[1:]
    if key == "image":
      out[key] = rng.standard_normal(shape, np.float32)
    elif key.endswith("_ids"):
      out[key] = rng.integers(4, vocab_size - 1, shape, dtype=np.int32)
    else:
      out[key] = np.ones(shape, np.int32)
      if key == "label_mask":
        out[key][:, 0] = 0
  return out


def _local(batch: dict) -> dict:
  """This process's rows of a global host batch."""
  n, i = jax.process_count(), jax.process_index()
  return {k: np.split(v, n)[i] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def run(config, steps: int, devices=None, profile_dir: str = "") -> dict:
  """The train-step benchmark (stage 1 or 2): compile time, step time, samples/s, model FLOPs, MFU.

  devices: the devices of the mesh (default: all). profile_dir: where to trace PROFILE_CALLS more steps and write
  the profile (_profile), "" for none."""
  _check_config(config, "train", "")
  stage2 = state_lib.kind(config) != llms.RETRIEVAL
  tokenizer = None if stage2 else state_lib.load_tokenizer(config)  # stage 2 on random weights needs none
  setup = state_lib.build(config, tokenizer, devices)
  vocab = setup.model.cfg.llm.vocab_size if stage2 else len(tokenizer)
  b = config.global_batch_size
  host = random_batch(config, b, vocab)
  batch = state_lib.global_batch(_local(host), setup.batch_sharding)
  state, frozen = setup.init(jax.random.PRNGKey(0))
  forward = _forward_flops(setup, partitioning.merge(state["params"], frozen), batch, stage2)
  model_flops = forward["vit"] + 3 * forward["qformer"] + 2 * forward.get("llm", 0.0)

  step_fn = train.make_train_step(setup)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(WARMUP):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  loss = float(jax.device_get(metrics["loss"]))
  profile = None
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILE_CALLS):
        state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready((state, metrics))
    profile = _profile(profile_dir, compiled)
  vit_s = vit_cudnn_s = None
  if stage2:
    params = partitioning.merge(state["params"], frozen)
    vit_s = _time_vit_forward(setup.model.cfg.vit, params, batch["image"], steps)
    if layers.cudnn_attention_available(setup.model.cfg.vit.dtype):
      # The same forward with cuDNN's fused attention (model.vit.attention='cudnn'), for choosing the default.
      try:
        vit_cudnn_s = round(_time_vit_forward(setup.model.cfg.vit, params, batch["image"], steps, "cudnn"), 4)
      except Exception as e:  # pylint: disable=broad-except
        vit_cudnn_s = f"failed: {str(e).splitlines()[0][:200]}"

  n, device = setup.mesh.devices.size, setup.mesh.devices.flat[0]
  peak = peak_flops(device)
  return {
    "mode": "train",
    "stage": 2 if stage2 else 1,
    "device": f"{n} x {device.device_kind}",
    "mesh": dict(setup.mesh.shape),
    "global_batch_size": b,
    "steps_timed": steps,
    "compile_s": round(compile_s, 2),
    "step_s": round(step_s, 4),
    "samples_per_s": round(b / step_s, 1),
    "loss": round(loss, 4),
    "trainable_params": sum(x.size for x in jax.tree.leaves(state["params"])),
    "model_tflop_per_step": _sig(model_flops / 1e12),
    "model_gflop_per_sample": _sig(model_flops / b / 1e9),
    "forward_gflop_per_sample": {k: _sig(v / b / 1e9) for k, v in forward.items()},
    "achieved_tflop_per_s": _sig(model_flops / step_s / 1e12),
    "mfu": None if peak is None else round(model_flops / step_s / (peak * n), 4),
    "peak_tflop_per_s_per_device": None if peak is None else peak / 1e12,
    **({} if vit_s is None else {"vit_forward_s": round(vit_s, 4)}),
    **({} if vit_cudnn_s is None else {"vit_forward_cudnn_attention_s": vit_cudnn_s}),
    **({} if profile is None else {"profile": profile}),
  }


def _profile(profile_dir: str, compiled) -> dict:
  """The profile of the PROFILE_CALLS calls of `compiled` just traced into profile_dir (profiling.summarize),
  also written there as profile.txt (the table) and profile.json."""
  profile = profiling.summarize(profile_dir, [compiled.as_text()], PROFILE_CALLS)
  if jax.process_index() == 0:
    profiling.save(profile, profile_dir)
  return profile


def _time_vit_forward(vit_cfg, params, images, steps: int, attention: str | None = None) -> float:
  """Seconds of the frozen ViT's forward on the batch's images alone (its own jitted program): the step's share
  that is the image encoder, beside transformers' vision_model forward (the rest is Q-Former and LLM).
  attention: a `model.vit.attention` to use instead of the config's."""
  cfg = vit_cfg.copy_and_resolve_references()
  if attention is not None:
    cfg.attention = attention
  model, p = vit_lib.VisionTransformer(cfg), params["visual_encoder"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  jax.block_until_ready(forward(p, images))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = forward(p, images)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def _forward_flops(setup, params, batch, stage2: bool) -> dict:
  """Forward FLOPs of the global batch: {'vit', 'qformer'} (+ 'llm' in stage 2)."""
  model = setup.model
  params, batch = _abstract(params), _abstract(batch)

  def vit(p, x):
    return model.apply({"params": p}, x, method="encode_image")

  flops = {"vit": _flops(vit, params, batch["image"])}
  image_embeds = jax.eval_shape(vit, params, batch["image"])
  if not stage2:

    def qformer(p, e, ids, mask):
      return model.apply(
        {"params": p}, e, ids, mask, train=False, rngs={"itm": jax.random.PRNGKey(0)}, method="stage1_losses"
      )["loss"]

    flops["qformer"] = _flops(qformer, params, image_embeds, batch["text_ids"], batch["text_mask"])
    return flops

  def soft_prompt(p, e):  # Q-Former (query side) + language projection
    return model.apply({"params": p}, e, method=lambda m, e: m.language_projection(m.query_features(e)[0]))

  def whole(p, b):
    return model.apply({"params": p}, b, train=False, method="losses")["loss"]

  flops["qformer"] = _flops(soft_prompt, params, image_embeds)
  flops["llm"] = max(_flops(whole, params, batch) - flops["vit"] - flops["qformer"], 0.0)
  return flops


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def llm_special_ids(config) -> dict:
  """The frozen LLM's bos / eos / pad ids (transformers' defaults where its config leaves them out). Without a pad
  id (LLaMA's configs) the pad is EOS, as HF's generate pads then; bos and eos may be None (Qwen2Config's
  defaults)."""
  llm = transformers.AutoConfig.for_model(**hf.llm_hf_config(config))
  return {
    "bos": getattr(llm, "bos_token_id", None),
    "eos": llm.eos_token_id,
    "pad": llm.eos_token_id if llm.pad_token_id is None else llm.pad_token_id,
    "vocab_size": llm.vocab_size,
    "kind": llm.model_type,
  }


def prompt_ids(config, batch_size: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """A tokenizer-free stand-in for "a photo of": PROMPT_LENGTH ids (one fewer without a BOS), the same for every
  image, as the LLM's tokenizer frames a prompt (a decoder-only LLM: BOS ("</s>" for OPT, "<s>" for LLaMA) + 3
  random ids, or the 3 ids alone for an LLM without a BOS, as Qwen2's tokenizer adds none; an encoder-decoder: 3
  random ids + EOS "</s>"), and an all-ones mask."""
  ids = llm_special_ids(config)
  body = list(np.random.default_rng(seed).integers(4, ids["vocab_size"] - 1, PROMPT_LENGTH - 1))
  if llms.family(ids["kind"]).encoder_decoder:
    row = body + [ids["eos"]]
  else:
    row = ([] if ids["bos"] is None else [ids["bos"]]) + body
  out = np.tile(np.asarray(row, np.int32), (batch_size, 1))
  return out, np.ones_like(out)


def search_options(config, new_tokens: int, num_beams: int = 1) -> tuple:
  """tasks._generate's options: greedy (num_beams 1) or beam search (length penalty 1, HF's default), exactly
  new_tokens tokens (EOS is blocked until the last one). An LLM config without EOS (Qwen2Config's defaults) has
  -1, no token: nothing ends a sequence, as in HF's generate without one, and the pad (then 0) is never
  written."""
  ids = llm_special_ids(config)
  return tuple(
    sorted(
      dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_beams=num_beams,
        eos_token_id=-1 if ids["eos"] is None else ids["eos"],
        pad_token_id=0 if ids["pad"] is None else ids["pad"],
      ).items()
    )
  )


def run_generate(config, steps: int, new_tokens: int, devices=None, num_beams: int = 1, profile_dir: str = "") -> dict:
  """Captioning (greedy, or beam search with num_beams) of exactly new_tokens tokens per image at
  config.global_batch_size, through tasks._generate (soft prompt + prompt + the whole search, one jitted
  program). profile_dir: as run's."""
  _check_config(config, "generate", "")
  setup = state_lib.build(config, None, devices)
  state, frozen = setup.init(jax.random.PRNGKey(0))
  params = partitioning.merge(state["params"], frozen)
  del state  # the optimizer state
  module = layers.frozen_config(setup.model)  # jit's static argument
  b = config.global_batch_size
  images = random_batch(config, b, llm_special_ids(config)["vocab_size"])["image"]  # the same as transformers'
  ids, mask = prompt_ids(config, b)
  inputs = state_lib.global_batch(_local({"image": images, "ids": ids, "mask": mask}), setup.batch_sharding)
  args = (params, inputs["image"], inputs["ids"], inputs["mask"])

  def timed(new_tokens, traced: bool):
    """(compile seconds, seconds per batch, tokens, profile or None) of generating exactly new_tokens tokens;
    `traced`: then PROFILE_CALLS more calls traced into profile_dir."""
    options = search_options(config, new_tokens, num_beams)
    t0 = time.perf_counter()
    with setup.kernel_mesh():
      compiled = tasks._generate.lower(module, *args, options, None).compile()  # pylint: disable=protected-access
    compile_s = time.perf_counter() - t0
    for _ in range(WARMUP):
      tokens = compiled(*args, None)
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for _ in range(steps):
      tokens = compiled(*args, None)
    jax.block_until_ready(tokens)
    batch_s = (time.perf_counter() - t0) / steps
    if not traced:
      return compile_s, batch_s, tokens, None
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILE_CALLS):
        tokens = compiled(*args, None)
      jax.block_until_ready(tokens)
    return compile_s, batch_s, tokens, _profile(profile_dir, compiled)

  compile_s, batch_s, tokens, profile = timed(new_tokens, bool(profile_dir))
  if tokens.shape != (b, new_tokens):
    raise AssertionError(f"Generated tokens {tokens.shape}, expected {(b, new_tokens)}.")
  # One token: the image side (ViT, Q-Former, projection) and the prefill; the rest is the decoding loop.
  _, first_s, _, _ = timed(1, traced=False)
  return {
    "mode": "generate",
    "stage": 2,
    "device": f"{setup.mesh.devices.size} x {setup.mesh.devices.flat[0].device_kind}",
    "mesh": dict(setup.mesh.shape),
    "global_batch_size": b,
    "prompt_tokens": ids.shape[1],
    "new_tokens": new_tokens,
    "num_beams": num_beams,
    "steps_timed": steps,
    "compile_s": round(compile_s, 2),
    "batch_s": round(batch_s, 4),
    "images_per_s": round(b / batch_s, 1),
    "tokens_per_s": round(b * new_tokens / batch_s, 1),
    "first_token_s": round(first_s, 4),
    "per_token_ms": round(1000 * (batch_s - first_s) / max(new_tokens - 1, 1), 3),
    **({} if profile is None else {"profile": profile}),
  }


def synthetic_photos(out_dir: str, count: int, size: tuple[int, int], seed: int = 0) -> str:
  """A prepared folder (data/prepared.py) of `count` photo-like JPEGs (smooth colour fields with detail and
  noise, which compress like photographs, not like flat test patterns) with one caption each."""
  w, h = size
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  with prepared_lib.ShardWriter(out_dir, "photos") as writer:
    for i in range(count):
      a, b, c = rng.uniform(0.5, 3.0, 3)
      base = np.stack(
        [
          127 + 100 * np.sin(a * x / w * 6 + i),
          127 + 100 * np.cos(b * y / h * 6 + 2 * i),
          127 + 100 * np.sin(c * (x + y) / (w + h) * 9),
        ],
        -1,
      )
      pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pixels).save(buf, "JPEG", quality=90)
      writer.write(prepared_lib.encode_record(f"{i:06d}", buf.getvalue(), [f"a photo number {i}"], w, h))
    writer.commit()
  info = {"format_version": prepared_lib.FORMAT_VERSION, "source_format": "synthetic photos", "shards": ["photos"]}
  info["num_samples"] = {"photos": count}
  with open(os.path.join(out_dir, prepared_lib.INFO_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f)
  return out_dir


def run_data(config, steps: int, photos: int = 0, photo_size: tuple[int, int] = (640, 480), samples: int = 400):
  """The input benchmark (--mode=data): samples/s per core of the host's work per example, for the full and the
  fast decode, from the same examples in the same run; and the whole pipeline's samples/s on this machine."""
  data_cfg = config.data
  tokenizer = state_lib.load_tokenizer(config)
  kind = state_lib.kind(config)
  with tempfile.TemporaryDirectory(prefix="blip2_jax_data_benchmark_") as tmp:
    if photos:
      data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
      data_cfg.sources = {"photos": {"path": synthetic_photos(tmp, photos, photo_size), "weight": 1.0}}
    name, source, _ = pipeline.train_sources(data_cfg)[0]
    n = min(samples, len(source))
    raw = [{**source[i], "_where": (name, i)} for i in range(n)]
    sizes = collections.Counter(images_lib.upright_size(images_lib.open_image(r["image"])) for r in raw[:50])
    out = {
      "mode": "data",
      "source": name if not photos else f"{photos} synthetic {photo_size[0]}x{photo_size[1]} JPEGs",
      "examples_timed": n,
      "typical_image_size": "x".join(map(str, sizes.most_common(1)[0][0])),
      "mean_image_kib": round(sum(len(r["image"]) for r in raw) / n / 1024, 1),
      "output_size": data_cfg.image_size,
    }
    batch = 64
    configs = {path: ml_collections.ConfigDict(dict(data_cfg.to_dict(), fast_decode=fast)) for path, fast in PATHS}

    def one_pass(cfg) -> tuple[float, float]:
      start, start_cpu = time.perf_counter(), time.thread_time()
      for first in range(0, n, batch):
        # Each example with a fixed rng of its own, as the pipeline gives it one; None if it is skipped.
        rows = [
          pipeline.train_preprocess(r, np.random.default_rng(first + i), cfg, kind)
          for i, r in enumerate(raw[first : first + batch])
        ]
        rows = [r for r in rows if r is not None]
        stacked = {k: [r[k] for r in rows] for k in rows[0]}
        stacked["image"] = np.stack(stacked["image"])
        pipeline._tokenize_batch(stacked, tokenizer, cfg, kind)
      return n / (time.perf_counter() - start), n / (time.thread_time() - start_cpu)

    # The two paths alternate, DATA_ROUNDS passes each after a warm-up pass. A shared machine's speed drifts by
    # tens of percent from one second to the next, which one pass each would attribute to the decode, so each path
    # reports the samples per CPU-second of its thread (time the thread ran, not time it waited for a core: the
    # per-core figure), and beside it the wall-clock median and best pass.
    rates = {path: [] for path, _ in PATHS}
    for round_ in range(DATA_ROUNDS + 1):
      for path, _ in PATHS:
        rate = one_pass(configs[path])
        if round_:
          rates[path].append(rate)
    for path, _ in PATHS:
      wall, cpu = np.asarray(rates[path]).T
      out[f"{path}_decode_samples_per_s_per_core"] = round(float(np.median(cpu)), 1)
      out[f"{path}_decode_wall_median_samples_per_s"] = round(float(np.median(wall)), 1)
      out[f"{path}_decode_wall_best_samples_per_s"] = round(float(wall.max()), 1)
    out["fast_over_full"] = round(
      out["fast_decode_samples_per_s_per_core"] / out["full_decode_samples_per_s_per_core"], 2
    )
    pixels = np.stack([pipeline.train_preprocess(raw[0], np.random.default_rng(0), data_cfg, kind)["image"]] * batch)
    start = time.perf_counter()
    for _ in range(5):
      images_lib.normalize(pixels)
    out["host_normalisation_ms_per_sample_if_done_on_host"] = round((time.perf_counter() - start) / 5 / batch * 1e3, 3)
    if steps:
      it = pipeline.make_train_iterator(data_cfg, tokenizer, global_batch_size=batch, seed=0, kind=kind)
      next(it)
      start = time.perf_counter()
      for _ in range(steps):
        next(it)
      out["pipeline_threads"] = data_cfg.num_threads
      out["pipeline_samples_per_s"] = round(steps * batch / (time.perf_counter() - start), 1)
      out["host_cpu_cores"] = os.cpu_count()
  return out


PATHS = (("full", False), ("fast", True))
DATA_ROUNDS = 7


def benchmark(
  config,
  mode: str = "train",
  steps: int = 20,
  new_tokens: int = 30,
  compare: str = "",
  devices=None,
  photos: int = 0,
  photo_size: tuple[int, int] = (640, 480),
  num_beams: int = 1,
  profile_dir: str = "",
) -> dict:
  """Ours (with compare='transformers', theirs first, then ours) -> one dict, with ours / theirs.

  devices: the devices of our mesh (default: all). profile_dir: where to trace and profile our program (train and
  generate modes), "" for no profile."""
  if mode == "data":
    if profile_dir:
      raise ValueError("--profile traces the train or generate mode's compiled program; --mode=data has none.")
    return run_data(config, steps, photos, photo_size)
  _check_config(config, mode, compare)
  theirs = {}
  if compare:
    special = llm_special_ids(config)
    theirs = benchmark_torch.compare_transformers(
      config,
      mode,
      steps,
      new_tokens,
      batch=random_batch(config, config.global_batch_size, special["vocab_size"]),
      prompt=prompt_ids(config, config.global_batch_size),
      special_ids=special,
      warmup=WARMUP,
      num_beams=num_beams,
    )
  if mode == "train":
    ours = run(config, steps, devices, profile_dir)
  else:
    ours = run_generate(config, steps, new_tokens, devices, num_beams, profile_dir)
  if not compare:
    return ours
  out = dict(ours, **theirs)
  if mode == "train":
    # From the unrounded times: samples/s are rounded to 0.1, too coarse for a CPU's ~1 sample/s.
    out["speedup_vs_transformers"] = round(theirs["transformers_step_s"] / ours["step_s"], 3)
    peak = _peak(theirs["transformers_device"])  # the same model FLOPs per step, at their step time
    out["transformers_mfu"] = (
      None if peak is None else round(ours["model_tflop_per_step"] * 1e12 / theirs["transformers_step_s"] / peak, 4)
    )
  else:
    out["speedup_vs_transformers"] = round(theirs["transformers_batch_s"] / ours["batch_s"], 3)
  return out


def _photo_size() -> tuple[int, int]:
  try:
    w, h = (int(v) for v in FLAGS.photo_size.lower().split("x"))
  except ValueError:
    raise ValueError(f"--photo_size={FLAGS.photo_size!r}: give WIDTHxHEIGHT, e.g. 640x480.") from None
  return w, h


def main(argv):
  del argv
  if FLAGS.compare:
    # Before JAX's backend starts (nothing above has touched it): JAX must leave torch room on a shared GPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    out = benchmark(
      FLAGS.config,
      FLAGS.mode,
      FLAGS.steps,
      FLAGS.new_tokens,
      FLAGS.compare,
      photos=FLAGS.photos,
      photo_size=_photo_size(),
      num_beams=FLAGS.num_beams,
      profile_dir=FLAGS.profile,
    )
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    if "profile" in out:
      print(profiling.format_table(out["profile"]) + "\n")
    width = max(map(len, out))
    for k, v in out.items():
      if k != "profile":
        print(f"{k:<{width}}  {v if v is not None else 'n/a (peak unknown for this device)'}")
    print(json.dumps(out))


if __name__ == "__main__":
  # Tests import this module's functions: its flags exist only when it is the program.
  config_flags.DEFINE_config_file("config", None, "Config to benchmark.", lock_config=True)
  flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "generate", "data"],
    "train: the trainer's update step (stage 1 or 2); generate: captioning (stage 2); data: the input "
    "pipeline's host work per example, full against fast JPEG decoding.",
  )
  flags.DEFINE_integer("photos", 0, "--mode=data: time N synthetic photo-like JPEGs instead of the config's data.")
  flags.DEFINE_string("photo_size", "640x480", "--mode=data: the size of the --photos JPEGs, WxH.")
  flags.DEFINE_integer("steps", 20, "Timed steps or batches (after compilation and 2 warm-up calls).")
  flags.DEFINE_integer("new_tokens", 30, "--mode=generate: tokens generated per image (min = max).")
  flags.DEFINE_integer("num_beams", 1, "--mode=generate: 1 = greedy, more = beam search with that many beams.")
  flags.DEFINE_string(
    "profile",
    "",
    "--mode=train or generate: a directory; after the timed steps, trace 3 more under jax.profiler.trace there and "
    "print where their time went (the top ops, the shares of attention, matmuls, layer norms, collectives, "
    "copies), also written to DIR/profile.txt and profile.json.",
  )
  flags.DEFINE_enum(
    "compare",
    "",
    ["", "transformers"],
    "transformers: also time transformers' PyTorch BLIP-2 at the same configuration (stage 2).",
  )
  app.run(main, flags_parser=cli.parse_flags)
