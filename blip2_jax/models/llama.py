"""A frozen LLaMA-family decoder for BLIP-2 stage 2 (HF `LlamaForCausalLM`: LLaMA 2 / 3, Vicuna; and
`Qwen2ForCausalLM`), as InstructBLIP puts Vicuna behind the Q-Former.

Pre-RMSNorm decoder blocks: x + o_proj(attn(RMSNorm(x))), then x + down_proj(silu(gate_proj(h)) * up_proj(h))
with h = RMSNorm(x); rotary position embeddings (RoPE) on q and k, grouped-query attention (num_key_value_heads
<= num_attention_heads: query head i reads key/value head i // (heads / kv_heads), HF's `repeat_kv`), a final
RMSNorm and an lm_head that is its own matrix or the token embeddings (`tie_word_embeddings`). The families differ
in their attention biases only: Qwen2 always has q/k/v biases and no o_proj bias; LLaMA has all four or none
(`attention_bias`). The LLM is frozen and has no dropout; its projections may carry trainable LoRA adapters
(models/lora.py, `cfg.lora`), whose dropout runs when not `deterministic`. BLIP-2 prepends its projected query
outputs to the token embeddings, so the model runs from embeddings: `embed(ids)`, concatenate, then `__call__`
(HF's `inputs_embeds` path).

Positions count the real tokens only, cumsum(mask) - 1, as transformers' `generate` computes them from the
attention mask; RoPE makes attention depend on position differences only, so this equals HF's own default
(0 .. T-1 whatever the mask) wherever the padding sits before or after all real tokens of a row.

Decoding uses a KV cache {"k", "v"} of [B, layers, S_max, kv_heads, head_dim] (keys after RoPE), batch first so
that beam search reorders a whole decoding state with one gather on axis 0. The caller owns the cache's key mask
[B, S_max] and the positions; new keys/values are written at the traced `cache_index`, so one compiled step
serves every step.
"""

import copy
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers

from blip2_jax import profiling
from blip2_jax.models import layers
from blip2_jax.models import lora

MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

REMAT_POLICIES = layers.REMAT_POLICIES

# The projections LoRA can adapt (cfg.lora.targets), by their HF / PEFT module names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_config(hf):
  """A transformers config object of a LLaMA-family config or dict (HF's defaults filled in, old `rope_theta` /
  `rope_scaling` fields folded into `rope_parameters` as transformers >= 5 reads them)."""
  model_type = hf.get("model_type", "llama") if isinstance(hf, dict) else hf.model_type
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f"llama.config_from_hf expects a {' or '.join(MODEL_TYPES)} config; got model_type={model_type!r}."
    )
  if isinstance(hf, dict):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    # A deep copy: transformers fills the nested rope dicts in place.
    hf = cls.from_dict(copy.deepcopy({k: v for k, v in hf.items() if k != "model_type"}))
  return hf


def config_from_hf(hf, *, dtype: str = "float32", remat_policy: str = "none") -> ml_collections.ConfigDict:
  """Our config from a transformers LlamaConfig / Qwen2Config or its dict (a config.json, or BLIP-2's
  text_config).

  Fields keep HF's names and meaning (`rope_parameters` in transformers 5's form: rope_type, rope_theta and the
  llama3 scaling fields); `dtype` is the compute dtype, `remat_policy` one of "none", "full", "dots",
  "dots_no_batch". A dict gets HF's defaults for the fields it leaves out, as from_pretrained would give it.
  """
  hf = _hf_config(hf)
  name = f"{hf.model_type} config"
  rope = dict(hf.rope_parameters or {})
  rope_type = rope.get("rope_type", "default")
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{name} rope_type={rope_type!r} is not supported; use one of {list(ROPE_TYPES)}.")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{name} partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0).")
  if rope_type == "llama3" and any(k not in rope for k in LLAMA3_ROPE_KEYS):
    raise ValueError(f"{name} rope_type='llama3' needs {', '.join(LLAMA3_ROPE_KEYS)} in rope_parameters.")
  if hf.hidden_act != "silu":
    raise ValueError(f"{name} hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
  if getattr(hf, "mlp_bias", False):
    raise ValueError(f"{name} mlp_bias=True is not supported.")
  if any(t != "full_attention" for t in getattr(hf, "layer_types", None) or ()):
    raise ValueError(f"{name} use_sliding_window=True (sliding-window layers) is not supported.")
  heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
  if heads % kv_heads:
    raise ValueError(f"{name} num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}.")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
  if head_dim % 2:
    raise ValueError(f"{name} head_dim={head_dim} is odd; RoPE rotates pairs of dimensions.")
  layers.check_remat_policy(remat_policy, "remat_policy")
  cfg = dict(
    model_type=hf.model_type,
    vocab_size=hf.vocab_size,
    hidden_size=hf.hidden_size,
    intermediate_size=hf.intermediate_size,
    num_hidden_layers=hf.num_hidden_layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=head_dim,
    max_position_embeddings=hf.max_position_embeddings,
    rms_norm_eps=hf.rms_norm_eps,
    rope_parameters={k: rope[k] for k in ("rope_type", "rope_theta", *LLAMA3_ROPE_KEYS) if k in rope},
    hidden_act=hf.hidden_act,
    tie_word_embeddings=bool(hf.tie_word_embeddings),
    dtype=dtype,
    remat_policy=remat_policy,
  )
  if hf.model_type == "llama":
    cfg["attention_bias"] = bool(hf.attention_bias)
  return ml_collections.ConfigDict(cfg)


def attention_biases(cfg) -> tuple[bool, bool]:
  """(q/k/v projections biased, o_proj biased): Qwen2 (True, False); LLaMA both `attention_bias`."""
  if cfg.model_type == "qwen2":
    return True, False
  return cfg.attention_bias, cfg.attention_bias


def rope_frequencies(cfg) -> np.ndarray:
  """RoPE's inverse frequencies [head_dim / 2], float32, as transformers computes them (modeling_rope_utils: the
  default, and `llama3`'s: wavelengths above original_max_position_embeddings / low_freq_factor slowed by
  `factor`, those below original / high_freq_factor kept, the band between interpolated)."""
  rope, dim = cfg.rope_parameters, cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.float32(rope["rope_theta"]) ** exponents).astype(np.float32)
  if rope.get("rope_type", "default") == "default":
    return inv_freq
  factor, low, high = (np.float32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
  old_len = np.float32(rope["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg, positions):
  """(cos, sin) [B, T, head_dim] float32 of positions [B, T]: each frequency twice (HF's cat(freqs, freqs))."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(cfg))
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, rope):
  """RoPE on x [B, T, H, Dh] in float32: x * cos + rotate_half(x) * sin, HF's pairing of dimension i with
  i + Dh/2. Returns x's dtype."""
  cos, sin = (a[:, :, None, :] for a in rope)
  y = x.astype(jnp.float32)
  half = y.shape[-1] // 2
  rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
  return (y * cos + rotated * sin).astype(x.dtype)


def init_cache(cfg, batch: int, max_len: int, dtype) -> dict:
  """An empty KV cache for `max_len` positions: {"k", "v"}, each [batch, layers, max_len, kv_heads, head_dim]."""
  shape = (batch, cfg.num_hidden_layers, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _attention_mask(key_mask, num_queries: int, first):
  """[B, 1, 1, T, S]: query t, which sits at slot first + t, may attend to slot j iff j <= first + t and
  key_mask[:, j] (1 = valid) says so. (Axes 1, 2: key/value heads and the query heads of each.)"""
  slots = jnp.arange(key_mask.shape[1])
  causal = slots[None, :] <= first + jnp.arange(num_queries)[:, None]
  return causal[None, None, None] & key_mask.astype(bool)[:, None, None, None, :]


def grouped_attention(q, k, v, mask):
  """Grouped-query attention without copying k and v per query head. q [B, T, H, Dh]; k, v [B, S, G, Dh] with
  H a multiple of G (query head i reads group i // (H / G)); mask bool [B, 1, 1, T, S]. Softmax in float32;
  returns [B, T, H, Dh] in q's dtype."""
  b, t, h, dh = q.shape
  g = k.shape[2]
  with jax.named_scope(profiling.ATTENTION_SCOPE):
    q = q.reshape(b, t, g, h // g, dh)
    logits = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32) * dh**-0.5
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, dh)


class Attention(nn.Module):
  """Self-attention with RoPE and grouped-query heads; with a cache, this layer's new (rotated) keys/values are
  written at `cache_index` first."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, rope, mask, cache_index, cache, deterministic=True):
    cfg = self.cfg
    b, t, d = x.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv_bias, o_bias = attention_biases(cfg)
    proj = lambda features, axes, bias, name: lora.dense(
      features, axes, cfg, name, use_bias=bias, dtype=cfg.dtype, name=name
    )
    q = proj(heads * hd, ("embed", "heads"), qkv_bias, "q_proj")(x, deterministic).reshape(b, t, heads, hd)
    k = proj(kv_heads * hd, ("embed", "heads"), qkv_bias, "k_proj")(x, deterministic).reshape(b, t, kv_heads, hd)
    v = proj(kv_heads * hd, ("embed", "heads"), qkv_bias, "v_proj")(x, deterministic).reshape(b, t, kv_heads, hd)
    q, k = _rotate(q, rope), _rotate(k, rope)
    if cache is not None:
      at = (0, cache_index, 0, 0)
      k = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
      v = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
      cache = {"k": k, "v": v}
    # One new token (decoding) reads the cache here; more (training, prefill) go through model.llm.attention.
    impl = cfg.get("attention", "xla") if t > 1 else "xla"
    if impl == "xla":
      out = grouped_attention(q, k, v, mask)
    else:
      layers.check_attention(impl, q.dtype, "model.llm.attention")
      out = layers.attention(q, k, v, mask[:, :, 0], implementation=impl)
    out = out.reshape(b, t, heads * hd)
    return proj(d, ("heads", "embed"), o_bias, "o_proj")(out, deterministic), cache


class DecoderLayer(nn.Module):
  """Pre-RMSNorm block: x + attn(norm(x)), then x + down(silu(gate(norm(x))) * up(norm(x))). `deterministic`
  (positional: static under remat) switches the LoRA adapters' dropout off."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, rope, mask, cache_index, cache, deterministic=True):
    cfg = self.cfg
    proj = lambda features, axes, name: lora.dense(
      features, axes, cfg, name, use_bias=False, dtype=cfg.dtype, name=name
    )
    h = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x).astype(cfg.dtype)
    h, cache = Attention(cfg, name="self_attn")(h, rope, mask, cache_index, cache, deterministic)
    x = x + h
    h = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x).astype(cfg.dtype)
    gate = proj(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(h, deterministic)
    up = proj(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(h, deterministic)
    h = proj(x.shape[-1], ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up, deterministic)
    return x + h, cache


class _LMHead(nn.Module):
  """An untied lm_head: kernel [D, vocab], float32 logits (accumulated in float32 whatever the compute dtype)."""

  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel", layers.logical(layers.default_init, ("embed", "vocab")), (x.shape[-1], self.features), jnp.float32
    )
    return jnp.einsum("btd,dv->btv", x, kernel.astype(self.dtype), preferred_element_type=jnp.float32)


class LlamaForCausalLM(nn.Module):
  """A LLaMA-family decoder from embeddings to float32 logits. cfg: see `config_from_hf`.

  Parameter names follow HF's (`weight_map` pairs them); the decoder layers are stacked by nn.scan on a leading
  "layers" axis, their LoRA adapters (if any) too.
  """

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    lora.check(cfg, LORA_TARGETS, cfg.model_type)
    self.embed_tokens = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      embedding_init=layers.logical(layers.default_init, ("vocab", "embed")),
    )
    block = layers.remat(DecoderLayer, cfg.remat_policy, static_argnums=(6,))  # (self, ..., deterministic)
    # The cache is scanned along its layer axis (1), keeping the batch first outside; each layer draws its own
    # LoRA dropout.
    self.layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 1, nn.broadcast),
      out_axes=1,
      length=cfg.num_hidden_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
    self.norm = layers.RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = _LMHead(cfg.vocab_size, cfg.dtype)

  def embed(self, ids):
    """Token embeddings [B, T, D]."""
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

    logits_range (start, stop): the logits of those positions only, [B, stop - start, vocab].

    Without a cache: attention_mask [B, T] (1 = real token; padding on either side), causal attention over the
    real tokens, positions (if not given) counted over the real tokens (module docstring).
    With a cache: attention_mask [B, S_max] marks the valid cache slots, the tokens go to slots cache_index ..
    cache_index + T - 1 (cache_index: int32 scalar, may be traced) and `positions` [B, T] must be given.
    deterministic: False runs the LoRA adapters' dropout (the "dropout" rng); nothing else is random.
    """
    b, t, _ = embeds.shape
    name = self.cfg.model_type
    if cache is None:
      if attention_mask.shape != (b, t):
        raise ValueError(
          f"{name} attention_mask has shape {attention_mask.shape}; without a cache it must be [batch, tokens] = "
          f"{(b, t)}."
        )
      if positions is None:
        real = attention_mask.astype(jnp.int32)
        positions = jnp.cumsum(real, axis=1) * real - 1  # padding gets -1: its outputs are never read
      cache_index = 0
    elif positions is None or cache_index is None:
      raise ValueError(f"{name} decoding with a cache needs both `positions` [B, T] and `cache_index`.")
    elif attention_mask.shape != cache["k"].shape[:1] + cache["k"].shape[2:3]:
      raise ValueError(
        f"{name} attention_mask has shape {attention_mask.shape}; with a cache it must be "
        f"[batch, cache slots] = {cache['k'].shape[:1] + cache['k'].shape[2:3]}."
      )
    if self.is_initializing() and not self.cfg.tie_word_embeddings:
      self.embed(jnp.zeros((1, 1), jnp.int32))  # an untied head never reads the table: create it here
    mask = _attention_mask(attention_mask, t, cache_index)
    rope = rope_tables(self.cfg, positions)
    x, cache = self.layers(embeds.astype(self.cfg.dtype), rope, mask, cache_index, cache, deterministic)
    if logits_range is not None:
      x = x[:, logits_range[0] : logits_range[1]]
    return self.head(x), cache

  def head(self, x):
    """The last layer's output [B, T, D] -> float32 logits [B, T, vocab]: final RMSNorm, then the lm_head (the
    token embeddings when tied)."""
    h = self.norm(x).astype(self.cfg.dtype)
    if not self.cfg.tie_word_embeddings:
      return self.lm_head(h)
    table = self.embed_tokens.embedding.astype(self.cfg.dtype)
    return jnp.einsum("btd,vd->btv", h, table, preferred_element_type=jnp.float32)


def decode_step(
  model: LlamaForCausalLM, params, layer_params: list, embeds, attention_mask, positions, caches: list, cache_index
):
  """`model(embeds, attention_mask, positions=..., cache=..., cache_index=...)` with the layers unrolled: the same
  function, faster for decoding one token at a time (each layer's cache its own loop-carried buffer, updated in
  place; see opt.decode_step). Returns (logits [B, T, vocab] float32, the updated caches)."""
  cfg = model.cfg
  x = embeds.astype(cfg.dtype)
  mask = _attention_mask(attention_mask, embeds.shape[1], cache_index)
  rope = rope_tables(cfg, positions)
  layer = DecoderLayer(cfg)
  new_caches = []
  for lp, cache in zip(layer_params, caches):
    x, cache = layer.apply({"params": lp}, x, rope, mask, cache_index, cache)
    new_caches.append(cache)
  return model.apply({"params": params}, x, method="head"), new_caches


def weight_map(cfg) -> list[tuple[str, str, str]]:
  """(our parameter path, HF `LlamaForCausalLM` / `Qwen2ForCausalLM` state_dict name, kind) for
  weights.tree_from_hf / hf_tensors.

  `lm_head.weight` has a row only when untied (tied checkpoints store the token embeddings alone). LoRA adapters
  have no row: export merges them first (lora.merged)."""
  out = [
    ("embed_tokens/embedding", "model.embed_tokens.weight", "copy"),
    ("norm/scale", "model.norm.weight", "copy"),
  ]
  if not cfg.tie_word_embeddings:
    out.append(("lm_head/kernel", "lm_head.weight", "linear"))
  qkv_bias, o_bias = attention_biases(cfg)
  for proj, bias in (("q_proj", qkv_bias), ("k_proj", qkv_bias), ("v_proj", qkv_bias), ("o_proj", o_bias)):
    out.append((f"layers/self_attn/{proj}/kernel", f"model.layers.{{i}}.self_attn.{proj}.weight", "linear"))
    if bias:
      out.append((f"layers/self_attn/{proj}/bias", f"model.layers.{{i}}.self_attn.{proj}.bias", "copy"))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    out.append((f"layers/{proj}/kernel", f"model.layers.{{i}}.mlp.{proj}.weight", "linear"))
  for norm in ("input_layernorm", "post_attention_layernorm"):
    out.append((f"layers/{norm}/scale", f"model.layers.{{i}}.{norm}.weight", "copy"))
  return out


# --- decoding adapter for blip2_jax.generation ---------------------------------------------------------------


class LlamaDecoder(layers.CausalLMDecoder):
  """LlamaForCausalLM decoding from a prefix of embeddings (queries + left-padded prompt): layers.CausalLMDecoder with
  this file's KV cache and unrolled layers."""

  init_cache = staticmethod(init_cache)
  decode_step = staticmethod(decode_step)
