"""The Q-Former: a BERT whose first positions are learned queries that also cross-attend to the image.

One stack serves three ways of reading (LAVIS `Qformer.py`, HF `Blip2QFormerModel`):
- queries alone (with cross-attention to the image) -> the visual features, and their per-layer self-attention
  keys/values, which the image-grounded text generation reuses;
- text alone (the plain BERT text encoder);
- queries and text together under a given mask (image-text matching, generation).
Self-attention is shared by queries and text; query positions use their own FFN (`ffn_query`) and are the only
positions that cross-attend (every `cross_attention_freq`-th layer).

Masks are boolean [B, 1, L_query_side, L_key_side], True where attention is allowed (see `masks.py`).
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from blip2_jax.models import layers


def init_std(cfg) -> float:
  """The std of the Q-Former's random weights: `init_std` (BERT's 0.02 when unset). Only a randomly initialised
  Q-Former reads it; pretrained weights replace it."""
  return cfg.get("init_std", 0.02)


class MultiHeadAttention(nn.Module):
  """BERT attention block: q/k/v -> attention -> dense -> dropout -> LayerNorm(x + .)."""

  cfg: ml_collections.ConfigDict
  kv_axis: str = "embed"

  @nn.compact
  def __call__(self, x, kv_inputs, mask, *, prefix_kv=None, deterministic=True):
    cfg = self.cfg
    b, lq, d = x.shape
    h = cfg.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)
    std = init_std(cfg)
    q = split(layers.dense(d, ("embed", "heads"), dtype=cfg.dtype, init_std=std, name="query")(x))
    k = split(layers.dense(d, (self.kv_axis, "heads"), dtype=cfg.dtype, init_std=std, name="key")(kv_inputs))
    v = split(layers.dense(d, (self.kv_axis, "heads"), dtype=cfg.dtype, init_std=std, name="value")(kv_inputs))
    new_kv = (k, v)
    if prefix_kv is not None:  # cached query keys/values come first (ITG)
      k = jnp.concatenate([prefix_kv[0], k], axis=1)
      v = jnp.concatenate([prefix_kv[1], v], axis=1)
    dropout = not deterministic and cfg.dropout_rate > 0
    # A fused kernel (model.qformer.attention) where no attention dropout is drawn; XLA's path where one is.
    impl = cfg.get("attention", "xla") if not dropout else "xla"
    layers.check_attention(impl, q.dtype, "model.qformer.attention")
    out = layers.attention(
      q,
      k,
      v,
      mask,
      dropout_rate=cfg.dropout_rate,
      deterministic=deterministic,
      dropout_rng=self.make_rng("dropout") if dropout else None,
      implementation=impl,
    ).reshape(b, lq, d)
    out = layers.dense(d, ("heads", "embed"), dtype=cfg.dtype, init_std=std, name="output")(out)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    out = layers.layer_norm(cfg.layer_norm_eps, name="output_norm")(out + x)
    return out, new_kv


class FeedForward(nn.Module):
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    cfg = self.cfg
    std = init_std(cfg)
    h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), dtype=cfg.dtype, init_std=std, name="intermediate")(x)
    h = layers.gelu(h)
    h = layers.dense(x.shape[-1], ("mlp", "embed"), dtype=cfg.dtype, init_std=std, name="output")(h)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return layers.layer_norm(cfg.layer_norm_eps, name="output_norm")(h + x)


class QFormerLayer(nn.Module):
  cfg: ml_collections.ConfigDict
  has_cross_attention: bool
  has_text_ffn: bool = True

  @nn.compact
  def __call__(self, x, query_len, mask, image_embeds=None, *, prefix_kv=None, deterministic=True):
    cfg = self.cfg
    x, kv = MultiHeadAttention(cfg, name="attention")(x, x, mask, prefix_kv=prefix_kv, deterministic=deterministic)
    outs = []
    if query_len > 0:
      q = x[:, :query_len]
      if self.has_cross_attention:
        if image_embeds is None:
          raise ValueError("Query positions need image_embeds for cross-attention.")
        q, _ = MultiHeadAttention(cfg, kv_axis="vit_embed", name="crossattention")(
          q, image_embeds, None, deterministic=deterministic
        )
      outs.append(FeedForward(cfg, name="ffn_query")(q, deterministic=deterministic))
    if x.shape[1] > query_len:
      outs.append(FeedForward(cfg, name="ffn")(x[:, query_len:], deterministic=deterministic))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], kv


class QFormer(nn.Module):
  """cfg: vocab_size, hidden_size, num_layers, num_heads, intermediate_size, cross_attention_freq,
  max_position_embeddings, layer_norm_eps, dropout_rate, dtype."""

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    # Stage 2 and HF's captioning checkpoints keep the query side only: no text embeddings, no LM head.
    if cfg.get("text_input", True):
      self.word_embeddings = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        param_dtype=jnp.float32,
        embedding_init=layers.logical(nn.initializers.normal(init_std(cfg)), ("vocab", "embed")),
        name="word_embeddings",
      )
      self.position_embeddings = self.param(
        "position_embeddings",
        layers.logical(nn.initializers.normal(init_std(cfg)), (None, "embed")),
        (cfg.max_position_embeddings, cfg.hidden_size),
        jnp.float32,
      )
    self.embed_norm = layers.layer_norm(cfg.layer_norm_eps)
    self.embed_dropout = nn.Dropout(cfg.dropout_rate)
    self.layers = [
      QFormerLayer(cfg, has_cross_attention=(i % cfg.cross_attention_freq == 0)) for i in range(cfg.num_layers)
    ]
    if cfg.get("text_input", True) and cfg.get("lm_head", True):
      # BERT's MLM head: transform (dense, gelu, LayerNorm) then the decoder tied to the word embeddings.
      self.lm_transform = layers.dense(cfg.hidden_size, ("embed", "mlp"), dtype=cfg.dtype, init_std=init_std(cfg))
      self.lm_norm = layers.layer_norm(cfg.layer_norm_eps)
      self.lm_bias = self.param(
        "lm_bias", layers.logical(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), jnp.float32
      )

  def embed(self, query_embeds=None, text_ids=None, *, deterministic=True):
    """[queries; word + position embeddings of text] -> LayerNorm -> dropout. Queries get no position."""
    parts = []
    if query_embeds is not None:
      parts.append(query_embeds.astype(jnp.float32))
    if text_ids is not None:
      if text_ids.shape[1] > self.cfg.max_position_embeddings:
        raise ValueError(
          f"Text of {text_ids.shape[1]} tokens exceeds the Q-Former's "
          f"max_position_embeddings={self.cfg.max_position_embeddings}."
        )
      parts.append(self.word_embeddings(text_ids) + self.position_embeddings[None, : text_ids.shape[1]])
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return self.embed_dropout(self.embed_norm(x), deterministic=deterministic)

  def encode(self, x, query_len, mask, image_embeds=None, *, prefix_kvs=None, deterministic=True):
    """Runs the layers. Returns (hidden [B, L, D], per-layer self-attention (k, v) of these positions)."""
    kvs = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(
        x,
        query_len,
        mask,
        image_embeds,
        prefix_kv=None if prefix_kvs is None else prefix_kvs[i],
        deterministic=deterministic,
      )
      kvs.append(kv)
    return x, kvs

  def lm_logits(self, x):
    h = self.lm_norm(layers.gelu(self.lm_transform(x)))
    logits = self.word_embeddings.attend(h.astype(jnp.float32))
    return logits + self.lm_bias

  def __call__(self, query_embeds, text_ids, mask, image_embeds, *, deterministic=True):
    """Convenience full pass (also used by init, so every parameter is created)."""
    x = self.embed(query_embeds, text_ids, deterministic=deterministic)
    query_len = 0 if query_embeds is None else query_embeds.shape[1]
    x, _ = self.encode(x, query_len, mask, image_embeds, deterministic=deterministic)
    return x, self.lm_logits(x) if self.cfg.get("lm_head", True) else None
