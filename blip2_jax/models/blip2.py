"""BLIP-2 stage 1: frozen ViT -> ln_vision -> Q-Former with ITC, ITM and ITG heads (LAVIS `Blip2Qformer`).

The ViT's parameters live under `visual_encoder/` and are frozen (config `frozen_params`); its output is cut
with stop_gradient so no backward pass ever runs through it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blip2_jax import losses
from blip2_jax.models import layers, masks
from blip2_jax.models.qformer import QFormer
from blip2_jax.models.vit import VisionTransformer


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Blip2Qformer(nn.Module):
  """cfg: vit (ViT config), qformer (Q-Former config), num_query_tokens, embed_dim, ln_vision_eps,
  itc_label_smoothing, itg_label_smoothing, and bos_token_id (the tokenizer's [DEC])."""
  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    self.visual_encoder = VisionTransformer(cfg.vit)
    self.ln_vision = layers.layer_norm(cfg.ln_vision_eps)
    d = cfg.qformer.hidden_size
    self.query_tokens = self.param("query_tokens", layers.logical(layers.default_init, (None, None, "embed")),
                                   (1, cfg.num_query_tokens, d), jnp.float32)
    self.qformer = QFormer(cfg.qformer)
    self.vision_proj = layers.dense(cfg.embed_dim, ("embed", None))
    self.text_proj = layers.dense(cfg.embed_dim, ("embed", None))
    self.itm_head = layers.dense(2, ("embed", None))
    # Learnable temperature, 0.07 at init and not clamped (reference).
    self.temp = self.param("temp", layers.logical(nn.initializers.constant(0.07), ()), (), jnp.float32)

  # --- the three ways of reading -------------------------------------------------------------------------

  def encode_image(self, images):
    """Frozen ViT (no gradient) -> ln_vision (trainable). [B, S, S, 3] -> [B, N, vit width] float32."""
    feats = jax.lax.stop_gradient(self.visual_encoder(images))
    return self.ln_vision(feats.astype(jnp.float32))

  def query_features(self, image_embeds, *, deterministic=True):
    """Queries alone, cross-attending to the image. -> (query outputs [B, Q, D], per-layer (k, v))."""
    b = image_embeds.shape[0]
    queries = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    x = self.qformer.embed(queries, deterministic=deterministic)
    return self.qformer.encode(x, queries.shape[1], None, image_embeds, deterministic=deterministic)

  def text_features(self, text_ids, text_mask, *, deterministic=True):
    """Text alone (unimodal mask). -> [CLS] output [B, D]."""
    x = self.qformer.embed(None, text_ids, deterministic=deterministic)
    x, _ = self.qformer.encode(x, 0, masks.padding_mask(text_mask), deterministic=deterministic)
    return x[:, 0]

  def image_feats(self, query_output):
    return _normalize(self.vision_proj(query_output))

  def text_feat(self, text_cls):
    return _normalize(self.text_proj(text_cls))

  def itm_logits(self, image_embeds, text_ids, text_mask, *, deterministic=True):
    """Queries and text together (bidirectional); itm_head on the query outputs, averaged over queries."""
    b = image_embeds.shape[0]
    q = self.cfg.num_query_tokens
    queries = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
    x = self.qformer.embed(queries, text_ids, deterministic=deterministic)
    x, _ = self.qformer.encode(x, q, masks.bidirectional_mask(q, text_mask), image_embeds,
                               deterministic=deterministic)
    return self.itm_head(x[:, :q]).astype(jnp.float32).mean(axis=1)

  def itg_logits(self, query_kvs, text_ids, text_mask, *, deterministic=True):
    """Text with [DEC] first, causal, attending to the cached query keys/values. -> LM logits [B, T, V]."""
    q = self.cfg.num_query_tokens
    dec_ids = text_ids.at[:, 0].set(self.cfg.bos_token_id)
    x = self.qformer.embed(None, dec_ids, deterministic=deterministic)
    mask = masks.text_rows_of_multimodal_causal_mask(q, text_mask)
    x, _ = self.qformer.encode(x, 0, mask, prefix_kvs=query_kvs, deterministic=deterministic)
    return self.qformer.lm_logits(x)

  # --- stage-1 training forward ------------------------------------------------------------------------

  def __call__(self, images, text_ids, text_mask, *, train: bool = True):
    """Returns a dict with `loss` (the unweighted sum) and `loss_itc`, `loss_itm`, `loss_itg`.

    `train` switches dropout on; the ITM negatives always draw from the 'itm' rng stream."""
    return self.stage1_losses(self.encode_image(images), text_ids, text_mask, train=train)

  def stage1_losses(self, image_embeds, text_ids, text_mask, *, train: bool = True):
    """The Q-Former part of the stage-1 forward, from ln_vision's output on."""
    cfg = self.cfg
    det = not train

    # ITC: every image against every text of the global batch.
    query_output, query_kvs = self.query_features(image_embeds, deterministic=det)
    image_feats = self.image_feats(query_output)
    text_feat = self.text_feat(self.text_features(text_ids, text_mask, deterministic=det))
    loss_itc, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feat, self.temp, cfg.itc_label_smoothing)

    # ITM: (image, text), (hard-negative image, text), (image, hard-negative text).
    neg_text, neg_image = losses.sample_hard_negatives(self.make_rng("itm"), sim_i2t, sim_t2i)
    b = image_embeds.shape[0]
    itm_ids = jnp.concatenate([text_ids, text_ids, text_ids[neg_text]], axis=0)
    itm_mask = jnp.concatenate([text_mask, text_mask, text_mask[neg_text]], axis=0)
    itm_images = jnp.concatenate([image_embeds, image_embeds[neg_image], image_embeds], axis=0)
    itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    logits = self.itm_logits(itm_images, itm_ids, itm_mask, deterministic=det)
    loss_itm = losses.itm_loss(logits, itm_labels)

    # ITG: captioning conditioned on the queries' cached keys/values (gradients flow through them).
    lm_logits = self.itg_logits(query_kvs, text_ids, text_mask, deterministic=det)
    loss_itg = losses.itg_loss(lm_logits, text_ids, text_mask, cfg.itg_label_smoothing)

    return {"loss": loss_itc + loss_itm + loss_itg,
            "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}
