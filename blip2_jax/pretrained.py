"""Official BLIP-2 checkpoints in and out: `Blip2.from_pretrained(dir)` and `Blip2.save_pretrained(dir)`.

Reads the Hugging Face layout the released models ship in (Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl,
blip2-itm-vit-g, ...): `config.json` plus `model.safetensors` or sharded safetensors with an index. Two
architectures:
- `Blip2ForConditionalGeneration` (OPT or T5): ViT, the query side of the Q-Former, `language_projection` and the
  frozen LLM -> our `Blip2LLM`;
- `Blip2ForImageTextRetrieval`: ViT and the whole Q-Former with ITC/ITM heads -> our `Blip2Qformer` (without the
  Q-Former LM head and `temp`, which HF does not keep; `temp` stays at its 0.07 init).

Loading reads one tensor at a time through a name table (`weights.tree_from_hf`) and places each parameter on its
sharding as soon as it is complete, so the host holds one parameter at a time besides what is already placed.
Pickles are never read. A tensor the model has no place for, a missing tensor or a shape that differs is an
error naming it. The frozen towers (ViT and LLM) take the requested dtype; the Q-Former, query tokens and
projections stay float32 (HF keeps `query_tokens` and `qformer` in float32 too).

Images are [B, H, W, 3] (channels last), normalised as the BLIP-2 processors do (CLIP mean/std); HF's
pixel_values are the same numbers as [B, 3, H, W].
"""
import functools
import json
import logging
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip2_jax import partitioning
from blip2_jax import weights
from blip2_jax.models.blip2 import Blip2LLM, Blip2Qformer

log = logging.getLogger(__name__)

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")
LLM_KINDS = ("opt", "t5")
# Serving default: weights split over every device along their "embed" axis (FSDP-style), batch over all of them.
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vit_embed", "fsdp"), ("mlp", "tensor"),
                 ("heads", "tensor"), ("vocab", "tensor"), ("layers", None), ("norm", None))
_FROZEN_TOPS = ("visual_encoder", "ln_vision", "language_model")  # what `dtype` applies to


# --- configs -------------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, *, dtype: str = "float32", remat_policy: str = "none", tensor_names=()):
  """HF BLIP-2 config.json (as a dict) -> (our model config, kind: 'retrieval' | 'opt' | 't5').

  tensor_names: the checkpoint's tensor names (whether a T5 stores its own lm_head is not in the config)."""
  arch = (hf.get("architectures") or [None])[0]
  if hf.get("model_type") != "blip-2" or arch not in ARCHITECTURES:
    raise ValueError(f"Not a supported BLIP-2 checkpoint: model_type={hf.get('model_type')!r}, "
                     f"architectures={hf.get('architectures')}; expected model_type 'blip-2' and one of "
                     f"{', '.join(ARCHITECTURES)}.")
  vc, qc = hf["vision_config"], hf["qformer_config"]
  act = vc.get("hidden_act", "gelu")
  if act not in ("gelu", "quick_gelu"):
    raise ValueError(f"vision_config.hidden_act={act!r} is not supported (gelu or quick_gelu).")
  retrieval = arch == "Blip2ForImageTextRetrieval"
  cfg = ml_collections.ConfigDict(dict(
      vit=dict(image_size=vc["image_size"], patch_size=vc["patch_size"], width=vc["hidden_size"],
               depth=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"], mlp_dim=vc["intermediate_size"],
               layer_norm_eps=vc["layer_norm_eps"], act=act, dtype=dtype),
      qformer=dict(vocab_size=qc["vocab_size"], hidden_size=qc["hidden_size"], num_layers=qc["num_hidden_layers"],
                   num_heads=qc["num_attention_heads"], intermediate_size=qc["intermediate_size"],
                   cross_attention_freq=qc.get("cross_attention_frequency", 2),
                   max_position_embeddings=qc["max_position_embeddings"], layer_norm_eps=qc["layer_norm_eps"],
                   dropout_rate=0.0, dtype="float32", text_input=retrieval, lm_head=False),
      num_query_tokens=hf["num_query_tokens"], embed_dim=hf.get("image_text_hidden_size", 256),
      # HF's post_layernorm (our ln_vision) takes the vision config's eps.
      ln_vision_eps=vc["layer_norm_eps"], itc_label_smoothing=0.1, itg_label_smoothing=0.1, bos_token_id=-1))
  if retrieval:
    return cfg, "retrieval"
  text = hf["text_config"]
  kind = text.get("model_type")
  if kind not in LLM_KINDS:
    raise ValueError(f"text_config.model_type={kind!r} is not supported: blip2_jax has OPT and T5 (Flan-T5) "
                     "language models.")
  extra = {"has_lm_head": "language_model.lm_head.weight" in tensor_names} if kind == "t5" else {}
  llm = _llm_module(kind).config_from_hf(text, dtype=dtype, remat_policy=remat_policy, **extra)
  llm.kind = kind
  cfg.llm = llm
  return cfg, kind


def hf_config_from_ours(cfg, kind: str, llm_hf_config: dict | None = None, image_token_index=None) -> dict:
  """Our model config -> a BLIP-2 config.json dict that transformers reads (the inverse of config_from_hf)."""
  import transformers  # pylint: disable=g-import-not-at-top
  vit, qf = cfg.vit, cfg.qformer
  vision = dict(hidden_size=vit.width, intermediate_size=vit.mlp_dim, num_hidden_layers=vit.depth,
                num_attention_heads=vit.num_heads, image_size=vit.image_size, patch_size=vit.patch_size,
                hidden_act=vit.act, layer_norm_eps=vit.layer_norm_eps, qkv_bias=True)
  qformer = dict(vocab_size=qf.vocab_size, hidden_size=qf.hidden_size, num_hidden_layers=qf.num_layers,
                 num_attention_heads=qf.num_heads, intermediate_size=qf.intermediate_size, hidden_act="gelu",
                 max_position_embeddings=qf.max_position_embeddings, layer_norm_eps=qf.layer_norm_eps,
                 cross_attention_frequency=qf.cross_attention_freq, encoder_hidden_size=vit.width,
                 use_qformer_text_input=kind == "retrieval")
  config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=llm_hf_config,
                                    num_query_tokens=cfg.num_query_tokens,
                                    image_text_hidden_size=cfg.get("embed_dim", 256),
                                    image_token_index=image_token_index)
  out = config.to_dict()
  out["architectures"] = ["Blip2ForImageTextRetrieval" if kind == "retrieval" else "Blip2ForConditionalGeneration"]
  return out


# --- name tables ---------------------------------------------------------------------------------------------

def blip2_weight_map(cfg, kind: str) -> list:
  """Every parameter of a from_pretrained model (except `temp` of retrieval models) in HF BLIP-2 naming."""
  out = weights.vision_weight_map(cfg.vit.depth) + weights.qformer_weight_map(cfg, text=kind == "retrieval")
  if kind != "retrieval":
    out += weights.dense_entries("language_projection", "language_projection")
    out += [(f"language_model/{p}", f"language_model.{n}", k)
            for p, n, k in _llm_module(kind).weight_map(cfg.llm)]
  return out


def _llm_module(kind: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"blip2_jax.models.{kind}")


# --- the model -----------------------------------------------------------------------------------------------

def build_module(cfg, kind: str) -> nn.Module:
  return Blip2Qformer(cfg) if kind == "retrieval" else Blip2LLM(cfg)


def abstract_params(module, cfg, kind: str):
  """Boxed abstract parameters (shapes and logical axes; nothing allocated)."""
  s = cfg.vit.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  ids, mask = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "itm": jax.random.PRNGKey(0)}
  if kind == "retrieval":
    init = lambda: module.init(rngs, images, ids, mask, method=Blip2Qformer.retrieval_outputs)
  elif kind == "t5":
    init = lambda: module.init(rngs, images, ids, mask, ids, mask)
  else:
    init = lambda: module.init(rngs, images, ids, mask)
  return jax.eval_shape(init)["params"]


class _Recorder:
  """Checkpoint lookups that remember which names were read (to find tensors nothing maps)."""

  def __init__(self, ckpt):
    self.ckpt, self.used = ckpt, set()
    self.file_of = ckpt.file_of

  def __call__(self, name):
    self.used.add(name)
    return self.ckpt[name]


class Blip2:
  """A BLIP-2 model with its parameters (sharded over `mesh`) and, when the directory has one, its tokenizer.

  `kind` is 'retrieval' (image-text matching and contrastive scores, feature extraction) or the LLM kind,
  'opt' / 't5' (LLM logits and generation)."""

  def __init__(self, cfg, kind: str, params: dict, mesh, tokenizer=None, llm_hf_config=None,
               image_token_index=None):
    self.cfg, self.kind, self.params, self.mesh, self.tokenizer = cfg, kind, params, mesh, tokenizer
    self.llm_hf_config, self.image_token_index = llm_hf_config, image_token_index
    self.module = build_module(cfg, kind)

  # --- loading -------------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path, *, dtype: str = "float32", mesh=None, rules=DEFAULT_RULES,
                      remat_policy: str = "none") -> "Blip2":
    """Loads a local HF BLIP-2 directory. `dtype` applies to the frozen ViT and LLM ("bfloat16" halves their
    memory); `mesh` defaults to all devices on one 'fsdp' axis."""
    root = Path(path)
    if not (root / "config.json").is_file():
      raise FileNotFoundError(f"No config.json in {root}: give a local Hugging Face BLIP-2 directory (config.json "
                              "and model.safetensors or its shards).")
    hf = json.loads((root / "config.json").read_text())
    ckpt = weights.read_safetensors_dir(root)
    cfg, kind = config_from_hf(hf, dtype=dtype, remat_policy=remat_policy, tensor_names=ckpt)
    mesh = mesh if mesh is not None else partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    module = build_module(cfg, kind)
    boxed = abstract_params(module, cfg, kind)
    flat_shardings = _flatten(partitioning.logical_to_shardings(boxed, mesh, rules))
    frozen_dtype = jnp.dtype(dtype)

    def param_dtype(p):
      return frozen_dtype if p.split("/")[0] in _FROZEN_TOPS else np.float32

    def place(p, x):
      return jax.make_array_from_callback(x.shape, flat_shardings[p], lambda idx: x[idx])

    weight_map = blip2_weight_map(cfg, kind)
    if kind == "retrieval":  # HF keeps no temperature; ours keeps its 0.07 init
      weight_map = weight_map + [("temp", "temp", "copy")]
    reader = _Recorder(ckpt)
    get = (lambda n: np.float32(0.07) if n == "temp" else reader(n)) if kind == "retrieval" else reader
    params = weights.tree_from_hf(get, weight_map, boxed, dtype=param_dtype, place=place)
    unused = sorted(set(ckpt) - reader.used)
    if unused:
      raise ValueError(f"Checkpoint {root} has {len(unused)} tensor(s) the {hf['architectures'][0]} model built "
                       f"from its config.json has no place for, first `{unused[0]}` in "
                       f"{ckpt.file_of(unused[0])}.")
    log.info("Loaded %s (%s) from %s.", hf["architectures"][0], kind, root)
    return cls(cfg, kind, params, mesh, _load_tokenizer(root),
               llm_hf_config=hf.get("text_config") if kind != "retrieval" else None,
               image_token_index=hf.get("image_token_index"))

  @classmethod
  def from_workdir(cls, workdir, *, devices=None) -> "Blip2":
    """The latest checkpoint of a training workdir (its config.json says how it was trained) with its frozen
    weights: a retrieval model (stage 1) or an OPT / T5 one (stage 2). The frozen towers come back from
    config.init, as when resuming."""
    from blip2_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
    config = load_workdir_config(workdir)
    tokenizer = train.load_tokenizer(config)
    setup = train.build(config, tokenizer, devices)
    mngr = checkpointing.manager(workdir, config.keep_checkpoints)
    try:
      if mngr.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint under {Path(workdir) / 'checkpoints'}: train first with "
                                f"python -m blip2_jax.train --config=... --workdir={workdir}.")
      state, frozen, _ = train.restore_or_init(config, setup, mngr)
    finally:
      mngr.close()
    cfg = train.model_config(config, tokenizer)
    log.info("Workdir %s at step %d.", workdir, int(jax.device_get(state["step"])))
    params = partitioning.merge(state["params"], frozen)
    if not train.is_stage2(config):
      return cls(cfg, "retrieval", params, setup.mesh, tokenizer)
    return cls(cfg, cfg.llm.kind, params, setup.mesh, tokenizer, llm_hf_config=_llm_hf_config(config))

  # --- forward API ---------------------------------------------------------------------------------------

  @functools.cached_property
  def _jitted(self):
    def apply(method, params, *args):
      return self.module.apply({"params": params}, *args, method=method)
    return jax.jit(apply, static_argnums=0)

  def _call(self, method, *args):
    return self._jitted(method, self.params, *(jnp.asarray(a) for a in args))

  def pixels(self, images):
    """The model's input, float [B, S, S, 3], from images as a user has them.

    `images`: one image or a list of them, each a PIL image, a file path, or an array [H, W, 3] (uint8 pixels, or
    float already preprocessed at S x S), of any sizes: each is converted to RGB, resized to S x S (bicubic) and
    CLIP-normalised, as BLIP-2's processors do. A float array [B, S, S, 3] is taken as already preprocessed.
    Every method that takes images accepts all of these."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from blip2_jax import generate  # pylint: disable=g-import-not-at-top
    from blip2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    size = self.cfg.vit.image_size
    if isinstance(images, (np.ndarray, jax.Array)) and images.ndim == 4:
      if jnp.issubdtype(images.dtype, jnp.floating):
        return images  # preprocessed already; a device array stays on its device
      images = list(images)  # a batch of pixel arrays
    if not isinstance(images, (list, tuple)):
      images = [images]
    if not images:
      raise ValueError("No images given.")
    out = []
    for i, image in enumerate(images):
      if isinstance(image, (str, os.PathLike)):
        out.append(generate.load_image(os.fspath(image), size))
      elif isinstance(image, Image.Image):
        out.append(pipeline.eval_preprocess(image.convert("RGB"), size))
      elif isinstance(image, (np.ndarray, jax.Array)) and image.ndim == 3 and image.shape[-1] == 3:
        image = np.asarray(image)
        if np.issubdtype(image.dtype, np.floating):
          if image.shape != (size, size, 3):
            raise ValueError(f"Image {i} is a float array of shape {image.shape}: float arrays must be "
                             f"preprocessed already, [{size}, {size}, 3]; give uint8 pixels to have it resized.")
          out.append(image.astype(np.float32))
        else:
          out.append(pipeline.eval_preprocess(Image.fromarray(image.astype(np.uint8)), size))
      else:
        shape = getattr(image, "shape", None)
        raise ValueError(f"Image {i} is a {type(image).__name__}{f' of shape {shape}' if shape else ''}: give a "
                         "PIL image, a file path or an [H, W, 3] array.")
    return np.stack(out)

  def vision_features(self, images):
    """[B, H, W, 3] -> the ViT's output after ln_vision [B, 1 + patches, width] (HF's vision last_hidden_state)."""
    return self._call(_vision_features, self.pixels(images))

  def query_output(self, images):
    """[B, H, W, 3] -> the Q-Former's query outputs [B, num_query_tokens, hidden] (HF's qformer last_hidden_state)."""
    return self._call(_query_output, self.pixels(images))

  def image_prompt(self, images):
    """Captioning/VQA models: the projected query outputs, the LLM's soft prompt [B, Q, LLM width]."""
    self._need("opt", "t5", what="image_prompt")
    return self._call(Blip2LLM.image_prompt, self.pixels(images))

  def lm_logits(self, images, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
    """LLM logits for (images, prompt ids), float32: OPT over the [queries; text] positions, T5 over the decoder
    positions. `input_ids` hold the text only (no `<image>` placeholders: the queries are prepended here)."""
    self._need("opt", "t5", what="lm_logits")
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    if self.kind == "opt":
      return self._call(Blip2LLM.__call__, self.pixels(images), input_ids, attention_mask)
    if decoder_input_ids is None:
      raise ValueError("A T5 BLIP-2 needs decoder_input_ids for lm_logits.")
    decoder_attention_mask = (np.ones_like(decoder_input_ids) if decoder_attention_mask is None
                              else decoder_attention_mask)
    return self._call(Blip2LLM.__call__, self.pixels(images), input_ids, attention_mask, decoder_input_ids,
                      decoder_attention_mask)

  def itm_logits(self, images, input_ids, attention_mask):
    """Retrieval models: image-text matching logits [B, 2] (index 1 = match) for the pairs (image i, text i)."""
    self._need("retrieval", what="itm_logits")
    return self._call(_itm_logits, self.pixels(images), input_ids, attention_mask)

  def itc_scores(self, images, input_ids, attention_mask):
    """Retrieval models: contrastive scores [B_img, B_txt], the cosine similarity maxed over queries (no
    temperature), as HF's `logits_per_image`."""
    self._need("retrieval", what="itc_scores")
    return self._call(_itc_scores, self.pixels(images), input_ids, attention_mask)

  def generate(self, images, prompts="", **settings) -> list[str]:
    """Captioning/VQA models: text for each image after its prompt (one string, or one per image); settings as
    `tasks.generate_text` (max_new_tokens, min_new_tokens, num_beams, length_penalty, repetition_penalty,
    do_sample, top_p, temperature, seed)."""
    self._need("opt", "t5", what="generate")
    from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
    return tasks.generate_text(self.module, self.params, self._tokenizer(), self.pixels(images), prompts,
                                **settings)

  def caption(self, images, **settings) -> list[str]:
    """Captions with the paper's settings (prompt "a photo of", beams 5, 8-30 new tokens) unless overridden."""
    self._need("opt", "t5", what="caption")
    from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
    return tasks.caption(self.module, self.params, self._tokenizer(), self.pixels(images), **settings)

  def answer(self, images, questions, **settings) -> list[str]:
    """Zero-shot VQA with the paper's prompt and settings (beams 5, at most 10 new tokens, length penalty -1)."""
    self._need("opt", "t5", what="answer")
    from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
    return tasks.answer(self.module, self.params, self._tokenizer(), self.pixels(images), questions,
                        **settings)

  def _tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("This model has no tokenizer (its directory had no tokenizer files): add the LLM's "
                       "tokenizer files to the directory.")
    return self.tokenizer

  @classmethod
  def load(cls, path, **kwargs) -> "Blip2":
    """A HF BLIP-2 directory (from_pretrained) or a blip2_jax training workdir (from_workdir)."""
    root = Path(path)
    if (root / "checkpoints").is_dir():
      return cls.from_workdir(root)
    return cls.from_pretrained(root, **kwargs)

  def _need(self, *kinds, what):
    if self.kind not in kinds:
      raise ValueError(f"{what} needs a {' or '.join(kinds)} model; this one is a {self.kind} model.")

  # --- export --------------------------------------------------------------------------------------------

  def save_pretrained(self, path, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Writes config.json, model.safetensors (sharded with an index past max_shard_bytes) and the tokenizer,
    in the layout transformers' Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval load. `dtype`
    (default: each parameter's own) casts every tensor. `temp` and the Q-Former LM head are dropped: HF has
    no place for them."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if self.cfg.ln_vision_eps != self.cfg.vit.layer_norm_eps:
      log.warning("HF's BLIP-2 config has one LayerNorm eps for the ViT and ln_vision (post_layernorm); this "
                  "model uses %g and %g: the export writes %g for both.", self.cfg.vit.layer_norm_eps,
                  self.cfg.ln_vision_eps, self.cfg.vit.layer_norm_eps)
    dropped = [p for p in ("temp", "qformer/lm_bias") if p in _flatten_params(self.params)]
    if dropped:
      log.info("Not exported (HF's BLIP-2 has no place for them): temp and the Q-Former LM head.")
    host = jax.tree.map(_host_array, self.params)
    tensors = weights.hf_tensors(host, blip2_weight_map(self.cfg, self.kind))
    llm_hf_config, image_token = self.llm_hf_config, self.image_token_index
    if self.kind != "retrieval" and image_token is None:
      # transformers (>= 4.47) finds where the queries go by `image_token_index` placeholders in input_ids, so
      # the exported LLM gets one more token, <image>, whose embedding row is never read (HF's own conversion
      # does the same). Its output logit is h . 0 = 0 (OPT, tied) / 0 (T5's lm_head row): compare the first
      # vocab_size logits.
      image_token = llm_hf_config["vocab_size"]
      llm_hf_config = dict(llm_hf_config, vocab_size=image_token + 1)
      tensors = _with_image_token_row(tensors)
    hf = hf_config_from_ours(self.cfg, self.kind, llm_hf_config, image_token)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    if dtype is not None:
      tensors = ((n, t.astype(jnp.dtype(dtype))) for n, t in tensors)
    write_safetensors(out, tensors, max_shard_bytes)
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(str(out))
    log.info("Wrote %s (%s) to %s.", hf["architectures"][0], self.kind, out)


def _llm_hf_config(config) -> dict:
  """The frozen LLM's HF config dict of a stage-2 training config (for export)."""
  path = config.init.llm_weights
  if path:
    hf = json.loads((Path(path) / "config.json").read_text())
    return hf["text_config"] if hf.get("model_type") == "blip-2" else hf
  hf = {k: v for k, v in config.model.llm.to_dict().items() if k not in ("kind", "dtype", "remat_policy")}
  return dict(hf, model_type=config.model.llm.kind)


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


def _vision_features(module, images):
  return module.encode_image(images)


def _query_output(module, images):
  return module.query_features(module.encode_image(images))[0]


def _itm_logits(module, images, input_ids, attention_mask):
  return module.itm_logits(module.encode_image(images), input_ids, attention_mask)


def _itc_scores(module, images, input_ids, attention_mask):
  from blip2_jax import losses  # pylint: disable=g-import-not-at-top
  image_feats = module.image_feats(module.query_features(module.encode_image(images))[0])
  text_feat = module.text_feat(module.text_features(input_ids, attention_mask))
  return losses.itc_similarities(image_feats, text_feat)


def _flatten(tree) -> dict:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, jax.sharding.Sharding))


_VOCAB_TABLES = ("language_model.model.decoder.embed_tokens.weight", "language_model.shared.weight",
                 "language_model.lm_head.weight")


def _with_image_token_row(tensors):
  for name, array in tensors:
    if name in _VOCAB_TABLES:
      array = np.concatenate([array, np.zeros_like(array[:1])])
    yield name, array


def _flatten_params(params) -> dict:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(params, sep="/")


def _host_array(x) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _load_tokenizer(root: Path):
  """The tokenizer saved beside the weights, if any (HF BLIP-2 directories have one)."""
  if not any((root / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt",
                                           "spiece.model")):
    log.info("%s has no tokenizer files; pass token ids yourself.", root)
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(root))


def write_safetensors(out: Path, tensors, max_shard_bytes: int):
  """(name, array) pairs -> model.safetensors, or model-0000i-of-0000n.safetensors + index past the limit.
  bf16 goes through safetensors' flax writer (its numpy writer has no bf16)."""
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
  shards, current, size = [], {}, 0
  for name, array in tensors:
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  cpu = jax.devices("cpu")[0]

  def save(shard, file):
    with jax.default_device(cpu):
      save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(out / file), metadata={"format": "pt"})

  if len(shards) == 1:
    save(shards[0], "model.safetensors")
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save(shard, file)
    weight_map.update({k: file for k in shard})
    total += sum(v.nbytes for v in shard.values())
  (out / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
