"""The frozen T5 / Flan-T5 encoder-decoder of BLIP-2 stage 2 (HF `T5ForConditionalGeneration`; BLIP-2 uses
Flan-T5-XL and -XXL).

Pre-norm blocks with T5's RMS LayerNorm (a scale, no bias, no mean subtraction), attention logits without the
1/sqrt(head_dim) scaling (T5 folds it into the initialisation of q), and a learned relative position bias: one
table per stack, held by block 0 in HF and shared by every layer, so it lives outside the scanned layers here.
The FFN is relu (wi -> wo) or gated (act(wi_0 x) * wi_1 x -> wo). The LLM is frozen and has no dropout; its
projections (named as HF names them: q, k, v, o, wi / wi_0, wi_1, wo) may carry trainable LoRA adapters
(models/lora.py, `cfg.lora`), whose dropout runs when not `deterministic`.

BLIP-2 puts its projected query outputs in front of the embedded prefix text and runs the encoder from
embeddings: `embed(ids)`, concatenate, then `encode` (HF's `inputs_embeds` path); the decoder predicts the suffix.

Decoding: `init_cache` projects the encoder output to every layer's cross-attention keys/values once, so a step
costs no encoder-length projection; the cache is {"self_k", "self_v": [B, layers, S_max, heads, d_kv],
"cross_k", "cross_v": [B, layers, S_enc, heads, d_kv], "encoder_mask": [B, S_enc]}, batch first, so beam search
reorders a whole decoding state with one gather on axis 0. New self-attention keys/values go in at the traced
`cache_index`, so one compiled step serves every step.
"""

from collections.abc import Mapping
import math
from typing import Any

from flax import struct
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

# HF's ACT2FN names: "gelu" is the exact (erf) GELU, which BLIP-2 forces on Flan-T5; "gelu_new" the tanh
# approximation that Flan-T5's own config names.
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": layers.gelu, "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}

REMAT_POLICIES = layers.REMAT_POLICIES

_CACHE_KEYS = ("self_k", "self_v", "cross_k", "cross_v")


def lora_targets(cfg) -> tuple[str, ...]:
  """The projections LoRA can adapt (cfg.lora.targets), by their HF / PEFT module names."""
  return ("q", "k", "v", "o", *(("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)), "wo")


def config_from_hf(
  hf, *, dtype: str = "float32", remat_policy: str = "none", has_lm_head: bool | None = None
) -> ml_collections.ConfigDict:
  """Our config from a transformers T5Config or its dict (a config.json, or BLIP-2's text_config).

  Fields keep HF's names and meaning. Two flags say what transformers' one `tie_word_embeddings` used to say
  (transformers >= 5 forces that to True and keeps the rest in `scale_decoder_outputs`):
  - `tie_word_embeddings`: the lm_head is the shared table (no separate `lm_head.weight`);
  - `scale_decoder_outputs`: the decoder output is scaled by d_model**-0.5 before the head (T5 1.0).
  A released config.json (transformers < 5) says tie_word_embeddings=False for T5 1.1 / Flan-T5: a separate,
  unscaled head; True for T5 1.0: tied and scaled. A transformers >= 5 config gives both. `has_lm_head` (whether
  the checkpoint stores `lm_head.weight`; transformers >= 5 uses a stored head that differs from the table)
  overrides the tying when given. `decoder_start_token_id` defaults to the pad id, as T5 does.
  """
  model_type = hf.get("model_type", "t5") if isinstance(hf, Mapping) else hf.model_type
  if model_type != "t5":
    raise ValueError(f"config_from_hf expects a T5 config; got model_type={model_type!r}.")
  if isinstance(hf, Mapping):
    # What the file says, before T5Config (>= 5) forces tie_word_embeddings=True.
    tied = bool(hf.get("tie_word_embeddings", True))
    scale = bool(hf.get("scale_decoder_outputs", tied))
    hf = transformers.T5Config.from_dict(dict(hf))  # HF's defaults and its feed_forward_proj parsing
  else:
    scale = bool(getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings))
    tied = hf.tie_word_embeddings if hasattr(hf, "scale_decoder_outputs") else scale
  if has_lm_head is not None:
    tied = not has_lm_head
  start = getattr(hf, "decoder_start_token_id", None)
  cfg = ml_collections.ConfigDict(
    dict(
      vocab_size=hf.vocab_size,
      d_model=hf.d_model,
      d_kv=hf.d_kv,
      d_ff=hf.d_ff,
      num_layers=hf.num_layers,
      num_decoder_layers=hf.num_decoder_layers,
      num_heads=hf.num_heads,
      relative_attention_num_buckets=hf.relative_attention_num_buckets,
      relative_attention_max_distance=hf.relative_attention_max_distance,
      layer_norm_epsilon=hf.layer_norm_epsilon,
      is_gated_act=hf.is_gated_act,
      dense_act_fn=hf.dense_act_fn,
      tie_word_embeddings=tied,
      scale_decoder_outputs=scale,
      pad_token_id=hf.pad_token_id,
      eos_token_id=hf.eos_token_id,
      decoder_start_token_id=hf.pad_token_id if start is None else start,
      dtype=dtype,
      remat_policy=remat_policy,
    )
  )
  check_config(cfg)
  return cfg


def check_config(cfg):
  """Raises ValueError for a config this module cannot run (also called by the model, for hand-made configs)."""
  if cfg.dense_act_fn not in ACTIVATIONS:
    raise ValueError(f"T5 config dense_act_fn={cfg.dense_act_fn!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
  layers.check_remat_policy(cfg.remat_policy, "remat_policy")
  if cfg.dtype not in ("float32", "bfloat16"):
    # T5's activations outgrow float16's range (HF clamps infinities; Flan-T5 was trained in bfloat16).
    raise ValueError(f"T5 dtype={cfg.dtype!r} is not supported; use 'float32' or 'bfloat16'.")
  if cfg.relative_attention_max_distance <= cfg.relative_attention_num_buckets // 2:
    raise ValueError(
      f"T5 config relative_attention_max_distance={cfg.relative_attention_max_distance} must exceed "
      f"half of relative_attention_num_buckets={cfg.relative_attention_num_buckets}."
    )


# --- relative position buckets -------------------------------------------------------------------------------


def _bucket_of_distance(num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of each distance 0..max_distance: the first num_buckets // 2 distances get a bucket each, then
  log-spaced buckets up to max_distance, beyond which all distances share the last bucket.

  Computed on the host, in float32 as HF and Mesh TensorFlow do, so distances that fall exactly on a bucket
  boundary land where the checkpoint was trained to expect them."""
  exact = num_buckets // 2
  distance = np.arange(max_distance + 1)
  ratio = np.log(np.maximum(distance, exact).astype(np.float32) / np.float32(exact)) / np.float32(
    math.log(max_distance / exact)
  )
  log_bucket = np.minimum(exact + (ratio * np.float32(num_buckets - exact)).astype(np.int32), num_buckets - 1)
  return np.where(distance < exact, distance, log_bucket).astype(np.int32)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucket (int32) of each relative position key - query; causal stacks fold all future keys into bucket 0,
  bidirectional ones give keys after the query the upper half of the buckets."""
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(relative_position > 0, num_buckets, 0)
    distance = jnp.abs(relative_position)
  else:
    offset = 0
    distance = jnp.maximum(-relative_position, 0)
  table = jnp.asarray(_bucket_of_distance(num_buckets, max_distance))
  return offset + table[jnp.minimum(distance, max_distance)]


# --- building blocks -----------------------------------------------------------------------------------------


class Attention(nn.Module):
  """T5 attention (no bias terms). Keys/values are projected separately (`project_kv`) so the decoder can cache
  them: its own per step, the encoder's once per sequence. `deterministic`: see lora.Dense."""

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    inner = cfg.num_heads * cfg.d_kv
    proj = lambda features, axes, target: lora.dense(features, axes, cfg, target, use_bias=False, dtype=cfg.dtype)
    self.q = proj(inner, ("embed", "heads"), "q")
    self.k = proj(inner, ("embed", "heads"), "k")
    self.v = proj(inner, ("embed", "heads"), "v")
    self.o = proj(cfg.d_model, ("heads", "embed"), "o")

  def _split(self, y):
    return y.reshape(*y.shape[:2], self.cfg.num_heads, self.cfg.d_kv)

  def project_kv(self, x, deterministic=True):
    """x [B, S, D] -> keys, values [B, S, heads, d_kv]."""
    return self._split(self.k(x, deterministic)), self._split(self.v(x, deterministic))

  def __call__(self, x, k, v, bias, mask, deterministic=True):
    """x [B, T, D] attends to k, v [B, S, heads, d_kv]; bias float32 broadcastable to [B, heads, T, S] (or None);
    mask bool broadcastable to [B, heads, T, S], True = may attend."""
    q = self._split(self.q(x, deterministic))
    with jax.named_scope(profiling.ATTENTION_SCOPE):
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # no 1/sqrt(d_kv)
      if bias is not None:
        logits = logits + bias
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return self.o(out.reshape(*x.shape[:2], -1), deterministic)


class FeedForward(nn.Module):
  """relu: wo(act(wi x)); gated: wo(act(wi_0 x) * wi_1 x). HF keeps `wo` in float32 against float16 overflow;
  bfloat16's range makes that unnecessary, so it runs in cfg.dtype like the rest."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, deterministic=True):
    cfg = self.cfg
    act = ACTIVATIONS[cfg.dense_act_fn]
    proj = lambda features, axes, name: lora.dense(
      features, axes, cfg, name, use_bias=False, dtype=cfg.dtype, name=name
    )
    up = lambda name: proj(cfg.d_ff, ("embed", "mlp"), name)(x, deterministic)
    h = act(up("wi_0")) * up("wi_1") if cfg.is_gated_act else act(up("wi"))
    return proj(cfg.d_model, ("mlp", "embed"), "wo")(h, deterministic)


class EncoderBlock(nn.Module):
  """x + attn(norm(x)) with the shared position bias, then x + ffn(norm(x)). A scan body: returns (x, None).
  `deterministic` (positional: static under remat) switches the LoRA adapters' dropout off."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, bias, mask, deterministic=True):
    cfg = self.cfg
    h = layers.RMSNorm(cfg.layer_norm_epsilon, name="self_attention_norm")(x)
    attention = Attention(cfg, name="self_attention")
    x = x + attention(h, *attention.project_kv(h, deterministic), bias, mask, deterministic)
    x = x + FeedForward(cfg, name="ffn")(layers.RMSNorm(cfg.layer_norm_epsilon, name="ffn_norm")(x), deterministic)
    return x, None


class DecoderBlock(nn.Module):
  """Causal self-attention (with the shared position bias), cross-attention to the encoder (no position bias),
  FFN, each pre-normed with a residual. Both methods are scan bodies; `deterministic` (positional: static under
  remat) switches the LoRA adapters' dropout off."""

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    self.self_attention_norm = layers.RMSNorm(cfg.layer_norm_epsilon)
    self.self_attention = Attention(cfg)
    self.cross_attention_norm = layers.RMSNorm(cfg.layer_norm_epsilon)
    self.cross_attention = Attention(cfg)
    self.ffn_norm = layers.RMSNorm(cfg.layer_norm_epsilon)
    self.ffn = FeedForward(cfg)

  def cross_kv(self, carry, encoder_out, deterministic=True):
    """This layer's cross-attention keys and values of the encoder output."""
    return carry, self.cross_attention.project_kv(encoder_out, deterministic)

  def __call__(self, x, self_bias, self_mask, cross_mask, cache_index, state, deterministic=True):
    """state: this layer's "cross_k", "cross_v" and, when decoding with a cache, "self_k", "self_v" [B, S_max,
    heads, d_kv], into which the new keys/values are written at cache_index. Returns (x, the new self_k/self_v)."""
    h = self.self_attention_norm(x)
    k, v = self.self_attention.project_kv(h, deterministic)
    new = {}
    if "self_k" in state:
      at = (0, cache_index, 0, 0)
      k = new["self_k"] = lax.dynamic_update_slice(state["self_k"], k.astype(state["self_k"].dtype), at)
      v = new["self_v"] = lax.dynamic_update_slice(state["self_v"], v.astype(state["self_v"].dtype), at)
    x = x + self.self_attention(h, k, v, self_bias, self_mask, deterministic)
    h = self.cross_attention_norm(x)
    x = x + self.cross_attention(h, state["cross_k"], state["cross_v"], None, cross_mask, deterministic)
    return x + self.ffn(self.ffn_norm(x), deterministic), new


def _scanned(block, cfg, length: int, methods: dict, static_argnums: tuple[int, ...]):
  """The module class of `block` stacked `length` times by nn.scan on a leading "layers" parameter axis (LoRA
  adapters included; each layer draws its own LoRA dropout), its __call__ rematerialised per cfg.remat_policy
  with `static_argnums` static; `methods` gives each scanned method's in_axes/out_axes."""
  block = layers.remat(block, cfg.remat_policy, static_argnums)
  common = dict(
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return nn.scan(block, methods={name: {**common, **axes} for name, axes in methods.items()})


def _bias_table(cfg):
  return layers.logical(layers.default_init, (None, None)), (cfg.relative_attention_num_buckets, cfg.num_heads)


def _position_bias(table, buckets):
  """[1, heads, Q, K] float32 bias from the [buckets, heads] table (plain numpy parameters included)."""
  return jnp.transpose(jnp.asarray(table, jnp.float32)[buckets], (2, 0, 1))[None]


class Encoder(nn.Module):
  """embeds [B, S, D], mask [B, S] -> [B, S, D]: bidirectional, padding keys masked, final RMS norm."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, attention_mask, deterministic=True):
    cfg = self.cfg
    table = self.param("relative_attention_bias", *_bias_table(cfg), jnp.float32)
    positions = jnp.arange(x.shape[1])
    buckets = relative_position_bucket(
      positions[None, :] - positions[:, None],
      bidirectional=True,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
    )
    bias = _position_bias(table, buckets)
    mask = attention_mask.astype(bool)[:, None, None, :]
    # EncoderBlock.__call__(self, x, bias, mask, deterministic): deterministic is static under remat.
    methods = {"__call__": dict(in_axes=(nn.broadcast,) * 3)}
    stack = _scanned(EncoderBlock, cfg, cfg.num_layers, methods, static_argnums=(4,))(cfg, name="layers")
    x, _ = stack(x.astype(cfg.dtype), bias, mask, deterministic)
    return layers.RMSNorm(cfg.layer_norm_epsilon, name="final_norm")(x)


class Decoder(nn.Module):
  """Decoder blocks from token embeddings, with or without a cache (see `DecoderBlock`), then the final norm."""

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    self.relative_attention_bias = self.param("relative_attention_bias", *_bias_table(cfg), jnp.float32)
    # Biases, masks, cache_index and deterministic are shared by all layers; the keys/values in `state` and those
    # returned are batch first with the layer axis second. DecoderBlock.__call__'s deterministic is its argument
    # 7 (self 0), static under remat.
    self.layers = _scanned(
      DecoderBlock,
      cfg,
      cfg.num_decoder_layers,
      {
        "__call__": dict(in_axes=(nn.broadcast,) * 4 + (1, nn.broadcast), out_axes=1),
        "cross_kv": dict(in_axes=(nn.broadcast, nn.broadcast), out_axes=1),
      },
      static_argnums=(7,),
    )(cfg)
    self.final_norm = layers.RMSNorm(cfg.layer_norm_epsilon)

  def cross_kv(self, encoder_out, deterministic=True):
    """Every layer's cross-attention keys and values: two [B, layers, S_enc, heads, d_kv]."""
    _, (k, v) = self.layers.cross_kv(None, encoder_out.astype(self.cfg.dtype), deterministic)
    return k, v

  def __call__(self, x, key_mask, encoder_mask, first, state, deterministic=True):
    """x [B, T, D] at positions first .. first + T - 1 attend to self-attention slots j <= their position where
    key_mask [B, S_self] (or None) allows, and to encoder positions where encoder_mask [B, S_enc] allows."""
    cfg = self.cfg
    num_slots = state["self_k"].shape[2] if "self_k" in state else x.shape[1]
    bias, self_mask, cross_mask = _decoder_bias_and_masks(
      cfg, self.relative_attention_bias, first, x.shape[1], num_slots, key_mask, encoder_mask
    )
    x, new = self.layers(x.astype(cfg.dtype), bias, self_mask, cross_mask, first, state, deterministic)
    return self.final_norm(x), new


def _decoder_bias_and_masks(cfg, table, first, num_tokens: int, num_slots: int, key_mask, encoder_mask):
  """Decoder tokens at positions first .. first + num_tokens - 1 over num_slots self-attention slots: the
  self-attention position bias [1, heads, T, S] from `table`, the causal self mask (and key_mask [B, S], or None)
  and the cross mask of encoder_mask [B, S_enc]."""
  queries = first + jnp.arange(num_tokens)
  slots = jnp.arange(num_slots)
  buckets = relative_position_bucket(
    slots[None, :] - queries[:, None],
    bidirectional=False,
    num_buckets=cfg.relative_attention_num_buckets,
    max_distance=cfg.relative_attention_max_distance,
  )
  self_mask = (slots[None, :] <= queries[:, None])[None, None]
  if key_mask is not None:
    self_mask = self_mask & key_mask.astype(bool)[:, None, None, :]
  return _position_bias(table, buckets), self_mask, encoder_mask.astype(bool)[:, None, None, :]


# --- the model -----------------------------------------------------------------------------------------------


def _check_mask(name: str, mask, expected):
  if mask is not None and tuple(mask.shape) != tuple(expected):
    raise ValueError(f"T5 {name} has shape {tuple(mask.shape)}; it must be {tuple(expected)}.")


class T5ForConditionalGeneration(nn.Module):
  """T5 from encoder embeddings and decoder ids to float32 logits. cfg: see `config_from_hf`.

  Parameters are float32 and every one carries logical axis names; the blocks of each stack are stacked by
  nn.scan on a leading "layers" axis, and `weight_map` pairs them with HF's names. `deterministic=False` runs the
  LoRA adapters' dropout (the "dropout" rng); nothing else is random.
  """

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    check_config(cfg)
    lora.check(cfg, lora_targets(cfg), "T5")
    self.shared = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      embedding_init=layers.logical(layers.default_init, ("vocab", "embed")),
    )
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
        "lm_head", layers.logical(layers.default_init, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size), jnp.float32
      )

  def embed(self, ids):
    """Token embeddings [B, T, D] of the shared table (T5 adds no positions to them)."""
    return self.shared(ids)

  def encode(self, embeds, attention_mask, *, deterministic=True):
    """embeds [B, S, D], attention_mask [B, S] (1 = real; padding on either side) -> encoder output [B, S, D]."""
    _check_mask("attention_mask", attention_mask, embeds.shape[:2])
    return self.encoder(embeds, attention_mask, deterministic)

  def init_cache(self, encoder_out, encoder_mask, max_len: int) -> dict:
    """The decoding state for up to `max_len` (a Python int) decoder tokens: empty self-attention slots, the
    cross-attention keys/values of `encoder_out` and its mask (see the module docstring for the layout)."""
    cfg = self.cfg
    _check_mask("encoder_mask", encoder_mask, encoder_out.shape[:2])
    cross_k, cross_v = self.decoder.cross_kv(encoder_out)
    shape = (encoder_out.shape[0], cfg.num_decoder_layers, max_len, cfg.num_heads, cfg.d_kv)
    return {
      "self_k": jnp.zeros(shape, cfg.dtype),
      "self_v": jnp.zeros(shape, cfg.dtype),
      "cross_k": cross_k,
      "cross_v": cross_v,
      "encoder_mask": encoder_mask.astype(bool),
    }

  def decode(
    self,
    decoder_ids,
    encoder_out,
    encoder_mask,
    *,
    decoder_mask=None,
    cache=None,
    cache_index=None,
    deterministic=True,
  ):
    """decoder_ids [B, T] -> (logits [B, T, vocab] float32, the updated cache or None).

    Without a cache: causal self-attention over the T tokens, decoder_mask [B, T] (or None) masks padding keys,
    cross-attention to encoder_out [B, S, D] where encoder_mask [B, S] is 1.
    With a cache (from `init_cache`), which holds what the encoder gave, encoder_out and encoder_mask must be
    None; the tokens take slots cache_index .. cache_index + T - 1 (an int32 scalar, may be traced; the caller
    keeps it within the cache) and decoder_mask [B, S_max] (or None) marks the valid slots.
    """
    if cache is None:
      _check_mask("encoder_mask", encoder_mask, encoder_out.shape[:2])
      _check_mask("decoder_mask", decoder_mask, decoder_ids.shape)
      cross_k, cross_v = self.decoder.cross_kv(encoder_out, deterministic)
      state, first = {"cross_k": cross_k, "cross_v": cross_v}, 0
    else:
      if encoder_out is not None or encoder_mask is not None or cache_index is None:
        raise ValueError(
          "T5 decoding with a cache takes encoder_out=None and encoder_mask=None (the cache holds "
          "what the encoder gave) and needs a cache_index."
        )
      _check_mask("decoder_mask", decoder_mask, cache["self_k"].shape[:1] + cache["self_k"].shape[2:3])
      state, first, encoder_mask = {k: cache[k] for k in _CACHE_KEYS}, cache_index, cache["encoder_mask"]
    h, new = self.decoder(self.embed(decoder_ids), decoder_mask, encoder_mask, first, state, deterministic)
    return self.head(h), (None if cache is None else {**cache, **new})

  def head(self, h):
    """The decoder's normed output [B, T, D] -> float32 logits [B, T, vocab]."""
    cfg = self.cfg
    if cfg.scale_decoder_outputs:
      # T5 1.0 scales the decoder output before the tied head (the table's rows have norm ~sqrt(d_model)).
      h = h * cfg.d_model**-0.5
    head = self.shared.embedding.T if cfg.tie_word_embeddings else self.lm_head
    return jnp.einsum(
      "btd,dv->btv", h.astype(cfg.dtype), jnp.asarray(head, cfg.dtype), preferred_element_type=jnp.float32
    )

  def __call__(self, embeds, attention_mask, decoder_ids, decoder_mask=None, *, deterministic=True):
    """Teacher-forced logits [B, T, vocab] float32 of decoder_ids given encoder embeds [B, S, D]."""
    encoder_out = self.encode(embeds, attention_mask, deterministic=deterministic)
    logits, _ = self.decode(
      decoder_ids, encoder_out, attention_mask, decoder_mask=decoder_mask, deterministic=deterministic
    )
    return logits


def split_layers(params) -> list:
  """The scanned decoder layers' parameters [layers, ...] (LoRA adapters included) as one tree per layer, for
  `decode_step`."""
  return layers.unstack(params["decoder"]["layers"])


def split_cache(cache) -> list:
  """An `init_cache` cache as one {"self_k", "self_v", "cross_k", "cross_v"} [B, S, heads, d_kv] per decoder
  layer (the encoder mask stays with the caller)."""
  return [{k: cache[k][:, i] for k in _CACHE_KEYS} for i in range(cache["self_k"].shape[1])]


def decode_step(
  model: T5ForConditionalGeneration, params, layer_params: list, decoder_ids, encoder_mask, caches: list, cache_index
):
  """`model.decode(decoder_ids, None, None, cache=..., cache_index=...)` with the decoder layers unrolled, for
  decoding one token at a time (see `opt.decode_step`): each layer's cache is its own loop-carried buffer and each
  layer reads its own weights. layer_params: `split_layers(params)`; caches: `split_cache(cache)`; encoder_mask
  [B, S_enc]. Returns (logits [B, T, vocab] float32, the updated caches)."""
  cfg = model.cfg
  x = model.apply({"params": params}, decoder_ids, method="embed").astype(cfg.dtype)
  bias, self_mask, cross_mask = _decoder_bias_and_masks(
    cfg,
    params["decoder"]["relative_attention_bias"],
    cache_index,
    x.shape[1],
    caches[0]["self_k"].shape[1],
    None,
    encoder_mask,
  )
  block = DecoderBlock(cfg)
  new_caches = []
  for lp, cache in zip(layer_params, caches):
    x, new = block.apply({"params": lp}, x, bias, self_mask, cross_mask, cache_index, cache)
    new_caches.append({**cache, **new})
  h = layers.RMSNorm(cfg.layer_norm_epsilon).apply({"params": params["decoder"]["final_norm"]}, x)
  return model.apply({"params": params}, h, method="head"), new_caches


def weight_map(cfg) -> list[tuple[str, str, str]]:
  """(our parameter path, HF `T5ForConditionalGeneration` safetensors name, kind) for weights.tree_from_hf /
  hf_tensors.

  HF stores the shared table once (encoder/decoder.embed_tokens are tied to it and not written), the relative
  position bias only in block 0 of each stack, and `lm_head.weight` only when it is not the shared table. LoRA
  adapters have no row: export merges them first (lora.merged)."""
  out = [("shared/embedding", "shared.weight", "copy")]
  attention = lambda ours, hf: [(f"{ours}/{p}/kernel", f"{hf}.{p}.weight", "linear") for p in "qkvo"]
  ffn_names = ("wi_0", "wi_1", "wo") if cfg.is_gated_act else ("wi", "wo")
  for stack in ("encoder", "decoder"):
    block = f"{stack}.block.{{i}}.layer"
    out.append(
      (
        f"{stack}/relative_attention_bias",
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "copy",
      )
    )
    out += attention(f"{stack}/layers/self_attention", f"{block}.0.SelfAttention")
    out.append((f"{stack}/layers/self_attention_norm/scale", f"{block}.0.layer_norm.weight", "copy"))
    ffn = 1
    if stack == "decoder":
      out += attention("decoder/layers/cross_attention", f"{block}.1.EncDecAttention")
      out.append(("decoder/layers/cross_attention_norm/scale", f"{block}.1.layer_norm.weight", "copy"))
      ffn = 2
    out += [
      (f"{stack}/layers/ffn/{name}/kernel", f"{block}.{ffn}.DenseReluDense.{name}.weight", "linear")
      for name in ffn_names
    ]
    out.append((f"{stack}/layers/ffn_norm/scale", f"{block}.{ffn}.layer_norm.weight", "copy"))
    out.append((f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", "copy"))
  if not cfg.tie_word_embeddings:
    out.append(("lm_head", "lm_head.weight", "linear"))
  return out


# --- decoding adapter for blip2_jax.generation ---------------------------------------------------------------


@struct.dataclass
class T5Decoder:
  """T5ForConditionalGeneration: the prefix is the encoder input; the decoder starts from decoder_start_token_id.

  state: {"cache": one cache per decoder layer (its self-attention slots and the encoder's cross-attention
  keys/values), "encoder_mask": [N, S_enc], "index": [N] next cache slot (the same in every row)}. The prefill
  runs the scanned layers; each step runs them unrolled (`decode_step`) on `layer_params`, the decoder layers'
  weights split once per generate call (a second copy of them while generating), as OPTDecoder does.
  """

  module: T5ForConditionalGeneration = struct.field(pytree_node=False)
  params: Any
  layer_params: Any

  @classmethod
  def create(cls, module: T5ForConditionalGeneration, params) -> "T5Decoder":
    return cls(layers.frozen_config(module), params, split_layers(params))

  @property
  def start_ids(self) -> tuple[int, ...]:
    return (self.module.cfg.decoder_start_token_id,)  # HF's decoder input_ids begin with it

  def prefill(self, prefix_embeds, prefix_mask, max_new_tokens: int):
    b = prefix_embeds.shape[0]
    start = jnp.full((b, 1), self.module.cfg.decoder_start_token_id, jnp.int32)

    def run(m, embeds, mask, start):
      # Slots: the start token, then every generated token but the last.
      cache = m.init_cache(m.encode(embeds, mask), mask, max_new_tokens)
      return m.decode(start, None, None, cache=cache, cache_index=0)

    logits, cache = self.module.apply({"params": self.params}, prefix_embeds, prefix_mask, start, method=run)
    return logits[:, 0], {
      "cache": split_cache(cache),
      "encoder_mask": cache["encoder_mask"],
      "index": jnp.ones((b,), jnp.int32),
    }

  def step(self, tokens, state):
    index = state["index"][0]
    logits, caches = decode_step(
      self.module, self.params, self.layer_params, tokens[:, None], state["encoder_mask"], state["cache"], index
    )
    return logits[:, 0], {"cache": caches, "encoder_mask": state["encoder_mask"], "index": state["index"] + 1}
