"""Hugging Face's BLIP-2 layout: its config.json <-> our model config, its tensor names, and sharded safetensors.

The released models (Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl, blip2-itm-vit-g, ...) are `config.json` plus
`model.safetensors` or shards with an index. Two architectures:
- `Blip2ForConditionalGeneration` (an LLM family of models/llms.py): ViT, the query side of the Q-Former,
  `language_projection` and the frozen LLM -> our `Blip2LLM`;
- `Blip2ForImageTextRetrieval`: ViT and the whole Q-Former with ITC/ITM heads -> our `Blip2Qformer` (without the
  Q-Former LM head and `temp`, which HF does not keep).
And InstructBLIP's (model_type "instructblip"), `InstructBlipForConditionalGeneration`: as the first, with the
Q-Former's text side (`qformer.embeddings.*`, the text FFN), which reads the question -> our question-conditioned
`Blip2LLM` (model config `qformer_text_input`).
Reading the tensors into a sharded model is `state.load_hf_blip2`; writing them is `Blip2.save_pretrained`.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.flax import save_file
import transformers

from blip2_jax import weights
from blip2_jax.models import llms

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")
INSTRUCTBLIP = "InstructBlipForConditionalGeneration"  # model_type "instructblip": the question-conditioned Q-Former


def config_from_hf(hf: dict, *, dtype: str = "float32", remat_policy: str = "none", tensor_names=()):
  """HF BLIP-2 (or InstructBLIP) config.json (as a dict) -> (our model config, its kind: llms.RETRIEVAL or the LLM
  family). An InstructBLIP config gives a question-conditioned model (`qformer_text_input`).

  tensor_names: the checkpoint's tensor names (whether a T5 stores its own lm_head is not in the config)."""
  arch = (hf.get("architectures") or [None])[0]
  instruct = hf.get("model_type") == "instructblip" and arch == INSTRUCTBLIP
  if not instruct and (hf.get("model_type") != "blip-2" or arch not in ARCHITECTURES):
    raise ValueError(
      f"Not a supported BLIP-2 checkpoint: model_type={hf.get('model_type')!r}, "
      f"architectures={hf.get('architectures')}; expected model_type 'blip-2' and one of "
      f"{', '.join(ARCHITECTURES)}, or model_type 'instructblip' and {INSTRUCTBLIP}."
    )
  vc, qc = hf["vision_config"], hf["qformer_config"]
  act = vc.get("hidden_act", "gelu")
  if act not in ("gelu", "quick_gelu"):
    raise ValueError(f"vision_config.hidden_act={act!r} is not supported (gelu or quick_gelu).")
  retrieval = arch == "Blip2ForImageTextRetrieval"
  cfg = ml_collections.ConfigDict(
    dict(
      vit=dict(
        image_size=vc["image_size"],
        patch_size=vc["patch_size"],
        width=vc["hidden_size"],
        depth=vc["num_hidden_layers"],
        num_heads=vc["num_attention_heads"],
        mlp_dim=vc["intermediate_size"],
        layer_norm_eps=vc["layer_norm_eps"],
        act=act,
        dtype=dtype,
      ),
      qformer=dict(
        vocab_size=qc["vocab_size"],
        hidden_size=qc["hidden_size"],
        num_layers=qc["num_hidden_layers"],
        num_heads=qc["num_attention_heads"],
        intermediate_size=qc["intermediate_size"],
        cross_attention_freq=qc.get("cross_attention_frequency", 2),
        max_position_embeddings=qc["max_position_embeddings"],
        layer_norm_eps=qc["layer_norm_eps"],
        dropout_rate=0.0,
        dtype="float32",
        text_input=retrieval or instruct,
        lm_head=False,
      ),
      qformer_text_input=instruct,
      num_query_tokens=hf["num_query_tokens"],
      embed_dim=hf.get("image_text_hidden_size", 256),
      # HF's post_layernorm (our ln_vision) takes the vision config's eps.
      ln_vision_eps=vc["layer_norm_eps"],
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      bos_token_id=-1,
    )
  )
  if retrieval:
    return cfg, llms.RETRIEVAL
  text = hf["text_config"]
  kind = text.get("model_type")
  if kind not in llms.FAMILIES:
    raise ValueError(
      f"text_config.model_type={kind!r} is not supported: blip2_jax has {', '.join(llms.FAMILIES)} language models."
    )
  prefix = "language_model."
  cfg.llm = llms.llm_config(
    text,
    dtype=dtype,
    remat_policy=remat_policy,
    tensor_names=[n[len(prefix) :] for n in tensor_names if n.startswith(prefix)],
  )
  return cfg, kind


def hf_config_from_ours(cfg, kind: str, llm_hf_config: dict | None = None, image_token_index=None) -> dict:
  """Our model config -> a BLIP-2 config.json dict that transformers reads (the inverse of config_from_hf); an
  InstructBLIP one for a question-conditioned model (`qformer_text_input`)."""
  instruct = kind != llms.RETRIEVAL and cfg.get("qformer_text_input", False)
  vit, qf = cfg.vit, cfg.qformer
  vision = dict(
    hidden_size=vit.width,
    intermediate_size=vit.mlp_dim,
    num_hidden_layers=vit.depth,
    num_attention_heads=vit.num_heads,
    image_size=vit.image_size,
    patch_size=vit.patch_size,
    hidden_act=vit.act,
    layer_norm_eps=vit.layer_norm_eps,
    qkv_bias=True,
  )
  qformer = dict(
    vocab_size=qf.vocab_size,
    hidden_size=qf.hidden_size,
    num_hidden_layers=qf.num_layers,
    num_attention_heads=qf.num_heads,
    intermediate_size=qf.intermediate_size,
    hidden_act="gelu",
    max_position_embeddings=qf.max_position_embeddings,
    layer_norm_eps=qf.layer_norm_eps,
    cross_attention_frequency=qf.cross_attention_freq,
    encoder_hidden_size=vit.width,
  )
  if instruct:
    config = transformers.InstructBlipConfig(
      vision_config=vision,
      qformer_config=qformer,
      text_config=llm_hf_config,
      num_query_tokens=cfg.num_query_tokens,
      image_token_index=image_token_index,
    )
    return dict(config.to_dict(), architectures=[INSTRUCTBLIP])
  qformer["use_qformer_text_input"] = kind == llms.RETRIEVAL
  config = transformers.Blip2Config(
    vision_config=vision,
    qformer_config=qformer,
    text_config=llm_hf_config,
    num_query_tokens=cfg.num_query_tokens,
    image_text_hidden_size=cfg.get("embed_dim", 256),
    image_token_index=image_token_index,
  )
  out = config.to_dict()
  out["architectures"] = ["Blip2ForImageTextRetrieval" if kind == llms.RETRIEVAL else "Blip2ForConditionalGeneration"]
  return out


def blip2_weight_map(cfg, kind: str) -> list:
  """Every parameter of a from_pretrained model (except `temp` of retrieval models) in HF BLIP-2 naming (InstructBLIP
  naming for a question-conditioned model, `qformer_text_input`)."""
  instruct = kind != llms.RETRIEVAL and cfg.get("qformer_text_input", False)
  out = weights.vision_weight_map()
  out += weights.qformer_weight_map(cfg, text=kind == llms.RETRIEVAL, instructblip=instruct)
  if kind != llms.RETRIEVAL:
    out += weights.dense_entries("language_projection", "language_projection")
    out += llm_weight_map(cfg.llm)
  return out


def llm_weight_map(llm_cfg, prefix: str = "language_model.") -> list:
  """The frozen LLM's rows, our paths under language_model/, HF names after `prefix` (BLIP-2's, or '' for the
  LLM's own directory)."""
  return [(f"language_model/{p}", f"{prefix}{n}", k) for p, n, k in llms.family(llm_cfg.kind).weight_map(llm_cfg)]


def with_image_token_row(tensors, kind: str):
  """(name, array) pairs with one more zero row in the LLM's vocabulary tables: HF's <image> placeholder token."""
  tables = {"language_model." + n for n in llms.family(kind).vocab_tables}
  for name, array in tensors:
    if name in tables:
      array = np.concatenate([array, np.zeros_like(array[:1])])
    yield name, array


def llm_hf_config(config) -> dict:
  """The frozen LLM's HF config dict of a stage-2 training config (for export)."""
  path = config.init.llm_weights
  if path:
    hf = json.loads((Path(path) / "config.json").read_text())
    return hf["text_config"] if hf.get("model_type") in ("blip-2", "instructblip") else hf
  hf = {
    k: v
    for k, v in config.model.llm.to_dict().items()
    if k not in ("kind", "dtype", "remat_policy", "lora", "attention")
  }
  return dict(hf, model_type=config.model.llm.kind)


def write_safetensors(out: Path, tensors, max_shard_bytes: int):
  """(name, array) pairs -> model.safetensors, or model-0000i-of-0000n.safetensors + index past the limit.
  bf16 goes through safetensors' flax writer (its numpy writer has no bf16)."""
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
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
  )
