"""The frozen OPT decoder of BLIP-2 stage 2 (HF `OPTForCausalLM`; BLIP-2 uses OPT-2.7B and OPT-6.7B).

Pre-LayerNorm decoder blocks, learned absolute positions (with fairseq's offset of 2 rows), a final LayerNorm and
an lm_head tied to the token embeddings. The LLM is frozen and has no dropout and no layerdrop; its projections
may carry trainable LoRA adapters (models/lora.py, `cfg.lora`), whose dropout runs when not `deterministic`.
BLIP-2 prepends its projected query outputs to the token embeddings, so the model runs from embeddings:
`embed(ids)`, concatenate, then `__call__` (HF's `inputs_embeds` path).

Decoding uses a KV cache {"k", "v"} of [B, layers, S_max, heads, head_dim], batch first so that beam search
reorders a whole decoding state with one gather on axis 0. The caller owns the cache's key mask [B, S_max] and
the positions; new keys/values are written at the traced `cache_index`, so one compiled step serves every step.
"""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import transformers

from blip2_jax.models import layers
from blip2_jax.models import lora

# OPT configs carry no epsilon: its LayerNorms use torch's default.
LAYER_NORM_EPS = 1e-5
# fairseq reserved the first two rows of the position table (for padding_idx=1); HF keeps them in the checkpoint
# and looks up position p in row p + 2.
POSITION_OFFSET = 2

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": layers.gelu}  # HF's "gelu" is the exact (erf) GELU

REMAT_POLICIES = layers.REMAT_POLICIES

# The projections LoRA can adapt (cfg.lora.targets), by their HF / PEFT module names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def config_from_hf(hf, *, dtype: str = "float32", remat_policy: str = "none") -> ml_collections.ConfigDict:
  """Our config from a transformers OPTConfig or its dict (a config.json, or BLIP-2's text_config).

  Fields keep HF's names and meaning; `dtype` is the compute dtype, `remat_policy` one of "none", "full", "dots",
  "dots_no_batch". A dict gets HF's defaults for the fields it leaves out, as from_pretrained would give it.
  """
  model_type = hf.get("model_type", "opt") if isinstance(hf, dict) else hf.model_type
  if model_type != "opt":
    raise ValueError(f"config_from_hf expects an OPT config; got model_type={model_type!r}.")
  if isinstance(hf, dict):
    hf = transformers.OPTConfig.from_dict(hf)
  if hf.word_embed_proj_dim != hf.hidden_size:
    raise ValueError(
      f"OPT config word_embed_proj_dim={hf.word_embed_proj_dim} differs from hidden_size="
      f"{hf.hidden_size}: project_in/project_out (as in OPT-350m) are not supported."
    )
  if not hf.do_layer_norm_before:
    raise ValueError("OPT config do_layer_norm_before=False (post-LayerNorm blocks, as in OPT-350m) is not supported.")
  if getattr(hf, "_remove_final_layer_norm", False):
    raise ValueError("OPT config _remove_final_layer_norm=True (pre-v4.20 fine-tunes) is not supported.")
  if not hf.layer_norm_elementwise_affine:
    raise ValueError("OPT config layer_norm_elementwise_affine=False is not supported.")
  if not hf.tie_word_embeddings:
    raise ValueError("OPT config tie_word_embeddings=False is not supported: the lm_head must be the token embeddings.")
  if hf.activation_function not in ACTIVATIONS:
    raise ValueError(
      f"OPT config activation_function={hf.activation_function!r} is not supported; use one of {sorted(ACTIVATIONS)}."
    )
  if hf.hidden_size % hf.num_attention_heads:
    raise ValueError(
      f"OPT config hidden_size={hf.hidden_size} is not divisible by num_attention_heads={hf.num_attention_heads}."
    )
  layers.check_remat_policy(remat_policy, "remat_policy")
  return ml_collections.ConfigDict(
    dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=hf.num_attention_heads,
      ffn_dim=hf.ffn_dim,
      max_position_embeddings=hf.max_position_embeddings,
      activation_function=hf.activation_function,
      enable_bias=hf.enable_bias,
      dtype=dtype,
      remat_policy=remat_policy,
    )
  )


def init_cache(cfg, batch: int, max_len: int, dtype) -> dict:
  """An empty KV cache for `max_len` positions: {"k", "v"}, each [batch, layers, max_len, heads, head_dim]."""
  if max_len > cfg.max_position_embeddings:
    raise ValueError(
      f"A KV cache of {max_len} positions exceeds OPT's max_position_embeddings={cfg.max_position_embeddings}."
    )
  heads = cfg.num_attention_heads
  shape = (batch, cfg.num_hidden_layers, max_len, heads, cfg.hidden_size // heads)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _attention_mask(key_mask, num_queries: int, first):
  """[B, 1, T, S]: query t, which sits at slot first + t, may attend to slot j iff j <= first + t and
  key_mask[:, j] (1 = valid) says so."""
  slots = jnp.arange(key_mask.shape[1])
  causal = slots[None, :] <= first + jnp.arange(num_queries)[:, None]
  return causal[None, None] & key_mask.astype(bool)[:, None, None, :]


class Attention(nn.Module):
  """OPT self-attention; with a cache, this layer's new keys/values are written at `cache_index` first."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, mask, cache_index, cache, deterministic=True):
    cfg = self.cfg
    b, t, d = x.shape
    heads = cfg.num_attention_heads
    proj = lambda axes, name: lora.dense(d, axes, cfg, name, use_bias=cfg.enable_bias, dtype=cfg.dtype, name=name)
    split = lambda y: y.reshape(b, t, heads, d // heads)
    q = split(proj(("embed", "heads"), "q_proj")(x, deterministic))
    k = split(proj(("embed", "heads"), "k_proj")(x, deterministic))
    v = split(proj(("embed", "heads"), "v_proj")(x, deterministic))
    if cache is not None:
      at = (0, cache_index, 0, 0)
      k = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
      v = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
      cache = {"k": k, "v": v}
    # HF scales q by head_dim**-0.5 before the product; layers.attention scales the float32 logits instead: the
    # same function, one rounding fewer in low precision. One new token (decoding) reads the cache with XLA's
    # einsums; more (training, prefill) go through model.llm.attention.
    impl = cfg.get("attention", "xla") if t > 1 else "xla"
    layers.check_attention(impl, q.dtype, "model.llm.attention")
    out = layers.attention(q, k, v, mask, implementation=impl).reshape(b, t, d)
    return proj(("heads", "embed"), "out_proj")(out, deterministic), cache


class DecoderLayer(nn.Module):
  """Pre-LayerNorm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))). `deterministic` (positional: static
  under remat) switches the LoRA adapters' dropout off."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, mask, cache_index, cache, deterministic=True):
    cfg = self.cfg
    proj = lambda features, axes, name: lora.dense(
      features, axes, cfg, name, use_bias=cfg.enable_bias, dtype=cfg.dtype, name=name
    )
    h = layers.layer_norm(LAYER_NORM_EPS, name="self_attn_layer_norm")(x)
    h, cache = Attention(cfg, name="self_attn")(h, mask, cache_index, cache, deterministic)
    x = x + h
    h = layers.layer_norm(LAYER_NORM_EPS, name="final_layer_norm")(x)
    h = proj(cfg.ffn_dim, ("embed", "mlp"), "fc1")(h, deterministic)
    h = ACTIVATIONS[cfg.activation_function](h)
    h = proj(x.shape[-1], ("mlp", "embed"), "fc2")(h, deterministic)
    return x + h, cache


class OPTForCausalLM(nn.Module):
  """OPT from embeddings to float32 logits. cfg: see `config_from_hf`.

  Parameter names follow HF's (`weight_map` pairs them); the decoder layers are stacked by nn.scan on a leading
  "layers" axis, their LoRA adapters (if any) too.
  """

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    lora.check(cfg, LORA_TARGETS, "OPT")
    embed = lambda rows, axes: nn.Embed(
      rows,
      cfg.hidden_size,
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      embedding_init=layers.logical(layers.default_init, axes),
    )
    self.embed_tokens = embed(cfg.vocab_size, ("vocab", "embed"))
    self.embed_positions = embed(cfg.max_position_embeddings + POSITION_OFFSET, (None, "embed"))
    block = layers.remat(DecoderLayer, cfg.remat_policy, static_argnums=(5,))  # (self, ..., deterministic)
    # The cache is scanned along its layer axis (1), keeping the batch first outside; each layer draws its own
    # LoRA dropout.
    self.layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, 1, nn.broadcast),
      out_axes=1,
      length=cfg.num_hidden_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
    self.final_layer_norm = layers.layer_norm(LAYER_NORM_EPS)

  def embed(self, ids):
    """Token embeddings [B, T, D] alone (no positions: `__call__` adds them)."""
    return self.embed_tokens(ids)

  def __call__(
    self,
    embeds,
    attention_mask,
    *,
    positions=None,
    cache=None,
    cache_index=None,
    logits_range=None,
    deterministic=True,
  ):
    """embeds [B, T, D] -> (logits [B, T, vocab] float32, the updated cache or None).

    logits_range (start, stop): the logits of those positions only, [B, stop - start, vocab] (a loss that reads
    some positions need not pay the vocabulary projection of the others).

    Without a cache: attention_mask [B, T] (1 = real token; padding on either side), causal attention over the
    real tokens, positions (if not given) counted over the real tokens as HF does, so left padding shifts nothing.
    With a cache: attention_mask [B, S_max] marks the valid cache slots, the tokens go to slots cache_index ..
    cache_index + T - 1 (cache_index: int32 scalar, may be traced) and `positions` [B, T] must be given.
    deterministic: False runs the LoRA adapters' dropout (the "dropout" rng); nothing else is random.
    """
    cfg = self.cfg
    b, t, _ = embeds.shape
    if attention_mask.shape[1] > cfg.max_position_embeddings:
      raise ValueError(
        f"OPT attention_mask of length {attention_mask.shape[1]} exceeds max_position_embeddings="
        f"{cfg.max_position_embeddings}."
      )
    if cache is None:
      if attention_mask.shape != (b, t):
        raise ValueError(
          f"OPT attention_mask has shape {attention_mask.shape}; without a cache it must be [batch, tokens] = {(b, t)}."
        )
      if positions is None:
        real = attention_mask.astype(jnp.int32)
        positions = jnp.cumsum(real, axis=1) * real - 1  # HF's rule; padding gets -1 (row 1 of the table)
      cache_index = 0
    elif positions is None or cache_index is None:
      raise ValueError("OPT decoding with a cache needs both `positions` [B, T] and `cache_index`.")
    elif attention_mask.shape != cache["k"].shape[:1] + cache["k"].shape[2:3]:
      raise ValueError(
        f"OPT attention_mask has shape {attention_mask.shape}; with a cache it must be "
        f"[batch, cache slots] = {cache['k'].shape[:1] + cache['k'].shape[2:3]}."
      )
    mask = _attention_mask(attention_mask, t, cache_index)
    x, cache = self.layers(self.inputs(embeds, positions), mask, cache_index, cache, deterministic)
    if logits_range is not None:
      x = x[:, logits_range[0] : logits_range[1]]
    return self.head(x), cache

  def inputs(self, embeds, positions):
    """The first layer's input: embeddings [B, T, D] plus the positions' [B, T] rows, in the compute dtype."""
    return embeds.astype(self.cfg.dtype) + self.embed_positions(positions + POSITION_OFFSET)

  def head(self, x):
    """The last layer's output [B, T, D] -> float32 logits [B, T, vocab]: final LayerNorm, the tied lm_head."""
    h = self.final_layer_norm(x).astype(self.cfg.dtype)
    table = self.embed_tokens.embedding.astype(self.cfg.dtype)
    return jnp.einsum("btd,vd->btv", h, table, preferred_element_type=jnp.float32)


def decode_step(
  model: OPTForCausalLM, params, layer_params: list, embeds, attention_mask, positions, caches: list, cache_index
):
  """`model(embeds, attention_mask, positions=..., cache=..., cache_index=...)` with the layers unrolled: the same
  function, faster for decoding one token at a time.

  layer_params (`layers.split_layers(params)`) and caches (`layers.split_cache`) hold one tree per layer. In a
  decoding loop each layer's cache is then its own loop-carried buffer, updated in place at cache_index, and each
  layer reads its own weights; the scanned layers would instead slice the stacked weights and caches into copies
  and stack the caches again, every layer of every token (MaxText decodes with unscanned layers for the same
  reason).
  Returns (logits [B, T, vocab] float32, the updated caches).
  """
  x = model.apply({"params": params}, embeds, positions, method="inputs")
  mask = _attention_mask(attention_mask, embeds.shape[1], cache_index)
  layer = DecoderLayer(model.cfg)
  new_caches = []
  for lp, cache in zip(layer_params, caches):
    x, cache = layer.apply({"params": lp}, x, mask, cache_index, cache)
    new_caches.append(cache)
  return model.apply({"params": params}, x, method="head"), new_caches


def weight_map(cfg) -> list[tuple[str, str, str]]:
  """(our parameter path, HF `OPTForCausalLM.state_dict()` name, kind) for weights.tree_from_hf / hf_tensors.

  `lm_head.weight` is absent: it is tied to the token embeddings and HF stores only those. LoRA adapters have no
  row: export merges them first (lora.merged)."""
  out = [
    ("embed_tokens/embedding", "model.decoder.embed_tokens.weight", "copy"),
    ("embed_positions/embedding", "model.decoder.embed_positions.weight", "copy"),
    ("final_layer_norm/scale", "model.decoder.final_layer_norm.weight", "copy"),
    ("final_layer_norm/bias", "model.decoder.final_layer_norm.bias", "copy"),
  ]
  for ours in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "fc1", "fc2"):
    hf = "model.decoder.layers.{i}." + ours.replace("/", ".")
    out.append((f"layers/{ours}/kernel", f"{hf}.weight", "linear"))
    if cfg.enable_bias:
      out.append((f"layers/{ours}/bias", f"{hf}.bias", "copy"))
  for norm in ("self_attn_layer_norm", "final_layer_norm"):
    hf = "model.decoder.layers.{i}." + norm
    out += [(f"layers/{norm}/scale", f"{hf}.weight", "copy"), (f"layers/{norm}/bias", f"{hf}.bias", "copy")]
  return out


# --- decoding adapter for blip2_jax.generation ---------------------------------------------------------------


class OPTDecoder(layers.CausalLMDecoder):
  """OPTForCausalLM decoding from a prefix of embeddings (queries + left-padded prompt): layers.CausalLMDecoder with
  this file's KV cache and unrolled layers."""

  init_cache = staticmethod(init_cache)
  decode_step = staticmethod(decode_step)
