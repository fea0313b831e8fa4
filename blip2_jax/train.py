r"""BLIP-2 trainer: `python -m blip2_jax.train --config=configs/stage1.py[:VARIANT] --workdir=DIR`.

One flat main() in sections, big_vision style: mesh -> tokenizer and input pipeline -> model and optimizer ->
born-sharded state (or resume) -> update step -> loop with logging, evaluation and checkpoints. The same
program runs on one CPU, on 8 fake CPU devices, on a GPU node and on a TPU pod; only the mesh changes.
"""
import dataclasses
import logging
import math
import os
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from flax import traverse_util

from blip2_jax import cli
from blip2_jax import checkpointing
from blip2_jax import collapse
from blip2_jax import optim
from blip2_jax import partitioning
from blip2_jax.data import pipeline
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.metric_writer import MetricWriter
from blip2_jax.models.blip2 import Blip2LLM, Blip2Qformer

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  pass


# --------------------------------------------------------------------------------------------------------------
# Pieces shared with evaluate.py and benchmark.py
# --------------------------------------------------------------------------------------------------------------

def is_stage2(config) -> bool:
  return "llm" in config.model


def load_tokenizer(config):
  """Stage 1: the Q-Former's BERT tokenizer (+ [DEC]). Stage 2: the LLM's own tokenizer, from its directory."""
  if is_stage2(config):
    import transformers  # pylint: disable=g-import-not-at-top
    path = config.tokenizer or config.init.llm_weights
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(f"No LLM tokenizer directory {path!r}: set config.tokenizer (or "
                              "config.init.llm_weights) to a local Hugging Face OPT / T5 directory.")
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  path = tokenizer_lib.demo_vocab_path() if config.tokenizer == "demo" else config.tokenizer
  if not path:
    raise ValueError("config.tokenizer is empty: give a local bert-base-uncased directory (HF layout) or a "
                     "WordPiece vocab .txt file.")
  return tokenizer_lib.load_tokenizer(path)


def llm_config(config) -> ml_collections.ConfigDict:
  """The frozen LLM's config: from the config.json of config.init.llm_weights (an HF OPT / T5 directory, or a
  BLIP-2 one whose text_config is used) when given, else config.model.llm (random weights, e.g. benchmarks)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  llm = config.model.llm
  path = config.init.llm_weights
  extra = {}
  if path:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"No config.json in config.init.llm_weights={path!r}: give a local Hugging Face "
                              "OPT / T5 (or BLIP-2) directory.")
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
    prefix = "language_model." if hf.get("model_type") == "blip-2" else ""
    hf = hf["text_config"] if prefix else hf
    if hf.get("model_type") == "t5":  # whether the head is the shared table shows in the tensors only
      from blip2_jax import weights  # pylint: disable=g-import-not-at-top
      extra = {"has_lm_head": prefix + "lm_head.weight" in weights.read_safetensors_dir(path)}
  else:
    hf = {k: v for k, v in llm.to_dict().items() if k not in ("kind", "dtype", "remat_policy")}
    hf["model_type"] = llm.kind
  kind = hf.get("model_type")
  if kind not in ("opt", "t5"):
    raise ValueError(f"The frozen LLM's model_type {kind!r} is not supported: blip2_jax has OPT and T5.")
  cfg = importlib.import_module(f"blip2_jax.models.{kind}").config_from_hf(
      hf, dtype=llm.dtype, remat_policy=llm.remat_policy, **extra)
  cfg.kind = kind
  return cfg


def resolve_demo_llm(config, workdir: str):
  """config.init.llm_weights == "demo": the demo's tiny caption-trained LLM, made once in WORKDIR/demo_llm
  (blip2_jax.demo_llm) and then read like any HF directory; the workdir's config.json records its path."""
  if not is_stage2(config) or config.init.llm_weights != "demo":
    return config
  from blip2_jax import demo_llm  # pylint: disable=g-import-not-at-top
  path = demo_llm.make_demo_llm(config.model.llm.kind, os.path.join(os.path.abspath(workdir), "demo_llm"),
                                config.data, steps=config.init.demo_llm_steps, seed=config.seed)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init.llm_weights = str(path)
  return config


def model_config(config, tokenizer) -> ml_collections.ConfigDict:
  """config.model with the tokenizer-dependent fields filled in (vocab size, [DEC] id; stage 2: the LLM)."""
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  if cfg.vit.image_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} differs from "
                     f"config.model.vit.image_size={cfg.vit.image_size}.")
  if is_stage2(config):
    cfg.llm = llm_config(config)
    cfg.qformer.text_input = False  # stage 2 drops the Q-Former's text side (LAVIS)
    return cfg
  vocab = len(tokenizer)
  if cfg.qformer.vocab_size == 0:
    cfg.qformer.vocab_size = vocab
  elif cfg.qformer.vocab_size < vocab:
    raise ValueError(f"config.model.qformer.vocab_size={cfg.qformer.vocab_size} is smaller than the "
                     f"tokenizer's {vocab} tokens (incl. [DEC]).")
  cfg.bos_token_id = tokenizer.bos_token_id
  return cfg


def dummy_batch(config, batch_size: int = 1) -> dict:
  """A batch of the right structure and shapes (zeros), for init and abstract evaluation."""
  s, L = config.data.image_size, config.data.max_text_len
  batch = {"image": jnp.zeros((batch_size, s, s, 3), jnp.float32)}
  text_keys = {"qformer": ("text_ids", "text_mask"), "opt": ("text_ids", "text_mask", "label_mask"),
               "t5": ("text_ids", "text_mask", "target_ids", "target_mask")}[config.data.get("text_format",
                                                                                              "qformer")]
  batch.update({k: jnp.ones((batch_size, L), jnp.int32) for k in text_keys})
  return batch


@dataclasses.dataclass
class Setup:
  """What every entry point needs: the model, the mesh, shardings and an init function."""
  model: nn.Module  # Blip2Qformer (stage 1) or Blip2LLM (stage 2)
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: dict
  frozen_shardings: dict
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: dict
  init: callable  # rng -> (state, frozen), born sharded


def build(config, tokenizer, devices=None) -> Setup:
  mesh = partitioning.make_mesh(dict(config.sharding.mesh), devices)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  cfg = model_config(config, tokenizer)
  model = Blip2LLM(cfg) if is_stage2(config) else Blip2Qformer(cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  dummy = dummy_batch(config)
  frozen_dtype = jnp.dtype(config.frozen_dtype)

  def init_params(rng):
    boxed = model.init({"params": rng, "itm": rng}, dummy, train=False, method="losses")["params"]
    return partitioning.split_frozen(boxed, config.frozen_params)

  boxed_trainable, boxed_frozen = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  param_sh = partitioning.logical_to_shardings(boxed_trainable, mesh, rules)
  frozen_sh = partitioning.logical_to_shardings(boxed_frozen, mesh, rules)
  repl = partitioning.replicated(mesh)

  def init(rng):
    trainable, frozen = (nn.unbox(t) for t in init_params(rng))
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
             "rng": jax.random.fold_in(rng, 1)}
    return state, frozen

  abstract_state, _ = jax.eval_shape(init, jax.random.PRNGKey(0))
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
                                 transform_non_params=lambda _: repl)
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
  init_jit = jax.jit(init, out_shardings=(state_sh, frozen_sh))
  return Setup(model, mesh, rules, tx, schedule, state_sh, frozen_sh,
               partitioning.batch_sharding(mesh, rules), abstract_state, init_jit)


def _host_copy(tree):
  """Full numpy copies of (possibly multi-host sharded) arrays."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def load_pretrained(config, setup: Setup, state, frozen, *, frozen_only: bool = False):
  """Replaces random init with the weights config.init names ('' keeps the random init):
  - vision_weights: a HF BLIP-2 directory -> the frozen ViT (and ln_vision);
  - stage 1: bert_weights (the Q-Former from BERT, as LAVIS starts stage 1) or lavis_weights (a LAVIS stage-1
    .pth: the whole model, to continue stage 1);
  - stage 2: llm_weights (the frozen LLM: a HF OPT / T5 directory, or a BLIP-2 one) and qformer_weights (a
    stage-1 workdir or a HF BLIP-2 directory: query_tokens, ln_vision and the Q-Former's query side).
  Frozen weights are read one parameter at a time straight onto their shardings. With frozen_only (resuming)
  only the frozen towers are read; the rest comes from the checkpoint."""
  from blip2_jax import weights  # pylint: disable=g-import-not-at-top
  init = config.init
  frozen_flat = traverse_util.flatten_dict(frozen, sep="/")
  frozen_sh = traverse_util.flatten_dict(setup.frozen_shardings, sep="/")
  updates = {}  # trainable path -> numpy (the small, trainable side)

  def place_frozen(path, x):
    return jax.make_array_from_callback(x.shape, frozen_sh[path], lambda idx: x[idx])

  def read_frozen(ckpt, entries, top, prefix=""):
    entries = [e for e in entries if e[0].split("/")[0] == top]
    tree = weights.tree_from_hf(ckpt, entries, {top: frozen[top]}, prefix=prefix, place=place_frozen,
                                dtype=lambda path: frozen_flat[path].dtype)
    frozen_flat.update(traverse_util.flatten_dict(tree, sep="/"))

  def read_trainable(ckpt, entries):
    template = traverse_util.unflatten_dict(
        {p: v for p, v in traverse_util.flatten_dict(state["params"], sep="/").items()
         if p in {e[0] for e in entries}}, sep="/")
    updates.update(traverse_util.flatten_dict(weights.tree_from_hf(ckpt, entries, template), sep="/"))

  cfg = setup.model.cfg
  if init.vision_weights:
    ckpt = weights.read_safetensors_dir(init.vision_weights)
    vision = weights.vision_weight_map(cfg.vit.depth)
    read_frozen(ckpt, vision, "visual_encoder")
    if not frozen_only:
      read_trainable(ckpt, [e for e in vision if e[0].startswith("ln_vision/")])
  if is_stage2(config) and init.llm_weights:
    _read_llm(init.llm_weights, cfg.llm, read_frozen)
  if not frozen_only:
    if is_stage2(config) and init.qformer_weights:
      updates.update(_stage2_qformer(init.qformer_weights, cfg, read_trainable))
    elif not is_stage2(config) and (init.bert_weights or init.lavis_weights):
      host = _host_copy(state["params"])
      if init.lavis_weights:
        from blip2_jax import lavis  # pylint: disable=g-import-not-at-top
        loaded, _ = lavis.load_lavis_checkpoint(init.lavis_weights, partitioning.merge(host, _host_copy(frozen)))
      else:
        loaded = weights.load_qformer_from_bert(init.bert_weights, host)
      for path, value in traverse_util.flatten_dict(loaded, sep="/").items():
        if path in frozen_flat:
          frozen_flat[path] = place_frozen(path, np.asarray(value, frozen_flat[path].dtype))
        else:
          updates[path] = value

  frozen = traverse_util.unflatten_dict(frozen_flat, sep="/")
  if updates:
    # Adam's moments start at zero whatever the weights, so only the params change.
    flat = traverse_util.flatten_dict(state["params"], sep="/")
    sh = traverse_util.flatten_dict(setup.state_shardings["params"], sep="/")
    for path, value in updates.items():
      x = np.asarray(value, flat[path].dtype)
      if x.shape != flat[path].shape:
        raise ValueError(f"Pretrained `{path}` has shape {x.shape}, the model {flat[path].shape}.")
      flat[path] = jax.make_array_from_callback(x.shape, sh[path], lambda idx, x=x: x[idx])
    state = dict(state, params=traverse_util.unflatten_dict(flat, sep="/"))
  return state, frozen


def _read_llm(path, llm_cfg, read_frozen):
  """The frozen LLM from a HF OPT / T5 directory, or from the language_model.* of a HF BLIP-2 one."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from blip2_jax import weights  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    prefix = "language_model." if json.load(f).get("model_type") == "blip-2" else ""
  table = importlib.import_module(f"blip2_jax.models.{llm_cfg.kind}").weight_map(llm_cfg)
  read_frozen(weights.read_safetensors_dir(path), [(f"language_model/{p}", n, k) for p, n, k in table],
              "language_model", prefix)


def _stage2_qformer(path, cfg, read_trainable) -> dict:
  """Stage 2's starting Q-Former: the query side of a stage-1 workdir's latest checkpoint, or of a HF BLIP-2
  directory (query_tokens, ln_vision, Q-Former layers without the text FFN)."""
  from blip2_jax import weights  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(path, "checkpoints")):
    from blip2_jax import pretrained  # pylint: disable=g-import-not-at-top
    stage1 = traverse_util.flatten_dict(pretrained.Blip2.from_workdir(path).params, sep="/")
    wanted = {e[0] for e in weights.qformer_weight_map(cfg, text=False)} | {"ln_vision/scale", "ln_vision/bias"}
    missing = sorted(wanted - set(stage1))
    if missing:
      raise ValueError(f"Stage-1 workdir {path} has no `{missing[0]}`: its Q-Former differs from the config.")
    log.info("Stage-2 Q-Former from the stage-1 workdir %s.", path)
    return {p: np.asarray(multihost_utils.process_allgather(stage1[p], tiled=True), np.float32) for p in wanted}
  entries = weights.qformer_weight_map(cfg, text=False) + [
      e for e in weights.vision_weight_map(cfg.vit.depth) if e[0].startswith("ln_vision/")]
  read_trainable(weights.read_safetensors_dir(path), entries)
  log.info("Stage-2 Q-Former from the BLIP-2 checkpoint %s.", path)
  return {}


def make_train_step(setup: Setup):
  """The jitted update. Gradients are taken w.r.t. the trainable tree only; the state is donated."""
  model, tx, schedule = setup.model, setup.tx, setup.schedule

  def train_step(state, frozen, batch):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    itm_rng, dropout_rng = jax.random.split(step_rng)

    def loss_fn(params):
      out = model.apply({"params": partitioning.merge(params, frozen)}, batch, train=True,
                        rngs={"itm": itm_rng, "dropout": dropout_rng}, method="losses")
      return out["loss"], out

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, lr=schedule(state["step"]), grad_norm=optax.global_norm(grads))
    if "temp" in state["params"]:
      metrics["temp"] = state["params"]["temp"]
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, setup.frozen_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, partitioning.replicated(setup.mesh)),
                 donate_argnums=(0,))


def make_image_gain_fn(setup: Setup):
  """Stage 2's collapse check (collapse.py): the loss on a batch with its images shifted by one, minus the loss
  with the right images; about zero when the soft prompts carry nothing about the image. Run at logged steps."""
  model = setup.model

  def image_gain(params, frozen, batch):
    variables = {"params": partitioning.merge(params, frozen)}
    loss = model.apply(variables, batch, train=False, method="losses")["loss"]
    shifted = dict(batch, image=jnp.roll(batch["image"], 1, axis=0))
    return model.apply(variables, shifted, train=False, method="losses")["loss"] - loss

  return jax.jit(image_gain, in_shardings=(setup.state_shardings["params"], setup.frozen_shardings,
                                           setup.batch_sharding),
                 out_shardings=partitioning.replicated(setup.mesh))


def global_batch(local_batch: dict, sharding) -> dict:
  """Each process holds its own rows; together they form the global batch, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def restore_or_init(config, setup: Setup, mngr):
  """This run's latest checkpoint if there is one, else the init sources config.init names."""
  state, frozen = setup.init(jax.random.PRNGKey(config.seed))
  latest = mngr.latest_step()
  if latest is None:
    state, frozen = load_pretrained(config, setup, state, frozen)
    return state, frozen, None
  # Frozen weights are not in checkpoints: they come from their source, as at the start.
  _, frozen = load_pretrained(config, setup, state, frozen, frozen_only=True)
  abstract = checkpointing.abstract_like(setup.abstract_state, setup.state_shardings)
  state, data_state = checkpointing.restore(mngr, latest, abstract)
  log.info("Resumed from %s at step %d.", mngr.directory, latest)
  return state, frozen, data_state


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Runs training to config.total_steps (resuming from workdir if possible); returns the last metrics.

  devices: the devices of the mesh (default: all)."""
  from blip2_jax import evaluate  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  config = resolve_demo_llm(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  # 1. Tokenizer and input pipeline: each process reads only its share of the global batch.
  tokenizer = load_tokenizer(config)
  if config.global_batch_size % jax.process_count():
    raise ValueError(f"config.global_batch_size={config.global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  train_iter = pipeline.make_train_iterator(
      config.data, tokenizer, global_batch_size=config.global_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  # 2. Model, optimizer, mesh and shardings; parameters are born sharded.
  setup = build(config, tokenizer, devices)
  data_parallel = math.prod(setup.mesh.shape[a] for a in jax.tree.leaves(dict(setup.rules)["batch"]))
  if config.global_batch_size % data_parallel:
    raise ValueError(f"config.global_batch_size={config.global_batch_size} is not divisible by the "
                     f"{data_parallel} devices the batch is split over (mesh {dict(setup.mesh.shape)}).")
  mngr = checkpointing.manager(workdir, config.keep_checkpoints)
  state, frozen, data_state = restore_or_init(config, setup, mngr)
  if data_state is not None:
    train_iter.set_state(data_state)
  train_step = make_train_step(setup)
  evaluator = evaluate.make_evaluator(config, setup, tokenizer)
  writer = MetricWriter(workdir)
  guard = collapse.CollapseGuard(global_batch_size=config.global_batch_size,
                                 warmup_steps=config.optimizer.warmup_steps,
                                 patience=config.collapse_patience, stage2=is_stage2(config))
  image_gain = make_image_gain_fn(setup) if is_stage2(config) and config.collapse_patience else None

  # 3. The loop. Metrics of step s are read back after step s+1 is dispatched, so the host never stalls the
  # device; a checkpoint is written only after its step's loss was seen to be finite.
  step = int(jax.device_get(state["step"]))
  progress = _progress_bar(step, config.total_steps)
  try:
    last = _loop(config, setup, state, frozen, step, train_iter, train_step, evaluator, mngr, writer, progress,
                 guard, image_gain)
    _write_examples(workdir, evaluator, writer, config.total_steps)
  finally:
    # Also on an error: let the checkpoints already queued finish writing, so nothing saved is lost.
    progress.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return last


def _loop(config, setup, state, frozen, step, train_iter, train_step, evaluator, mngr, writer, progress, guard,
          image_gain):
  """One batch at a time from the iterator through the update; logging, checkpoints and evaluation."""
  start_step, t0, last = step, time.time(), {}
  pending = None
  while step < config.total_steps:
    batch = global_batch(next(train_iter), setup.batch_sharding)
    state, metrics = train_step(state, frozen, batch)
    step += 1
    if pending is not None:
      last = _check_finite(*pending)
    pending = (step, metrics)

    if step % config.log_every == 0 or step == config.total_steps:
      last = _check_finite(*pending)
      pending = None
      dt = time.time() - t0
      last["samples_per_s"] = (step - start_step) * config.global_batch_size / max(dt, 1e-9)
      last["skipped_images"] = pipeline.num_skipped_images()
      if image_gain is not None:
        last["lm_image_gain"] = float(image_gain(state["params"], frozen, batch))
      guard.update(step, last)
      start_step, t0 = step, time.time()
      writer.write(step, last)
      progress.set_postfix(loss=f"{last['loss']:.3f}", samples_per_s=f"{last['samples_per_s']:.0f}")
    progress.update(1)

    is_last = step == config.total_steps
    if step % config.checkpoint_every == 0 or is_last:
      if pending is not None:
        last = _check_finite(*pending)
        pending = None
      checkpointing.save(mngr, step, state, train_iter.get_state())
    evaluate_now = bool(config.eval_every) and step % config.eval_every == 0
    if evaluate_now or is_last:
      params = partitioning.merge(state["params"], frozen)
      n = config.eval.during_training_images
      if evaluate_now and n:
        # A cheap look on the split's first n images, every eval_every steps, as a curve of its own (eval_N/).
        _log_eval(step, {k.replace("eval/", f"eval_{n}/", 1): v for k, v in evaluator.run(params, n).items()},
                  writer, last)
      if is_last or not n:
        _log_eval(step, evaluator.run(params), writer, last)
      t0 = time.time()  # evaluation time is not training throughput
  return last


def _log_eval(step: int, metrics: dict, writer, last: dict):
  writer.write(step, metrics)
  last.update(metrics)
  log.info("step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})


def _write_examples(workdir: str, evaluator, writer, step: int):
  """WORKDIR/examples.png and the same picture in TensorBoard: the last evaluation's first held-out examples."""
  if jax.process_index() != 0 or evaluator.shown is None:
    return
  picture = evaluator.picture()
  path = os.path.join(workdir, "examples.png")
  picture.save(path)
  writer.write_image(step, "examples", np.asarray(picture))
  log.info("Wrote %s.", path)


def _check_finite(step: int, metrics) -> dict:
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(metrics["loss"]):
    parts = ", ".join(f"{k[5:]}={v}" for k, v in metrics.items() if k.startswith("loss_"))
    raise TrainingError(f"Non-finite loss {metrics['loss']} at step {step} ({parts}); stopping without saving "
                        f"it. The last checkpoint is intact: lower config.optimizer.lr or check the data.")
  return metrics


def _progress_bar(initial: int, total: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="train", unit="step", disable=jax.process_index() != 0,
              dynamic_ncols=True)


def main(argv):
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (checkpoints, metrics.jsonl and TensorBoard files go there).")
  if FLAGS.multihost:
    jax.distributed.initialize()  # finds the coordinator on TPU pods, SLURM, Open MPI and Kubernetes
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty at INFO
  logging.getLogger("blip2_jax").setLevel(logging.INFO)
  try:
    last = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (TrainingError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print({k: round(v, 4) for k, v in last.items()})


if __name__ == "__main__":
  # Flags are defined only when run as a program, so train/evaluate/benchmark can import each other.
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node GPU).")
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
