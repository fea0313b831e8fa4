"""Pretrained weights: Hugging Face safetensors checkpoints <-> our Flax parameter trees.

Most mappings are name tables (end of file): lists of (our parameter path, HF tensor name, kind) that
`tree_from_hf` reads one parameter at a time (optionally straight onto a sharding) and `hf_tensors` writes back:
the BLIP-2 ViT, Q-Former and heads here, the LLMs' in models/opt.py and models/t5.py. On top of them:
- `load_vision_from_blip2`: the frozen ViT and `ln_vision` from any HF BLIP-2 checkpoint
  (`vision_model.*`; HF calls ln_vision `post_layernorm`);
- `load_qformer_from_blip2`: a trained Q-Former from an HF BLIP-2 checkpoint; returns what it could not fill.
One mapping is not a table: `load_qformer_from_bert`, the stage-1 starting point (bert-base-uncased) mapped the
way LAVIS does it: the query FFN is a copy of BERT's FFN, the [DEC] row is added, everything BERT lacks keeps
its init.

Loaders take the model's parameter tree as a template (boxed or not; `jax.eval_shape` output is enough where
nothing keeps its init) and return numpy float32 subtrees keyed like it, so `params = {**params, **loaded}`
merges them. Torch Linear weights are [out, in] and become [in, out] kernels; Conv2d OIHW becomes HWIO. Only
safetensors are read: a pickle (`.bin`, `.pth`) can run code when loaded.
"""

from collections.abc import Mapping
import json
import logging
from pathlib import Path
import re

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors import safe_open

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
_VISION_KEYS = ("visual_encoder", "ln_vision")
_NOT_IN_NUMPY = ("BF16", "F8_E4M3", "F8_E5M2")  # safetensors dtypes its numpy backend refuses


# --- reading safetensors -----------------------------------------------------------------------------------


class SafetensorsCheckpoint(Mapping):
  """Lazy name -> numpy array view of one or more safetensors files; each lookup reads one tensor.

  Tensors keep their stored dtype (bf16 as `ml_dtypes.bfloat16`). safetensors' numpy backend cannot produce
  bf16, the dtype the large BLIP-2 checkpoints ship in, so those few tensors go through its flax backend,
  pinned to the CPU so nothing lands on an accelerator.
  """

  def __init__(self, root: Path, file_of: dict[str, Path]):
    self.root = root
    self._file_of = file_of
    self._handles = {}

  def _handle(self, file: Path, framework: str):
    key = (file, framework)
    if key not in self._handles:
      self._handles[key] = safe_open(str(file), framework=framework)
    return self._handles[key]

  def file_of(self, name: str) -> Path:
    return self._file_of[name]

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._file_of[name]
    handle = self._handle(file, "numpy")
    if handle.get_slice(name).get_dtype() not in _NOT_IN_NUMPY:
      return handle.get_tensor(name)
    with jax.default_device(jax.devices("cpu")[0]):
      return np.asarray(self._handle(file, "flax").get_tensor(name))

  def __contains__(self, name) -> bool:
    return name in self._file_of  # Mapping's default would read the tensor

  def __iter__(self):
    return iter(self._file_of)

  def __len__(self):
    return len(self._file_of)


def read_safetensors_dir(path) -> SafetensorsCheckpoint:
  """Opens a checkpoint: a `.safetensors` file, or a directory with `model.safetensors`, or shards with
  `model.safetensors.index.json` (or bare `*.safetensors` shards). Nothing is read until a tensor is asked for."""
  root = Path(path)
  if not root.exists():
    raise FileNotFoundError(
      f"No checkpoint at {root}: give a directory holding model.safetensors "
      "(or its shards and model.safetensors.index.json)."
    )
  if root.is_file():
    if root.suffix != ".safetensors":
      raise ValueError(
        _pickle_message(root) if root.suffix in _PICKLE_SUFFIXES else f"{root} is not a .safetensors file."
      )
    files = [root]
  elif (root / "model.safetensors.index.json").exists():
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    file_of = {name: root / shard for name, shard in weight_map.items()}
    for shard in sorted(set(file_of.values())):
      if not shard.exists():
        raise FileNotFoundError(f"Shard {shard} listed in {root / 'model.safetensors.index.json'} is missing.")
    return SafetensorsCheckpoint(root, file_of)
  elif (root / "model.safetensors").exists():
    files = [root / "model.safetensors"]
  else:
    files = sorted(root.glob("*.safetensors"))
    if not files:
      if any(p.suffix in _PICKLE_SUFFIXES for p in root.iterdir()):
        raise ValueError(_pickle_message(root))
      raise FileNotFoundError(f"No *.safetensors file in {root}.")
  file_of = {}
  for file in files:
    with safe_open(str(file), framework="numpy") as f:
      for name in f.keys():
        file_of[name] = file
  return SafetensorsCheckpoint(root, file_of)


def _pickle_message(path: Path) -> str:
  return (
    f"{path} holds only PyTorch pickle weights, and blip2_jax reads only safetensors (unpickling can run "
    "code): convert it once with its own transformers class, e.g. "
    "`Blip2ForConditionalGeneration.from_pretrained(dir).save_pretrained(out)`, which writes model.safetensors."
  )


# --- the mapping machinery ----------------------------------------------------------------------------------


def _linear_kernel(w):
  return w.T  # torch Linear [out, in] -> Flax kernel [in, out]


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)  # arrays and jax.ShapeDtypeStruct


class _Filler:
  """Fills our parameters (by '/'-joined path) from checkpoint tensors, checking every shape."""

  def __init__(self, ckpt: SafetensorsCheckpoint, template, keys: dict[str, str] | None = None):
    self.ckpt = ckpt
    self.template = traverse_util.flatten_dict(nn.unbox(template), sep="/")
    self.keys = keys if keys is not None else {k: k for k in ckpt}  # our spelling -> checkpoint spelling
    self.out: dict[str, np.ndarray] = {}
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return key in self.keys

  def read(self, key: str) -> np.ndarray:
    if key not in self.keys:
      raise ValueError(
        f"Checkpoint {self.ckpt.root} has no tensor `{key}`; is it the right kind of checkpoint "
        "(and the config the right size)?"
      )
    self.used.add(key)
    return np.asarray(self.ckpt[self.keys[key]], np.float32)

  def _check(self, dst: str, key: str, shape):
    expected = _shape(self.template[dst])
    if tuple(shape) != expected:
      raise ValueError(
        f"Shape mismatch at `{dst}`: checkpoint tensor `{self.keys[key]}` in "
        f"{self.ckpt.file_of(self.keys[key])} gives {tuple(shape)}, the model expects {expected}; "
        "make the config match the checkpoint."
      )

  def put(self, dst: str, key: str, transform=None):
    value = self.read(key)
    if transform is not None:
      value = transform(value)
    self._check(dst, key, value.shape)
    self.out[dst] = np.ascontiguousarray(value, np.float32)

  def put_leading_rows(self, dst: str, key: str):
    """Copies a checkpoint table into the first rows of ours; rows it lacks keep the template's values (as
    `resize_token_embeddings` does for BLIP-2's added [DEC] token)."""
    value = self.read(key)
    expected = _shape(self.template[dst])
    if value.shape[0] > expected[0] or value.shape[1:] != expected[1:]:
      self._check(dst, key, value.shape)
    if value.shape[0] < expected[0]:
      log.info(
        "%s: %d rows from the checkpoint, the last %d keep their init.",
        dst,
        value.shape[0],
        expected[0] - value.shape[0],
      )
      value = np.concatenate([value, self.template_value(dst)[value.shape[0] :]], axis=0)
    self.out[dst] = np.ascontiguousarray(value, np.float32)

  def dense(self, dst: str, src: str):
    self.put(f"{dst}/kernel", f"{src}.weight", _linear_kernel)
    self.put(f"{dst}/bias", f"{src}.bias")

  def norm(self, dst: str, src: str):
    self.put(f"{dst}/scale", f"{src}.weight")
    self.put(f"{dst}/bias", f"{src}.bias")

  def template_value(self, dst: str) -> np.ndarray:
    leaf = self.template[dst]
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ValueError(
        f"`{dst}` is not in the checkpoint, so it keeps its init value, but the template is "
        "abstract: pass initialised parameters (model.init) as the template."
      )
    return np.array(leaf, np.float32)

  def subtree(self, top_keys, *, require_all: bool):
    """Nested dict of our parameters under `top_keys`; unfilled leaves take the template's values."""
    flat = {}
    for path in self.template:
      if path.split("/")[0] not in top_keys:
        continue
      if path in self.out:
        flat[path] = self.out[path]
      elif require_all:
        raise ValueError(f"No checkpoint tensor maps to `{path}`: the loader and the model disagree.")
      else:
        flat[path] = self.template_value(path)
    return traverse_util.unflatten_dict(flat, sep="/")


def _num_layers(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def _num_template_layers(template, prefix: str) -> int:
  return sum(1 for k in template if re.fullmatch(prefix + r"_\d+", k))


# --- the frozen ViT -----------------------------------------------------------------------------------------


def vit_depth(params) -> int:
  """The number of ViT blocks in a parameter tree (they are stacked on the leading axis of `blocks/...`)."""
  return _shape(nn.unbox(params)["visual_encoder"]["blocks"]["fc1"]["kernel"])[0]


def load_vision_from_blip2(path, params_template) -> dict:
  """HF BLIP-2 checkpoint -> {'visual_encoder': ..., 'ln_vision': ...}, numpy float32.

  A checkpoint deeper than the config keeps its first `depth` blocks (BLIP-2 uses 39 of EVA ViT-g's 40).
  """
  ckpt = read_safetensors_dir(path)
  template = nn.unbox(params_template)
  depth = vit_depth(template)
  have = _num_layers(ckpt, r"vision_model\.encoder\.layers\.(\d+)\.")
  if have < depth:
    raise ValueError(f"Checkpoint {ckpt.root} has {have} ViT blocks but the config asks for depth={depth}.")
  if have > depth:
    log.info("Checkpoint %s has %d ViT blocks; using the first %d (config vit.depth).", ckpt.root, have, depth)
  return tree_from_hf(ckpt, vision_weight_map(), {k: template[k] for k in _VISION_KEYS})


# --- the Q-Former -------------------------------------------------------------------------------------------


def _fill_qformer_layer(
  fill: _Filler,
  i: int,
  src: str,
  *,
  self_attn: str,
  text_ffn: tuple[str, str] | None,
  query_ffn: tuple[str, str] | None,
):
  """One Q-Former layer in BERT naming under `src`: self-attention (q/k/v under `self_attn`) and the FFNs given
  as (intermediate, output) module names, None where the checkpoint has no such FFN."""
  dst = f"qformer/layers_{i}"
  for name in ("query", "key", "value"):
    fill.dense(f"{dst}/attention/{name}", f"{src}.{self_attn}.{name}")
  fill.dense(f"{dst}/attention/output", f"{src}.attention.output.dense")
  fill.norm(f"{dst}/attention/output_norm", f"{src}.attention.output.LayerNorm")
  for ffn, names in (("ffn", text_ffn), ("ffn_query", query_ffn)):
    if names is None:
      continue
    intermediate, output = names
    fill.dense(f"{dst}/{ffn}/intermediate", f"{src}.{intermediate}.dense")
    fill.dense(f"{dst}/{ffn}/output", f"{src}.{output}.dense")
    fill.norm(f"{dst}/{ffn}/output_norm", f"{src}.{output}.LayerNorm")


def _bert_names(ckpt) -> dict[str, str]:
  """Canonical BERT names (no `bert.` prefix, LayerNorm weight/bias) -> the checkpoint's own spelling."""
  names = {}
  for key in ckpt:
    canon = key[len("bert.") :] if key.startswith("bert.") else key
    canon = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", canon)
    canon = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", canon)
    names[canon] = key
  return names


def load_qformer_from_bert(path, params_template) -> dict:
  """BERT checkpoint (HF layout) -> every parameter outside the ViT, numpy float32, as LAVIS initialises
  stage 1: embeddings, self-attention, the text FFN and the MLM head from BERT; the query FFN a copy of the
  text FFN; cross-attention, query_tokens, projections, itm_head and temp keep the template's (init) values.

  BERT's token-type embeddings are dropped, as in LAVIS: the Q-Former has none.
  """
  ckpt = read_safetensors_dir(path)
  fill = _Filler(ckpt, params_template, _bert_names(ckpt))
  template = nn.unbox(params_template)
  num_layers = _num_template_layers(template["qformer"], "layers")
  have = _num_layers(fill.keys, r"encoder\.layer\.(\d+)\.")
  if have < num_layers:
    raise ValueError(
      f"BERT checkpoint {ckpt.root} has {have} layers but the Q-Former config asks for num_layers={num_layers}."
    )
  if have > num_layers:
    log.info("BERT checkpoint %s has %d layers; using the first %d.", ckpt.root, have, num_layers)

  fill.put_leading_rows("qformer/word_embeddings/embedding", "embeddings.word_embeddings.weight")
  fill.put("qformer/position_embeddings", "embeddings.position_embeddings.weight")
  fill.norm("qformer/embed_norm", "embeddings.LayerNorm")
  for i in range(num_layers):
    src = f"encoder.layer.{i}"
    _fill_qformer_layer(fill, i, src, self_attn="attention.self", text_ffn=("intermediate", "output"), query_ffn=None)
    for leaf in (
      "intermediate/kernel",
      "intermediate/bias",
      "output/kernel",
      "output/bias",
      "output_norm/scale",
      "output_norm/bias",
    ):
      fill.out[f"qformer/layers_{i}/ffn_query/{leaf}"] = fill.out[f"qformer/layers_{i}/ffn/{leaf}"].copy()

  if fill.has("embeddings.token_type_embeddings.weight"):
    log.info("Dropping BERT's token_type_embeddings: the Q-Former has none (as LAVIS).")
  if fill.has("cls.predictions.bias"):
    fill.dense("qformer/lm_transform", "cls.predictions.transform.dense")
    fill.norm("qformer/lm_norm", "cls.predictions.transform.LayerNorm")
    fill.put_leading_rows("qformer/lm_bias", "cls.predictions.bias")
  else:
    log.info("%s has no MLM head (cls.predictions.*): the Q-Former LM head keeps its init.", ckpt.root)
  kept = sorted(
    {p.rsplit("/", 1)[0] for p in fill.template if p not in fill.out and p.split("/")[0] not in _VISION_KEYS}
  )
  log.info("Q-Former from BERT %s; kept at init: %s", ckpt.root, ", ".join(kept))
  return fill.subtree([k for k in template if k not in _VISION_KEYS], require_all=False)


def load_qformer_from_blip2(path, params_template) -> tuple[dict, set[str]]:
  """HF BLIP-2 checkpoint -> (every parameter outside the ViT, numpy float32; the set of '/'-joined paths the
  checkpoint did not fill, which keep the template's values).

  Captioning/VQA checkpoints hold the query side only (`query_tokens`, `qformer.*` without the text FFN);
  retrieval checkpoints (`Blip2ForImageTextRetrieval`, use_qformer_text_input) add the text FFN, embeddings,
  `vision_projection`, `text_projection` and `itm_head`; InstructBLIP checkpoints (the question-conditioned
  Q-Former) add the text FFN and `qformer.embeddings.*`. HF keeps neither `temp` nor the Q-Former LM head, so
  those are never filled. A checkpoint tensor with no counterpart in the model (more layers, cross-attention
  where the config has none) is an error: the config does not describe the checkpoint.
  """
  ckpt = read_safetensors_dir(path)
  template = nn.unbox(params_template)
  qformer = template["qformer"]
  num_layers = _num_template_layers(qformer, "layers")
  cross = [i for i in range(num_layers) if "crossattention" in qformer[f"layers_{i}"]]
  freq = cross[1] - cross[0] if len(cross) > 1 else num_layers
  cfg = ml_collections.ConfigDict(dict(qformer=dict(num_layers=num_layers, cross_attention_freq=freq)))
  entries = qformer_weight_map(
    cfg,
    text="embeddings.word_embeddings.weight" in ckpt,
    instructblip="qformer.embeddings.word_embeddings.weight" in ckpt,
  )
  used = {e[1] for e in entries}
  unused = sorted(
    k
    for k in ckpt
    if k.startswith(("qformer.", "query_tokens", "embeddings.", "vision_projection.", "text_projection.", "itm_head."))
    and k not in used
  )
  if unused:
    raise ValueError(
      f"Checkpoint {ckpt.root} has Q-Former tensors the model has no place for, first "
      f"`{unused[0]}` ({len(unused)} in all): make the config (num_layers, "
      "cross_attention_freq) match the checkpoint."
    )
  flat = traverse_util.flatten_dict(template, sep="/")
  filled = {e[0] for e in entries}
  loaded = traverse_util.flatten_dict(
    tree_from_hf(ckpt, entries, traverse_util.unflatten_dict({p: flat[p] for p in filled}, sep="/")), sep="/"
  )
  top = {k for k in template if k not in _VISION_KEYS}
  unfilled = {p for p in flat if p.split("/")[0] in top and p not in filled}
  for p in unfilled:
    if isinstance(flat[p], jax.ShapeDtypeStruct):
      raise ValueError(
        f"`{p}` is not in the checkpoint, so it keeps its init value, but the template is "
        "abstract: pass initialised parameters (model.init) as the template."
      )
    loaded[p] = np.array(flat[p], np.float32)
  log.info("Q-Former from BLIP-2 %s: %d parameters not in the checkpoint.", ckpt.root, len(unfilled))
  return traverse_util.unflatten_dict(loaded, sep="/"), unfilled


# --- name tables -------------------------------------------------------------------------------------------
#
# A weight map is a list of (our '/'-joined parameter path, HF tensor name, kind). A name holding "{i}" belongs to
# a parameter stacked over layers by nn.scan: the HF tensors of layers 0..L-1 become its leading axis. Kinds:
# 'linear' (torch Linear [out, in] <-> Flax kernel [in, out]), 'conv' (torch OIHW <-> Flax HWIO), 'copy', and
# 'qkv_bias_q' / 'qkv_bias_v': the q or v third of a fused qkv bias whose k third is zero (EVA ViT in HF layout).

_TO_OURS = {
  "linear": lambda w: w.T,
  "conv": lambda w: w.transpose(2, 3, 1, 0),
  "copy": lambda w: w,
  "qkv_bias_q": lambda b: b.reshape(3, -1)[0],
  "qkv_bias_v": lambda b: b.reshape(3, -1)[2],
}
_TO_HF = {"linear": lambda w: w.T, "conv": lambda w: w.transpose(3, 2, 0, 1), "copy": lambda w: w}


def tree_from_hf(get, weight_map, template, *, dtype=np.float32, prefix: str = "", place=None) -> dict:
  """Builds the nested parameter dict of `template` (boxed, plain or abstract) from the tensors of `get` (a
  mapping such as a SafetensorsCheckpoint, or a function of the name), one parameter at a time, checking every
  shape. `dtype` is a numpy dtype or a function of the parameter path giving one.

  `prefix` is prepended to every HF name (e.g. 'language_model.'). `place(path, array)`, if given, turns each
  finished numpy parameter into what is stored (e.g. a sharded device array), so the host never holds more
  than one parameter. Every template parameter must be covered by the map: a parameter the map does not name
  is a bug in the map, reported as such."""
  flat = traverse_util.flatten_dict(nn.unbox(template), sep="/")
  lookup = get.__getitem__ if isinstance(get, Mapping) else get
  out = {}
  for path, name, kind in weight_map:
    if path not in flat:
      raise ValueError(f"Weight map names `{path}`, which the model does not have.")
    expected = _shape(flat[path])
    stacked = "{i}" in name
    names = [prefix + name.format(i=i) for i in range(expected[0])] if stacked else [prefix + name]
    target = expected[1:] if stacked else expected
    is_fn = callable(dtype) and not isinstance(dtype, (type, np.dtype))  # np.float32 itself is callable
    value = np.empty(expected, dtype(path) if is_fn else dtype)
    for j, full in enumerate(names):
      try:
        tensor = lookup(full)
      except KeyError:
        raise ValueError(
          f"Checkpoint has no tensor `{full}` (for `{path}`); is the config the right size for the checkpoint?"
        ) from None
      stored = tuple(np.shape(tensor))
      tensor = _TO_OURS[kind](np.asarray(tensor))
      if tuple(tensor.shape) != tuple(target):
        where = f" in {get.file_of(full)}" if hasattr(get, "file_of") else ""
        raise ValueError(
          f"Shape mismatch at `{path}`: checkpoint tensor `{full}`{where} gives {stored} ({kind} -> "
          f"{tuple(tensor.shape)}), the model expects {tuple(target)}; make the config match the "
          "checkpoint."
        )
      if stacked:
        value[j] = tensor
      else:
        value = np.asarray(tensor, value.dtype)
    out[path] = value if place is None else place(path, value)
    del value
  missing = sorted(set(flat) - set(out))
  if missing:
    raise ValueError(
      f"No checkpoint tensor maps to `{missing[0]}` ({len(missing)} in all): the weight map and the model disagree."
    )
  return traverse_util.unflatten_dict(out, sep="/")


def hf_tensors(params, weight_map, *, prefix: str = ""):
  """The inverse of tree_from_hf: yields (HF name, numpy array) for every tensor the map names. A fused qkv bias
  is rebuilt from its q and v parts with a zero k third."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  fused = {}
  for path, name, kind in weight_map:
    value = np.asarray(flat[path])
    pieces = [(name.format(i=i), value[i]) for i in range(value.shape[0])] if "{i}" in name else [(name, value)]
    for hf_name, v in pieces:
      if kind.startswith("qkv_bias_"):
        parts = fused.setdefault(hf_name, {})
        parts[kind[-1]] = v
        if len(parts) == 2:
          del fused[hf_name]
          yield prefix + hf_name, np.concatenate([parts["q"], np.zeros_like(parts["q"]), parts["v"]])
        continue
      yield prefix + hf_name, np.ascontiguousarray(_TO_HF[kind](v))
  if fused:
    raise ValueError(f"Weight map gives only one half of the fused bias `{next(iter(fused))}`.")


# --- the BLIP-2 tables (HF layout) ---------------------------------------------------------------------------


def dense_entries(ours, theirs):
  return [(f"{ours}/kernel", f"{theirs}.weight", "linear"), (f"{ours}/bias", f"{theirs}.bias", "copy")]


def norm_entries(ours, theirs):
  return [(f"{ours}/scale", f"{theirs}.weight", "copy"), (f"{ours}/bias", f"{theirs}.bias", "copy")]


def vision_weight_map() -> list:
  """The frozen ViT (its blocks stacked by nn.scan: as many as the parameters have) and ln_vision in HF BLIP-2
  naming (`vision_model.*`)."""
  emb = "vision_model.embeddings"
  out = [
    ("visual_encoder/cls_token", f"{emb}.class_embedding", "copy"),
    ("visual_encoder/pos_embed", f"{emb}.position_embedding", "copy"),
    ("visual_encoder/patch_embed/kernel", f"{emb}.patch_embedding.weight", "conv"),
    ("visual_encoder/patch_embed/bias", f"{emb}.patch_embedding.bias", "copy"),
  ]
  src, dst = "vision_model.encoder.layers.{i}", "visual_encoder/blocks"
  out += norm_entries(f"{dst}/norm1", f"{src}.layer_norm1") + norm_entries(f"{dst}/norm2", f"{src}.layer_norm2")
  # HF fuses the biases as cat(q_bias, 0, v_bias): EVA's key has no bias.
  out += [
    (f"{dst}/attn/qkv/kernel", f"{src}.self_attn.qkv.weight", "linear"),
    (f"{dst}/attn/q_bias", f"{src}.self_attn.qkv.bias", "qkv_bias_q"),
    (f"{dst}/attn/v_bias", f"{src}.self_attn.qkv.bias", "qkv_bias_v"),
  ]
  out += dense_entries(f"{dst}/attn/proj", f"{src}.self_attn.projection")
  out += dense_entries(f"{dst}/fc1", f"{src}.mlp.fc1") + dense_entries(f"{dst}/fc2", f"{src}.mlp.fc2")
  return out + norm_entries("ln_vision", "vision_model.post_layernorm")


def qformer_weight_map(cfg, *, text: bool, instructblip: bool = False) -> list:
  """query_tokens and the Q-Former in HF naming; with `text`, also the text side and the ITC/ITM heads of
  retrieval checkpoints (`embeddings.*`, the text FFN, `vision_projection`, `text_projection`, `itm_head`).

  instructblip: the question-conditioned Q-Former in HF InstructBLIP naming instead: the text side (the text FFN,
  `qformer.embeddings.word_embeddings` / `position_embeddings`) with the embedding LayerNorm at
  `qformer.embeddings.layernorm`, and no heads."""
  qf = cfg.qformer
  norm = "qformer.embeddings.layernorm" if instructblip else "qformer.layernorm"
  out = [("query_tokens", "query_tokens", "copy")] + norm_entries("qformer/embed_norm", norm)
  for i in range(qf.num_layers):
    src, dst = f"qformer.encoder.layer.{i}", f"qformer/layers_{i}"
    for name in ("query", "key", "value"):
      out += dense_entries(f"{dst}/attention/{name}", f"{src}.attention.attention.{name}")
    out += dense_entries(f"{dst}/attention/output", f"{src}.attention.output.dense")
    out += norm_entries(f"{dst}/attention/output_norm", f"{src}.attention.output.LayerNorm")
    if i % qf.cross_attention_freq == 0:
      for name in ("query", "key", "value"):
        out += dense_entries(f"{dst}/crossattention/{name}", f"{src}.crossattention.attention.{name}")
      out += dense_entries(f"{dst}/crossattention/output", f"{src}.crossattention.output.dense")
      out += norm_entries(f"{dst}/crossattention/output_norm", f"{src}.crossattention.output.LayerNorm")
    ffns = [("ffn_query", "intermediate_query", "output_query")]
    if text or instructblip:
      ffns.append(("ffn", "intermediate", "output"))
    for ours, intermediate, output in ffns:
      out += dense_entries(f"{dst}/{ours}/intermediate", f"{src}.{intermediate}.dense")
      out += dense_entries(f"{dst}/{ours}/output", f"{src}.{output}.dense")
      out += norm_entries(f"{dst}/{ours}/output_norm", f"{src}.{output}.LayerNorm")
  if text:
    out += [
      ("qformer/word_embeddings/embedding", "embeddings.word_embeddings.weight", "copy"),
      ("qformer/position_embeddings", "embeddings.position_embeddings.weight", "copy"),
    ]
    out += dense_entries("vision_proj", "vision_projection") + dense_entries("text_proj", "text_projection")
    out += dense_entries("itm_head", "itm_head")
  elif instructblip:
    out += [
      ("qformer/word_embeddings/embedding", "qformer.embeddings.word_embeddings.weight", "copy"),
      ("qformer/position_embeddings", "qformer.embeddings.position_embeddings.weight", "copy"),
    ]
  return out
