"""LAVIS stage-1 checkpoints (`blip2_pretrained.pth`, ...) -> our `Blip2Qformer` parameters, to continue stage 1.

Hugging Face's BLIP-2 checkpoints dropped `temp` and the Q-Former LM head; LAVIS's own `.pth` files keep the
whole stage-1 model. Every name below was checked against LAVIS (salesforce/LAVIS, commit 506965b):
- lavis/models/blip2_models/blip2_qformer.py (`Blip2Qformer.__init__`): `Qformer` (a `BertLMHeadModel`),
  `query_tokens`, `visual_encoder`, `ln_vision`, `vision_proj`, `text_proj`, `itm_head`, `temp`;
- lavis/models/blip2_models/Qformer.py: `Qformer.bert.embeddings.{word_embeddings, position_embeddings,
  LayerNorm}` plus the `position_ids` buffer (no token-type embeddings, no pooler: `add_pooling_layer=False`);
  `Qformer.bert.encoder.layer.{i}.{attention, crossattention (when i % cross_attention_freq == 0)}.{self.{query,
  key,value}, output.{dense, LayerNorm}}`, `intermediate.dense`, `output.{dense, LayerNorm}` (text FFN),
  `intermediate_query.dense`, `output_query.{dense, LayerNorm}` (query FFN); the LM head
  `Qformer.cls.predictions.{transform.{dense, LayerNorm}, bias, decoder.{weight, bias}}`, whose decoder weight
  is tied to the word embeddings and whose decoder bias is `predictions.bias` (`self.decoder.bias = self.bias`);
- lavis/models/eva_vit.py: `visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1,
  attn.{qkv (no bias), q_bias, v_bias, proj}, norm2, mlp.{fc1, fc2}}}` (no relative position bias, layer-scale
  or final norm in `create_eva_vit_g`);
- lavis/models/blip2_models/blip2.py (`load_from_pretrained` reads `checkpoint["model"]`) and
  lavis/runners/runner_base.py (`_save_checkpoint` drops parameters without gradient, so the frozen ViT is
  usually absent while buffers stay).
The vocabulary is bert-base-uncased + [DEC] (30523) in the file already (LAVIS `resize_token_embeddings`), so
the config's `qformer.vocab_size` must say 30523 too.

Reading a `.pth` needs torch (an optional extra); it is read with `weights_only=True`, which refuses any pickled
object beyond tensors and plain containers, so loading cannot run code.
"""

from collections.abc import Mapping
import logging
from pathlib import Path
import pickle
import re

from flax import traverse_util
import flax.linen as nn
import ml_collections
import numpy as np

from blip2_jax import weights

log = logging.getLogger(__name__)

# Tensors LAVIS saves that have no parameter of their own here: a buffer of 0..max_pos-1, and the LM decoder,
# which is tied (the same tensor as `_TIED[name]`; our decoder is `word_embeddings.attend` plus `lm_bias`).
_POSITION_IDS = "Qformer.bert.embeddings.position_ids"
_TIED = {
  "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
  "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
DROPPED = (_POSITION_IDS, *_TIED)


def _dense(ours, theirs):
  return [(f"{ours}/kernel", f"{theirs}.weight", "linear"), (f"{ours}/bias", f"{theirs}.bias", "copy")]


def _norm(ours, theirs):
  return [(f"{ours}/scale", f"{theirs}.weight", "copy"), (f"{ours}/bias", f"{theirs}.bias", "copy")]


def lavis_weight_map(cfg, *, with_vision: bool) -> list:
  """(our '/'-joined parameter path, LAVIS tensor name, kind) for every `Blip2Qformer` parameter, the EVA ViT's
  only `with_vision`. Reads cfg.qformer.num_layers and cfg.qformer.cross_attention_freq (the ViT blocks are
  stacked: the parameters give their number)."""
  out = [("query_tokens", "query_tokens", "copy"), ("temp", "temp", "copy")] + _norm("ln_vision", "ln_vision")
  bert = "Qformer.bert"
  out += [
    ("qformer/word_embeddings/embedding", f"{bert}.embeddings.word_embeddings.weight", "copy"),
    ("qformer/position_embeddings", f"{bert}.embeddings.position_embeddings.weight", "copy"),
  ]
  out += _norm("qformer/embed_norm", f"{bert}.embeddings.LayerNorm")
  qf = cfg.qformer
  for i in range(qf.num_layers):
    src, dst = f"{bert}.encoder.layer.{i}", f"qformer/layers_{i}"
    blocks = ["attention"] + (["crossattention"] if i % qf.cross_attention_freq == 0 else [])
    for block in blocks:
      for name in ("query", "key", "value"):
        out += _dense(f"{dst}/{block}/{name}", f"{src}.{block}.self.{name}")
      out += _dense(f"{dst}/{block}/output", f"{src}.{block}.output.dense")
      out += _norm(f"{dst}/{block}/output_norm", f"{src}.{block}.output.LayerNorm")
    for ours, suffix in (("ffn", ""), ("ffn_query", "_query")):
      out += _dense(f"{dst}/{ours}/intermediate", f"{src}.intermediate{suffix}.dense")
      out += _dense(f"{dst}/{ours}/output", f"{src}.output{suffix}.dense")
      out += _norm(f"{dst}/{ours}/output_norm", f"{src}.output{suffix}.LayerNorm")
  head = "Qformer.cls.predictions"
  out += _dense("qformer/lm_transform", f"{head}.transform.dense")
  out += _norm("qformer/lm_norm", f"{head}.transform.LayerNorm") + [("qformer/lm_bias", f"{head}.bias", "copy")]
  out += _dense("vision_proj", "vision_proj") + _dense("text_proj", "text_proj") + _dense("itm_head", "itm_head")
  if with_vision:
    vit = "visual_encoder"
    out += [
      ("visual_encoder/cls_token", f"{vit}.cls_token", "copy"),
      ("visual_encoder/pos_embed", f"{vit}.pos_embed", "copy"),
      ("visual_encoder/patch_embed/kernel", f"{vit}.patch_embed.proj.weight", "conv"),
      ("visual_encoder/patch_embed/bias", f"{vit}.patch_embed.proj.bias", "copy"),
    ]
    src, dst = f"{vit}.blocks.{{i}}", "visual_encoder/blocks"
    out += _norm(f"{dst}/norm1", f"{src}.norm1") + _norm(f"{dst}/norm2", f"{src}.norm2")
    # EVA keeps q and v biases apart (the key has none), as our ViT does: no fused bias to split.
    out += [
      (f"{dst}/attn/qkv/kernel", f"{src}.attn.qkv.weight", "linear"),
      (f"{dst}/attn/q_bias", f"{src}.attn.q_bias", "copy"),
      (f"{dst}/attn/v_bias", f"{src}.attn.v_bias", "copy"),
    ]
    out += _dense(f"{dst}/attn/proj", f"{src}.attn.proj")
    out += _dense(f"{dst}/fc1", f"{src}.mlp.fc1") + _dense(f"{dst}/fc2", f"{src}.mlp.fc2")
  return out


def _count(tree, prefix: str) -> int:
  return sum(1 for k in tree if re.fullmatch(prefix + r"_\d+", k))


def _structure_of(template) -> ml_collections.ConfigDict:
  """The sizes the weight map needs, read off the parameter tree (load_lavis_checkpoint takes no config). The
  first layer after 0 with cross-attention gives the frequency; with only layer 0, any value >= num_layers."""
  qformer = template["qformer"]
  num_layers = _count(qformer, "layers")
  cross = [i for i in range(1, num_layers) if "crossattention" in qformer[f"layers_{i}"]]
  return ml_collections.ConfigDict(
    dict(
      qformer=dict(num_layers=num_layers, cross_attention_freq=cross[0] if cross else num_layers),
    )
  )


def _numpy(tensor) -> np.ndarray:
  return tensor.detach().float().numpy()  # a half-precision ViT -> float32 (numpy has no bf16)


def _read_state_dict(path: Path) -> Mapping:
  if not path.is_file():
    raise FileNotFoundError(f"No LAVIS checkpoint at {path}: give the .pth file (e.g. blip2_pretrained.pth).")
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only LAVIS .pth files need it)
  except ImportError:
    raise ImportError(
      f"Reading the LAVIS checkpoint {path} needs PyTorch: `pip install torch` (CPU is enough) to load .pth files."
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} is not a PyTorch checkpoint that loads with weights_only=True ({first_line}).") from None
  state = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
  if not isinstance(state, Mapping) or not any(str(k).startswith("Qformer.bert.") for k in state):
    raise ValueError(
      f"{path} is not a LAVIS BLIP-2 checkpoint: it has no `Qformer.bert.*` tensors (at the top "
      "level or under 'model')."
    )
  return state


def load_lavis_checkpoint(path, params_template) -> tuple[dict, set[str]]:
  """LAVIS `Blip2Qformer` state dict (bare or under 'model') -> (nested numpy float32 dict of the parameters the
  file fills, set of '/'-joined paths it does not fill).

  The Q-Former, its LM head, `query_tokens`, `ln_vision`, the ITC/ITM heads and `temp` are always filled; the
  EVA ViT only when the file has `visual_encoder.*` (LAVIS's runner saves only trainable parameters, so a frozen
  ViT is usually not there: load it from an HF checkpoint with `weights.load_vision_from_blip2`). Each top-level
  subtree returned is complete, so `{**params, **loaded}` merges. `params_template` may be boxed, plain or
  abstract (jax.eval_shape). A missing tensor, a shape that differs or a tensor with no place in the model
  (the config's depth, width or vocabulary differs from the file's) is an error naming it.
  """
  path = Path(path)
  state = _read_state_dict(path)
  if "Qformer.bert.embeddings.word_embeddings.weight" not in state:
    raise ValueError(
      f"{path} has no Q-Former text embeddings: it is a stage-2 checkpoint (BLIP-2 OPT/FlanT5, which "
      "drop the text side), not the stage-1 model this loads."
    )
  template_tree = nn.unbox(params_template)
  template = traverse_util.flatten_dict(template_tree, sep="/")
  with_vision = any(k.startswith("visual_encoder.") for k in state)
  weight_map = lavis_weight_map(_structure_of(template_tree), with_vision=with_vision)

  depth = weights.vit_depth(template_tree) if with_vision else 0
  names = {n.format(i=i) for _, n, _ in weight_map for i in (range(depth) if "{i}" in n else [0])}
  unknown = [k for k in state if k not in names and k not in DROPPED]  # in the file's (module) order
  if unknown:
    raise ValueError(
      f"{path} has tensors the model has no place for, first `{unknown[0]}` ({len(unknown)} in all): "
      "make the config (Q-Former num_layers, cross_attention_freq, ViT depth) match the checkpoint."
    )
  for tied, source in _TIED.items():
    if tied in state and source in state and not np.array_equal(_numpy(state[tied]), _numpy(state[source])):
      raise ValueError(f"{path}: `{tied}` differs from `{source}`, but the Q-Former ties them (as LAVIS does).")

  paths = {p for p, _, _ in weight_map}
  sub_template = traverse_util.unflatten_dict({p: v for p, v in template.items() if p in paths}, sep="/")
  try:
    loaded = weights.tree_from_hf(
      lambda name: _numpy(state[name]), weight_map, sub_template, dtype=np.dtype(np.float32)
    )
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  unfilled = set(template) - paths
  log.info(
    "LAVIS checkpoint %s: %d parameters loaded (%s the ViT), %d left to the caller.",
    path,
    len(paths),
    "with" if with_vision else "without",
    len(unfilled),
  )
  return loaded, unfilled
