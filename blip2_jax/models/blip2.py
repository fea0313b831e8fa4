"""BLIP-2 stage 1: frozen ViT -> ln_vision -> Q-Former with ITC, ITM and ITG heads (LAVIS `Blip2Qformer`).

The ViT's parameters live under `visual_encoder/` and are frozen (config `frozen_params`); its output is cut
with stop_gradient so no backward pass ever runs through it, unless `vit.trainable` (fine-tuning).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blip2_jax import losses
from blip2_jax.models import layers
from blip2_jax.models import llms
from blip2_jax.models import masks
from blip2_jax.models.qformer import QFormer
from blip2_jax.models.qformer import init_std
from blip2_jax.models.vit import VisionTransformer


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def qformer_text_input(cfg) -> bool:
  """Whether a stage-2 model config (`cfg.qformer_text_input`) makes the Q-Former question-conditioned: BLIP-2's VQA
  fine-tuning (paper Sec. 4.3) and InstructBLIP give the question's tokens to the Q-Former beside the queries."""
  return bool(cfg.get("qformer_text_input", False))


def _setup_image_side(model, qformer_cfg=None):
  """What both BLIP-2 models hold before their heads: the frozen ViT, ln_vision, the query tokens, the Q-Former
  (built from `qformer_cfg`, default cfg.qformer)."""
  cfg = model.cfg
  model.visual_encoder = VisionTransformer(cfg.vit)
  model.ln_vision = layers.layer_norm(cfg.ln_vision_eps)
  model.query_tokens = model.param(
    "query_tokens",
    layers.logical(nn.initializers.normal(init_std(cfg.qformer)), (None, None, "embed")),
    (1, cfg.num_query_tokens, cfg.qformer.hidden_size),
    jnp.float32,
  )
  model.qformer = QFormer(cfg.qformer if qformer_cfg is None else qformer_cfg)


def _encode_image(model, images, deterministic: bool = True):
  """ViT -> ln_vision (trainable). [B, S, S, 3] -> [B, N, vit width] float32. The ViT is frozen (its output cut by
  stop_gradient, so no backward pass runs through it) unless cfg.vit.trainable (fine-tuning; state.model_config
  sets it from config.frozen_params)."""
  feats = model.visual_encoder(images, deterministic=deterministic)
  if not model.cfg.vit.get("trainable", False):
    feats = jax.lax.stop_gradient(feats)
  return model.ln_vision(feats.astype(jnp.float32))


def _query_features(model, image_embeds, deterministic, text_ids=None, text_mask=None):
  """Queries cross-attending to the image, alone or (text_ids [B, T] given: the question-conditioned Q-Former)
  followed by text tokens that they see and that see them in self-attention (masks.bidirectional_mask, as
  InstructBLIP; pads, text_mask 0, hidden). -> (query outputs [B, Q, D], per-layer self-attention (k, v))."""
  b = image_embeds.shape[0]
  queries = jnp.broadcast_to(model.query_tokens, (b,) + model.query_tokens.shape[1:])
  q = queries.shape[1]
  x = model.qformer.embed(queries, text_ids, deterministic=deterministic)
  mask = None
  if text_ids is not None:
    mask = masks.bidirectional_mask(q, jnp.ones_like(text_ids) if text_mask is None else text_mask)
  x, kvs = model.qformer.encode(x, q, mask, image_embeds, deterministic=deterministic)
  return x[:, :q], kvs


class Blip2Qformer(nn.Module):
  """cfg: vit (ViT config), qformer (Q-Former config), num_query_tokens, embed_dim, ln_vision_eps,
  itc_label_smoothing, itg_label_smoothing, and bos_token_id (the tokenizer's [DEC])."""

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    _setup_image_side(self)
    std = init_std(cfg.qformer)
    self.vision_proj = layers.dense(cfg.embed_dim, ("embed", None), init_std=std)
    self.text_proj = layers.dense(cfg.embed_dim, ("embed", None), init_std=std)
    self.itm_head = layers.dense(2, ("embed", None), init_std=std)
    # Learnable temperature, 0.07 at init and not clamped (reference).
    self.temp = self.param("temp", layers.logical(nn.initializers.constant(0.07), ()), (), jnp.float32)

  # --- the three ways of reading -------------------------------------------------------------------------

  def encode_image(self, images, *, deterministic: bool = True):
    return _encode_image(self, images, deterministic)

  def query_features(self, image_embeds, *, deterministic=True):
    return _query_features(self, image_embeds, deterministic)

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
    x, _ = self.qformer.encode(x, q, masks.bidirectional_mask(q, text_mask), image_embeds, deterministic=deterministic)
    return self.itm_head(x[:, :q]).astype(jnp.float32).mean(axis=1)

  def itg_logits(self, query_kvs, text_ids, text_mask, *, deterministic=True):
    """Text with [DEC] first, causal, attending to the cached query keys/values. -> LM logits [B, T, V]."""
    q = self.cfg.num_query_tokens
    dec_ids = text_ids.at[:, 0].set(self.cfg.bos_token_id)
    x = self.qformer.embed(None, dec_ids, deterministic=deterministic)
    mask = masks.text_rows_of_multimodal_causal_mask(q, text_mask)
    x, _ = self.qformer.encode(x, 0, mask, prefix_kvs=query_kvs, deterministic=deterministic)
    return self.qformer.lm_logits(x)

  def retrieval_outputs(self, images, text_ids, text_mask):
    """Everything a retrieval checkpoint has (no ITG): (ITC image feats, ITC text feat, ITM logits). Also the
    init function of HF retrieval checkpoints, which carry no Q-Former LM head."""
    image_embeds = self.encode_image(images)
    image_feats = self.image_feats(self.query_features(image_embeds)[0])
    text_feat = self.text_feat(self.text_features(text_ids, text_mask))
    return image_feats, text_feat, self.itm_logits(image_embeds, text_ids, text_mask)

  # --- stage-1 training forward ------------------------------------------------------------------------

  def losses(self, batch, *, train: bool = True):
    """The trainer's entry point: batch {'image', 'text_ids', 'text_mask'} and, for retrieval fine-tuning,
    'image_id' (config data.image_ids) -> stage1_losses."""
    return self(batch["image"], batch["text_ids"], batch["text_mask"], train=train, image_ids=batch.get("image_id"))

  def __call__(self, images, text_ids, text_mask, *, train: bool = True, image_ids=None):
    """Returns a dict with `loss` (the unweighted sum) and `loss_itc`, `loss_itm`, `loss_itg`.

    `train` switches dropout on; the ITM negatives always draw from the 'itm' rng stream."""
    image_embeds = self.encode_image(images, deterministic=not train)
    return self.stage1_losses(image_embeds, text_ids, text_mask, train=train, image_ids=image_ids)

  def stage1_losses(self, image_embeds, text_ids, text_mask, *, train: bool = True, image_ids=None):
    """The Q-Former part of the stage-1 forward, from ln_vision's output on. image_ids [B] (retrieval fine-tuning):
    rows of the same image are ITC positives of each other and never ITM hard negatives (losses.py)."""
    cfg = self.cfg
    det = not train

    # ITC: every image against every text of the global batch.
    query_output, query_kvs = self.query_features(image_embeds, deterministic=det)
    image_feats = self.image_feats(query_output)
    text_feat = self.text_feat(self.text_features(text_ids, text_mask, deterministic=det))
    loss_itc, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feat, self.temp, cfg.itc_label_smoothing, image_ids)

    # ITM: (image, text), (hard-negative image, text), (image, hard-negative text).
    neg_text, neg_image = losses.sample_hard_negatives(self.make_rng("itm"), sim_i2t, sim_t2i, image_ids)
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

    return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}


class Blip2LLM(nn.Module):
  """BLIP-2 stage 2 and its inference model (LAVIS `Blip2OPT` / `Blip2T5`, HF `Blip2ForConditionalGeneration`):
  frozen ViT -> ln_vision -> the query side of the Q-Former -> `language_projection` -> soft prompts in front of
  the frozen LLM's input (OPT) or encoder input (T5).

  cfg: vit, qformer, num_query_tokens, ln_vision_eps, llm (the LLM's config, with `kind` its family in
  models/llms.py), and `qformer_text_input` (default False). The LLM's weights are frozen (config `frozen_params`);
  gradients reach only its inputs and its LoRA adapters, if cfg.llm.lora configures any (models/lora.py), whose
  dropout runs when not `deterministic` (training).

  The Q-Former keeps no LM head. Without qformer_text_input it keeps its query side only (LAVIS, HF BLIP-2). With
  it (question-conditioned: BLIP-2's VQA fine-tuning, HF `InstructBlipForConditionalGeneration`) it also keeps its
  text side (word and position embeddings, the text FFN), and every method that reads images also needs the
  question's Q-Former token ids `qformer_ids` [B, T] (and `qformer_mask`, 1 = token, 0 = pad; default all ones):
  [queries; question] go through the Q-Former under masks.bidirectional_mask (each sees all of both, pads hidden),
  the queries cross-attend to the image, and only the query outputs reach `language_projection`. The LLM text
  (and the answer in it) never enters the Q-Former.
  """

  cfg: ml_collections.ConfigDict

  def setup(self):
    cfg = self.cfg
    qformer_cfg = dict(cfg.qformer.to_dict(), text_input=qformer_text_input(cfg), lm_head=False)
    _setup_image_side(self, ml_collections.ConfigDict(qformer_cfg))
    self.family = llms.family(cfg.llm.kind)
    self.language_projection = layers.dense(self.family.width(cfg.llm), ("embed", None), init_std=init_std(cfg.qformer))
    self.language_model = self.family.module(cfg.llm)

  def encode_image(self, images, *, deterministic: bool = True):
    return _encode_image(self, images, deterministic)

  def query_features(self, image_embeds, qformer_ids=None, qformer_mask=None, *, deterministic=True):
    """-> (query outputs [B, Q, D], per-layer self-attention (k, v)); qformer_ids: see the class docstring."""
    if qformer_text_input(self.cfg) and qformer_ids is None:
      raise ValueError(
        "This model's Q-Former reads the question (cfg.qformer_text_input): pass its Q-Former token ids "
        "qformer_ids [B, T] and qformer_mask (training batches: keys 'qformer_ids', 'qformer_mask')."
      )
    if not qformer_text_input(self.cfg) and qformer_ids is not None:
      raise ValueError("qformer_ids given, but this model's Q-Former has no text side (cfg.qformer_text_input off).")
    return _query_features(self, image_embeds, deterministic, qformer_ids, qformer_mask)

  def image_prompt(self, images, qformer_ids=None, qformer_mask=None, *, deterministic=True):
    """[B, S, S, 3] -> the projected query outputs [B, Q, LLM width] (float32), the LLM's soft prompt.
    qformer_ids, qformer_mask: the question (question-conditioned models only; class docstring)."""
    query_output, _ = self.query_features(
      self.encode_image(images, deterministic=deterministic), qformer_ids, qformer_mask, deterministic=deterministic
    )
    return self.language_projection(query_output)

  def llm_inputs(self, image_prompt, input_ids, attention_mask):
    """Soft prompt first, then the text's token embeddings; the mask gains ones for the queries."""
    text = self.language_model.embed(input_ids)
    embeds = jnp.concatenate([image_prompt.astype(text.dtype), text], axis=1)
    mask = jnp.concatenate([jnp.ones(image_prompt.shape[:2], attention_mask.dtype), attention_mask], axis=1)
    return embeds, mask

  def __call__(
    self,
    images,
    input_ids,
    attention_mask,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    qformer_ids=None,
    qformer_mask=None,
    deterministic=True,
  ):
    """LLM logits as HF's Blip2ForConditionalGeneration (InstructBlipForConditionalGeneration with qformer_ids)
    computes them: OPT, over [queries; text] positions [B, Q + T, V]; T5, over the decoder positions
    [B, T_dec, V]. float32."""
    prompt = self.image_prompt(images, qformer_ids, qformer_mask, deterministic=deterministic)
    embeds, mask = self.llm_inputs(prompt, input_ids, attention_mask)
    if not self.family.encoder_decoder:
      return self.language_model(embeds, mask, deterministic=deterministic)[0]
    if decoder_input_ids is None:
      raise ValueError(
        "A T5 BLIP-2 needs decoder_input_ids (the decoder's input, starting with decoder_start_token_id)."
      )
    encoder_out = self.language_model.encode(embeds, mask, deterministic=deterministic)
    return self.language_model.decode(
      decoder_input_ids, encoder_out, mask, decoder_mask=decoder_attention_mask, deterministic=deterministic
    )[0]

  def losses(self, batch, *, train: bool = True):
    """Stage-2 loss (the trainer's entry point); {'loss', 'loss_lm'}.

    OPT: batch {'image', 'text_ids', 'text_mask', 'label_mask'}: text = "</s>" + prompt + caption + "\n",
    label_mask marks the caption and "\n" (not "</s>", the prompt or pads). Position Q - 1 + t predicts text
    token t. T5 (prefix-LM): {'image', 'text_ids', 'text_mask'} (the prefix, for the encoder), 'target_ids',
    'target_mask' (the suffix + "</s>"); the decoder reads the targets shifted right behind
    decoder_start_token_id. Which of the two: the LLM family's `encoder_decoder` (models/llms.py).
    Question-conditioned models (cfg.qformer_text_input) also read 'qformer_ids' and 'qformer_mask': the question
    alone, in the Q-Former's tokenizer (the answer stays in the LLM text only)."""
    det = not train
    prompt = self.image_prompt(batch["image"], batch.get("qformer_ids"), batch.get("qformer_mask"), deterministic=det)
    embeds, mask = self.llm_inputs(prompt, batch["text_ids"], batch["text_mask"])
    q = prompt.shape[1]
    if not self.family.encoder_decoder:
      # Position q - 1 + t predicts text token t: the queries' other positions need no logits.
      logits = self.language_model(embeds, mask, logits_range=(q - 1, embeds.shape[1] - 1), deterministic=det)[0]
      loss = losses.lm_loss(logits, batch["text_ids"], batch["label_mask"])
    else:
      targets = batch["target_ids"]
      start = jnp.full((targets.shape[0], 1), self.cfg.llm.decoder_start_token_id, targets.dtype)
      decoder_ids = jnp.concatenate([start, targets[:, :-1]], axis=1)
      encoder_out = self.language_model.encode(embeds, mask, deterministic=det)
      logits = self.language_model.decode(decoder_ids, encoder_out, mask, deterministic=det)[0]
      loss = losses.lm_loss(logits, targets, batch["target_mask"])
    return {"loss": loss, "loss_lm": loss}
