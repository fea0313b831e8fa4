"""A BLIP-2 model and its sharded state from a config; pretrained weights in; a training workdir restored.

What the trainer, the evaluators, the benchmark and the `Blip2` API all need before their own work starts (as
MaxText's max_utils): the tokenizer, the model config with what the tokenizer and the LLM's config.json decide,
the module, the mesh and the shardings of every parameter, a jitted init that makes parameters born sharded
(`build` -> `Setup`), the weights `config.init` names (`load_pretrained`), this run's latest checkpoint
(`restore_or_init`, `restore_workdir`), and a Hugging Face BLIP-2 directory (`load_hf_blip2`). Every way in reads
tensors one at a time through a name table (`weights.tree_from_hf`) straight onto their shardings (`_placer`).

The model's kind is `kind(config)`: models.llms.RETRIEVAL for stage 1, else the frozen LLM's family.
"""

import dataclasses
import itertools
import json
import logging
import os
from pathlib import Path
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from blip2_jax import checkpointing
from blip2_jax import demo_llm
from blip2_jax import hf
from blip2_jax import lavis
from blip2_jax import optim
from blip2_jax import partitioning
from blip2_jax import weights
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import layers
from blip2_jax.models import llms
from blip2_jax.models import lora
from blip2_jax.models import vit as vit_lib
from blip2_jax.models.blip2 import Blip2LLM
from blip2_jax.models.blip2 import Blip2Qformer
from blip2_jax.models.blip2 import qformer_text_input

log = logging.getLogger(__name__)

# Serving default: weights split over every device along their "embed" axis (FSDP-style), batch over all of them.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vit_embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
  ("norm", None),
)
_FROZEN_TOPS = ("visual_encoder", "ln_vision", "language_model")  # what a from_pretrained `dtype` applies to


def kind(config) -> str:
  """The kind of model a training config builds: llms.RETRIEVAL (stage 1) or the LLM family (stage 2)."""
  return llms.kind_of(config.model)


# --------------------------------------------------------------------------------------------------------------
# Config -> tokenizer, model config, module
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(config):
  """Stage 1: the Q-Former's BERT tokenizer (+ [DEC]). Stage 2: the LLM's own tokenizer, from its directory."""
  if kind(config) != llms.RETRIEVAL:
    path = config.tokenizer or config.init.llm_weights
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(
        f"No LLM tokenizer directory {path!r}: set config.tokenizer (or "
        "config.init.llm_weights) to a local Hugging Face OPT / T5 directory."
      )
    return tokenizer_lib.load_llm_tokenizer(path)
  path = (
    tokenizer_lib.demo_vocab_path(config.tokenizer)
    if config.tokenizer in tokenizer_lib.DEMO_VOCABS
    else config.tokenizer
  )
  if not path:
    raise ValueError(
      "config.tokenizer is empty: give a local bert-base-uncased directory (HF layout) or a WordPiece vocab .txt file."
    )
  return tokenizer_lib.load_tokenizer(path)


def load_qformer_tokenizer(config):
  """The Q-Former's own (BERT WordPiece, + [DEC]) tokenizer of a question-conditioned stage-2 model
  (config.model.qformer_text_input, VQA fine-tuning), from config.qformer_tokenizer: a local bert-base-uncased
  directory, a WordPiece vocab .txt, or a vocabulary shipped with the package ("demo": synthetic_shapes' words,
  "demo_vqa": synthetic_vqa's). None for every other model, which has no Q-Former text input."""
  if kind(config) == llms.RETRIEVAL or not qformer_text_input(config.model):
    return None
  name = config.get("qformer_tokenizer", "") or ""
  if not name:
    raise ValueError(
      "config.model.qformer_text_input needs config.qformer_tokenizer, the Q-Former's BERT tokenizer: a local "
      f"bert-base-uncased directory, a WordPiece vocab .txt file, or one of {', '.join(tokenizer_lib.DEMO_VOCABS)}."
    )
  path = tokenizer_lib.demo_vocab_path(name) if name in tokenizer_lib.DEMO_VOCABS else name
  if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".txt"))):
    raise FileNotFoundError(
      f"config.qformer_tokenizer={name!r} is neither a local bert-base-uncased directory nor a WordPiece vocab .txt "
      f"file, nor one of the shipped vocabularies ({', '.join(tokenizer_lib.DEMO_VOCABS)})."
    )
  return tokenizer_lib.load_tokenizer(path)


def _read_hf_config(path: str) -> tuple[dict, str]:
  """The LLM's HF config dict of an LLM or BLIP-2 directory, and the prefix of its tensors' names there."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(
      f"No config.json in config.init.llm_weights={path!r}: give a local Hugging Face OPT / T5 (or BLIP-2) directory."
    )
  with open(file, encoding="utf-8") as f:
    config = json.load(f)
  if config.get("model_type") in ("blip-2", "instructblip"):
    return config["text_config"], "language_model."
  return config, ""


class _TensorNames:
  """`name in names`: whether the LLM checkpoint in `path` has a tensor `prefix + name`; read only when asked (a
  family whose config.json says everything never opens the weights)."""

  def __init__(self, path: str, prefix: str):
    self.path, self.prefix = path, prefix

  def __contains__(self, name: str) -> bool:
    return self.prefix + name in weights.read_safetensors_dir(self.path)


def llm_config(config) -> ml_collections.ConfigDict:
  """The frozen LLM's config: from the config.json of config.init.llm_weights (an HF LLM directory, or a BLIP-2
  one whose text_config is used) when given, else config.model.llm (random weights, e.g. benchmarks)."""
  llm = config.model.llm
  path = config.init.llm_weights
  if path:
    hf_config, prefix = _read_hf_config(path)
    names = _TensorNames(path, prefix)
    if hf_config.get("model_type") != llm.kind and hf_config.get("model_type") in llms.FAMILIES:
      raise ValueError(
        f"config.init.llm_weights={path!r} holds a {hf_config['model_type']!r} model but "
        f"config.model.llm.kind is {llm.kind!r}: use the config of that family."
      )
  else:
    hf_config = dict(hf.llm_hf_config(config))
    names = None
  return llms.llm_config(
    hf_config,
    dtype=llm.dtype,
    remat_policy=llm.remat_policy,
    tensor_names=names,
    attention=llm.get("attention", "xla"),
  )


# How long the other processes of a multi-process run wait for process 0 to pretrain the demo LLM.
DEMO_LLM_TIMEOUT_S = 3600
_DEMO_LLM_BARRIERS = itertools.count(1)  # a new barrier name per call


def resolve_demo_llm(config, workdir: str):
  """config.init.llm_weights == "demo": the demo's tiny caption-trained LLM, made once in WORKDIR/demo_llm
  (blip2_jax.demo_llm) and then read like any HF directory; the workdir's config.json records its path."""
  if kind(config) == llms.RETRIEVAL or config.init.llm_weights != "demo":
    return config

  def make():
    return demo_llm.make_demo_llm(
      config.model.llm.kind,
      os.path.join(os.path.abspath(workdir), "demo_llm"),
      config.data,
      steps=config.init.demo_llm_steps,
      seed=config.seed,
    )

  # Several processes share the workdir: process 0 makes the LLM while the others wait, then they read it.
  if jax.process_index() == 0:
    path = make()
  checkpointing.sync_processes(f"demo LLM {next(_DEMO_LLM_BARRIERS)}", timeout_s=DEMO_LLM_TIMEOUT_S)
  if jax.process_index() != 0:
    path = make()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init.llm_weights = str(path)
  return config


def model_config(config, tokenizer) -> ml_collections.ConfigDict:
  """config.model with the tokenizer-dependent fields filled in (vocab size, [DEC] id; stage 2: the LLM)."""
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  cfg.vit.trainable = vit_trainable(config)
  if cfg.vit.image_size != config.data.image_size:
    raise ValueError(
      f"config.data.image_size={config.data.image_size} differs from config.model.vit.image_size={cfg.vit.image_size}."
    )
  if kind(config) != llms.RETRIEVAL:
    cfg.llm = llm_config(config)
    cfg.llm.lora = ml_collections.ConfigDict(config.model.llm.get("lora", {}))  # LoRA adapters (models/lora.py)
    # Stage 2 drops the Q-Former's text side (LAVIS) unless it reads the question (model.qformer_text_input, VQA
    # fine-tuning as InstructBLIP; Blip2LLM keeps the text side then, without the LM head).
    cfg.qformer.text_input = qformer_text_input(cfg)
    cfg.qformer.lm_head = False
    if cfg.qformer.text_input and (cfg.qformer.vocab_size <= 0 or config.get("qformer_tokenizer")):
      # As stage 1 with its tokenizer: vocab_size 0 is the Q-Former tokenizer's size (30,523 for
      # bert-base-uncased + [DEC]); a given size must hold every token.
      _fit_vocab(
        cfg.qformer, len(load_qformer_tokenizer(config)), "the Q-Former tokenizer's (config.qformer_tokenizer)"
      )
    question = config.data.get("max_question_len") or config.data.max_text_len
    if cfg.qformer.text_input and question > cfg.qformer.max_position_embeddings:
      raise ValueError(
        f"Questions of config.data.max_question_len={question} tokens (default: max_text_len) exceed the Q-Former's "
        f"max_position_embeddings={cfg.qformer.max_position_embeddings}."
      )
    return cfg
  _fit_vocab(cfg.qformer, len(tokenizer), "the tokenizer's")
  cfg.bos_token_id = tokenizer.bos_token_id
  return cfg


def _check_attention(cfg, platform: str) -> None:
  """Each model.<part>.attention can run on the mesh's devices (layers.check_attention)."""
  for part in ("vit", "qformer", "llm"):
    if part in cfg:
      layers.check_attention(cfg[part].get("attention", "xla"), cfg[part].dtype, f"model.{part}.attention", platform)


def _fit_vocab(qformer_cfg, vocab: int, whose: str):
  """qformer_cfg.vocab_size: 0 = the tokenizer's size; a smaller given size than the tokenizer's is an error."""
  if qformer_cfg.vocab_size <= 0:
    qformer_cfg.vocab_size = vocab
  elif qformer_cfg.vocab_size < vocab:
    raise ValueError(
      f"config.model.qformer.vocab_size={qformer_cfg.vocab_size} is smaller than {whose} {vocab} tokens (incl. [DEC])."
    )


VIT_PROBE = "visual_encoder/patch_embed/kernel"  # a parameter path of the ViT, for reading config.frozen_params


def vit_trainable(config) -> bool:
  """Whether the image encoder trains (fine-tuning): no config.frozen_params pattern matches its parameters."""
  return not any(re.fullmatch(p, VIT_PROBE) for p in config.frozen_params)


def _check_vit_all_or_nothing(config, boxed_trainable, boxed_frozen):
  if "visual_encoder" in boxed_trainable and "visual_encoder" in boxed_frozen:
    raise ValueError(
      f"config.frozen_params={tuple(config.frozen_params)} freezes part of visual_encoder: freeze all of it "
      "('visual_encoder/.*', pre-training) or none of it (fine-tuning)."
    )


def build_module(cfg, model_kind: str) -> nn.Module:
  return Blip2Qformer(cfg) if model_kind == llms.RETRIEVAL else Blip2LLM(cfg)


def dummy_batch(config, batch_size: int = 1) -> dict:
  """A training batch of the right structure, shapes and dtypes (zeros), for init and abstract evaluation; images
  are uint8 pixels, as the input pipeline sends them (the ViT normalises them on the accelerator)."""
  s, length = config.data.image_size, config.data.max_text_len
  batch = {"image": jnp.zeros((batch_size, s, s, 3), jnp.uint8)}
  model_kind = kind(config)
  keys = ("text_ids", "text_mask") if model_kind == llms.RETRIEVAL else llms.family(model_kind).text_keys()
  batch.update({k: jnp.ones((batch_size, length), jnp.int32) for k in keys})
  if model_kind != llms.RETRIEVAL and qformer_text_input(config.model):  # the question, for the Q-Former
    question = config.data.get("max_question_len") or length
    batch.update({k: jnp.ones((batch_size, question), jnp.int32) for k in ("qformer_ids", "qformer_mask")})
  if config.data.get("image_ids", False):
    if model_kind != llms.RETRIEVAL:
      raise ValueError("config.data.image_ids is for retrieval fine-tuning (stage-1 losses); set it False here.")
    batch["image_id"] = jnp.arange(batch_size, dtype=jnp.int32)
  return batch


# --------------------------------------------------------------------------------------------------------------
# Model, mesh, shardings, born-sharded init
# --------------------------------------------------------------------------------------------------------------


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

  def kernel_mesh(self):
    """Around the tracing of a program over this mesh: the Pallas attention kernel runs per shard of the batch and
    heads as the rules split them (layers.kernel_mesh)."""
    rules = dict(self.rules)
    return layers.kernel_mesh(self.mesh, rules.get("batch"), rules.get("heads"))


def build(config, tokenizer, devices=None) -> Setup:
  mesh = partitioning.make_mesh(dict(config.sharding.mesh), devices)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  cfg = model_config(config, tokenizer)
  _check_attention(cfg, mesh.devices.flat[0].platform)
  model = build_module(cfg, kind(config))
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  dummy = dummy_batch(config)
  frozen_dtype = jnp.dtype(config.frozen_dtype)

  def init_params(rng):
    boxed = model.init({"params": rng, "itm": rng}, dummy, train=False, method="losses")["params"]
    return partitioning.split_frozen(boxed, config.frozen_params)

  boxed_trainable, boxed_frozen = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  _check_vit_all_or_nothing(config, boxed_trainable, boxed_frozen)
  param_sh = partitioning.logical_to_shardings(boxed_trainable, mesh, rules)
  frozen_sh = partitioning.logical_to_shardings(boxed_frozen, mesh, rules)
  repl = partitioning.replicated(mesh)

  def init(rng):
    trainable, frozen = (nn.unbox(t) for t in init_params(rng))
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
    state = {
      "step": jnp.zeros((), jnp.int32),
      "params": trainable,
      "opt_state": tx.init(trainable),
      "rng": jax.random.fold_in(rng, 1),
    }
    return state, frozen

  abstract_state, _ = jax.eval_shape(init, jax.random.PRNGKey(0))
  opt_sh = optax.tree_map_params(
    tx, lambda _, sh: sh, abstract_state["opt_state"], param_sh, transform_non_params=lambda _: repl
  )
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
  init_jit = jax.jit(init, out_shardings=(state_sh, frozen_sh))
  return Setup(
    model,
    mesh,
    rules,
    tx,
    schedule,
    state_sh,
    frozen_sh,
    partitioning.batch_sharding(mesh, rules),
    abstract_state,
    init_jit,
  )


def global_batch(local_batch: dict, sharding) -> dict:
  """Each process holds its own rows; together they form the global batch, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# --------------------------------------------------------------------------------------------------------------
# Pretrained weights in: one tensor at a time, straight onto its sharding
# --------------------------------------------------------------------------------------------------------------


def _placer(flat_shardings: dict):
  """place(path, numpy array) -> the array on its sharding (each device reads only its slice)."""

  def place(path, x):
    return jax.make_array_from_callback(x.shape, flat_shardings[path], lambda idx: x[idx])

  return place


def load_pretrained(config, setup: Setup, state, frozen, *, frozen_only: bool = False):
  """Replaces random init with the weights config.init names ('' keeps the random init):
  - vision_weights: a HF BLIP-2 directory -> the frozen ViT (and ln_vision);
  - stage 1: bert_weights (the Q-Former from BERT, as LAVIS starts stage 1) or lavis_weights (a LAVIS stage-1
    .pth: the whole model, to continue stage 1);
  - stage 2: llm_weights (the frozen LLM: a HF LLM directory, or a BLIP-2 one) and qformer_weights (a stage-1
    workdir or a HF BLIP-2 directory: query_tokens, ln_vision and the Q-Former's query side).
  Frozen weights are read one parameter at a time straight onto their shardings. With frozen_only (resuming)
  only the frozen towers are read; the rest comes from the checkpoint."""
  init = config.init
  stage2 = kind(config) != llms.RETRIEVAL
  frozen_flat = traverse_util.flatten_dict(frozen, sep="/")
  place_frozen = _placer(traverse_util.flatten_dict(setup.frozen_shardings, sep="/"))
  updates = {}  # trainable path -> numpy (the small, trainable side)

  def read_frozen(ckpt, entries, top, prefix=""):
    entries = [e for e in entries if e[0].split("/")[0] == top]
    tree = weights.tree_from_hf(
      ckpt, entries, {top: frozen[top]}, prefix=prefix, place=place_frozen, dtype=lambda path: frozen_flat[path].dtype
    )
    frozen_flat.update(traverse_util.flatten_dict(tree, sep="/"))

  def read_trainable(ckpt, entries):
    template = traverse_util.unflatten_dict(
      {p: v for p, v in traverse_util.flatten_dict(state["params"], sep="/").items() if p in {e[0] for e in entries}},
      sep="/",
    )
    updates.update(traverse_util.flatten_dict(weights.tree_from_hf(ckpt, entries, template), sep="/"))

  cfg = setup.model.cfg
  source = checkpoint_params(init.checkpoint) if init.get("checkpoint") else {}
  trainable_shapes = {p: v.shape for p, v in traverse_util.flatten_dict(state["params"], sep="/").items()}
  # Frozen towers the checkpoint holds are not read again from vision_weights / llm_weights.
  from_checkpoint = {p.split("/")[0] for p in source if p in frozen_flat}
  if init.vision_weights and "visual_encoder" not in from_checkpoint:
    ckpt = weights.read_safetensors_dir(init.vision_weights)
    vision = weights.vision_weight_map()
    read_frozen(ckpt, vision, "visual_encoder")
    if not frozen_only:
      read_trainable(ckpt, [e for e in vision if e[0].startswith("ln_vision/")])
  if stage2 and init.llm_weights and "language_model" not in from_checkpoint:
    _, prefix = _read_hf_config(init.llm_weights)
    read_frozen(
      weights.read_safetensors_dir(init.llm_weights), hf.llm_weight_map(cfg.llm, prefix=""), "language_model", prefix
    )
  if not frozen_only:
    if stage2 and init.qformer_weights:
      updates.update(_stage2_qformer(init.qformer_weights, cfg, read_trainable))
    elif not stage2 and (init.bert_weights or init.lavis_weights):
      host = partitioning.host_copy(state["params"])
      if init.lavis_weights:
        loaded, _ = lavis.load_lavis_checkpoint(
          init.lavis_weights, partitioning.merge(host, partitioning.host_copy(frozen))
        )
      else:
        loaded = weights.load_qformer_from_bert(init.bert_weights, host)
      for path, value in traverse_util.flatten_dict(loaded, sep="/").items():
        if path in frozen_flat:
          frozen_flat[path] = place_frozen(path, np.asarray(value, frozen_flat[path].dtype))
        else:
          updates[path] = value

  if source:  # the checkpoint wins where another source has the same parameter
    for path, target in frozen_flat.items():
      if path in source:
        frozen_flat[path] = place_frozen(path, _fit(path, source[path], target.shape, init.checkpoint, target.dtype))
    if not frozen_only:
      updates.update(
        {
          p: _fit(p, source[p], shape, init.checkpoint, np.float32)
          for p, shape in trainable_shapes.items()
          if p in source
        }
      )
    new = sorted((set(frozen_flat) | set(trainable_shapes)) - set(source))
    if new:
      log.info(
        "%d parameter(s) not in %s keep their initialisation or other source: %s",
        len(new),
        init.checkpoint,
        ", ".join(new[:8]) + (" ..." if len(new) > 8 else ""),
      )
    log.info("Weights from %s (config.init.checkpoint).", init.checkpoint)
  frozen = traverse_util.unflatten_dict(frozen_flat, sep="/")
  if updates:
    # Adam's moments start at zero whatever the weights, so only the params change.
    flat = traverse_util.flatten_dict(state["params"], sep="/")
    place = _placer(traverse_util.flatten_dict(setup.state_shardings["params"], sep="/"))
    for path, value in updates.items():
      x = np.asarray(value, flat[path].dtype)
      if x.shape != flat[path].shape:
        raise ValueError(f"Pretrained `{path}` has shape {x.shape}, the model {flat[path].shape}.")
      flat[path] = place(path, x)
    state = dict(state, params=traverse_util.unflatten_dict(flat, sep="/"))
  return state, frozen


def checkpoint_params(path: str) -> dict:
  """Every parameter of a model to fine-tune from (config.init.checkpoint), flat 'a/b' path -> host array: the latest
  checkpoint of a training workdir with its frozen weights (e.g. the stage-2 or stage-1 model a fine-tune starts
  from), or a Hugging Face BLIP-2 directory."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    source_config, tokenizer, _, source_state, source_frozen = restore_workdir(path)
    params = partitioning.merge(source_state["params"], source_frozen)
    # LoRA adapters of the source are folded into its LLM weights: the same function, whatever this model's rank
    # (its own adapters, if any, start at B = 0).
    params = lora.merged_blip2(params, model_config(source_config, tokenizer))
  elif os.path.isfile(os.path.join(path, "config.json")):
    _, _, _, params, _ = load_hf_blip2(path)
  else:
    raise FileNotFoundError(
      f"config.init.checkpoint={path!r} is neither a training workdir (with checkpoints/) nor a Hugging Face BLIP-2 "
      "directory (with config.json)."
    )
  return traverse_util.flatten_dict(partitioning.host_copy(params), sep="/")


def _fit(path: str, value, shape, source: str, dtype):
  """A source parameter for a model parameter of `shape`: the ViT's position embeddings are resized bicubically to
  a new image size (fine-tuning at 364 px from 224 px, as LAVIS does when loading); any other difference in shape
  is an error naming the parameter."""
  value = np.asarray(value, np.float32)
  if value.shape != tuple(shape) and path == "visual_encoder/pos_embed" and value.shape[2:] == tuple(shape[2:]):
    grid = int(round((shape[1] - 1) ** 0.5))
    log.info("visual_encoder/pos_embed resized from %s to %s (image size changed).", value.shape, tuple(shape))
    value = np.asarray(vit_lib.interpolate_pos_embed(jnp.asarray(value), grid))
  if value.shape != tuple(shape):
    raise ValueError(
      f"`{path}` has shape {value.shape} in {source} (config.init.checkpoint) but {tuple(shape)} in the model: "
      "the fine-tuning config's model sizes differ from the checkpoint's."
    )
  return value.astype(dtype)


def _stage2_qformer(path, cfg, read_trainable) -> dict:
  """Stage 2's starting Q-Former: the query side of a stage-1 workdir's latest checkpoint, or of a HF BLIP-2
  directory (query_tokens, ln_vision, Q-Former layers without the text FFN). A question-conditioned model
  (qformer_text_input) also reads the text side (word and position embeddings, the text FFN) where the source has
  it: a stage-1 workdir, a HF BLIP-2 retrieval directory or a HF InstructBLIP one."""
  text_input = bool(cfg.qformer.get("text_input", False))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    _, _, stage1_setup, stage1_state, stage1_frozen = restore_workdir(path)
    del stage1_setup
    stage1 = traverse_util.flatten_dict(partitioning.merge(stage1_state["params"], stage1_frozen), sep="/")
    wanted = {e[0] for e in weights.qformer_weight_map(cfg, text=False, instructblip=text_input)}
    wanted |= {"ln_vision/scale", "ln_vision/bias"}
    missing = sorted(wanted - set(stage1))
    if missing:
      raise ValueError(f"Stage-1 workdir {path} has no `{missing[0]}`: its Q-Former differs from the config.")
    log.info("Stage-2 Q-Former from the stage-1 workdir %s%s.", path, " (with its text side)" if text_input else "")
    return {p: np.asarray(partitioning.host_copy(stage1[p]), np.float32) for p in wanted}
  ckpt = weights.read_safetensors_dir(path)
  entries = weights.qformer_weight_map(cfg, text=False)
  if text_input and "embeddings.word_embeddings.weight" in ckpt:  # a retrieval checkpoint (blip2-itm-vit-g)
    heads = ("vision_proj/", "text_proj/", "itm_head/")
    entries = [e for e in weights.qformer_weight_map(cfg, text=True) if not e[0].startswith(heads)]
  elif text_input and "qformer.embeddings.word_embeddings.weight" in ckpt:  # InstructBLIP
    entries = weights.qformer_weight_map(cfg, text=False, instructblip=True)
  elif text_input:
    log.info("%s has no Q-Former text side: it keeps its initialisation (or comes from init.checkpoint).", path)
  entries = entries + [e for e in weights.vision_weight_map() if e[0].startswith("ln_vision/")]
  read_trainable(ckpt, entries)
  log.info("Stage-2 Q-Former from the BLIP-2 checkpoint %s.", path)
  return {}


class _Recorder:
  """Checkpoint lookups that remember which names were read (to find tensors nothing maps)."""

  def __init__(self, ckpt):
    self.ckpt, self.used = ckpt, set()
    self.file_of = ckpt.file_of

  def __call__(self, name):
    self.used.add(name)
    return self.ckpt[name]


def abstract_params(module, cfg, model_kind: str):
  """Boxed abstract parameters of an inference model (shapes and logical axes; nothing allocated)."""
  s = cfg.vit.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  ids, mask = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "itm": jax.random.PRNGKey(0)}
  question = dict(qformer_ids=ids, qformer_mask=mask) if qformer_text_input(cfg) else {}
  if model_kind == llms.RETRIEVAL:
    init = lambda: module.init(rngs, images, ids, mask, method=Blip2Qformer.retrieval_outputs)
  elif llms.family(model_kind).encoder_decoder:
    init = lambda: module.init(rngs, images, ids, mask, ids, mask, **question)
  else:
    init = lambda: module.init(rngs, images, ids, mask, **question)
  return jax.eval_shape(init)["params"]


def load_hf_blip2(path, *, dtype: str = "float32", mesh=None, rules=DEFAULT_RULES, remat_policy: str = "none"):
  """A local HF BLIP-2 directory -> (its config.json dict, our model config, kind, params on `mesh`). An HF
  InstructBLIP directory (InstructBlipForConditionalGeneration) gives a question-conditioned model
  (`qformer_text_input`: the Q-Former reads the question; models/blip2.py Blip2LLM).

  `dtype` applies to the frozen ViT and LLM; the Q-Former, query tokens and projections stay float32 (HF keeps
  `query_tokens` and `qformer` in float32 too). `mesh` defaults to all devices on one 'fsdp' axis. A tensor the
  model has no place for, a missing tensor or a shape that differs is an error naming it."""
  root = Path(path)
  if not (root / "config.json").is_file():
    raise FileNotFoundError(
      f"No config.json in {root}: give a local Hugging Face BLIP-2 directory (config.json "
      "and model.safetensors or its shards)."
    )
  hf_config = json.loads((root / "config.json").read_text())
  ckpt = weights.read_safetensors_dir(root)
  cfg, model_kind = hf.config_from_hf(hf_config, dtype=dtype, remat_policy=remat_policy, tensor_names=ckpt)
  mesh = mesh if mesh is not None else partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  boxed = abstract_params(build_module(cfg, model_kind), cfg, model_kind)
  place = _placer(
    traverse_util.flatten_dict(
      partitioning.logical_to_shardings(boxed, mesh, rules),
      sep="/",
      is_leaf=lambda _, x: isinstance(x, jax.sharding.Sharding),
    )
  )
  frozen_dtype = jnp.dtype(dtype)

  def param_dtype(p):
    return frozen_dtype if p.split("/")[0] in _FROZEN_TOPS else np.float32

  weight_map = hf.blip2_weight_map(cfg, model_kind)
  reader = _Recorder(ckpt)
  get = reader
  if model_kind == llms.RETRIEVAL:  # HF keeps no temperature; ours keeps its 0.07 init
    weight_map = weight_map + [("temp", "temp", "copy")]
    get = lambda n: np.float32(0.07) if n == "temp" else reader(n)
  params = weights.tree_from_hf(get, weight_map, boxed, dtype=param_dtype, place=place)
  unused = sorted(set(ckpt) - reader.used)
  if unused:
    raise ValueError(
      f"Checkpoint {root} has {len(unused)} tensor(s) the {hf_config['architectures'][0]} model "
      f"built from its config.json has no place for, first `{unused[0]}` in "
      f"{ckpt.file_of(unused[0])}."
    )
  log.info("Loaded %s (%s) from %s.", hf_config["architectures"][0], model_kind, root)
  return hf_config, cfg, model_kind, params, mesh


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: this run's latest, or a workdir's
# --------------------------------------------------------------------------------------------------------------


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


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (train.py writes it as WORKDIR/config.json)."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"No config.json in {workdir}: is it a blip2_jax training workdir?")

  def tuples(x):  # JSON turned the config's tuples (sharding rules, frozen_params) into lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))


def restore_workdir(workdir, config=None, *, devices=None):
  """The latest checkpoint of a training workdir with its frozen weights (from config.init, as when resuming).
  config: how it was trained (default: the workdir's config.json). -> (config, tokenizer, setup, state, frozen)."""
  config = load_workdir_config(workdir) if config is None else resolve_demo_llm(config, workdir)
  tokenizer = load_tokenizer(config)
  setup = build(config, tokenizer, devices)
  mngr = checkpointing.manager(workdir, config.keep_checkpoints)
  try:
    if mngr.latest_step() is None:
      raise FileNotFoundError(
        f"No checkpoint under {Path(workdir) / 'checkpoints'}: train first with "
        f"python -m blip2_jax.train --config=... --workdir={workdir}."
      )
    state, frozen, _ = restore_or_init(config, setup, mngr)
  finally:
    mngr.close()
  log.info("Workdir %s at step %d.", workdir, int(jax.device_get(state["step"])))
  return config, tokenizer, setup, state, frozen
