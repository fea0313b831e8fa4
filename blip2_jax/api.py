"""The public model: `Blip2`, a BLIP-2 with its (sharded) parameters and tokenizer, for inference and export.

  from blip2_jax import Blip2
  model = Blip2.from_pretrained("/ckpt/blip2-opt-2.7b", dtype="bfloat16")   # a local HF BLIP-2 directory
  model.caption(["cat.jpg"]); model.answer(["cat.jpg"], "how many cats are there?")
  model = Blip2.from_workdir("workdirs/stage1_demo")                         # a blip2_jax training workdir
  model.save_pretrained("/tmp/out")                                          # back to the HF layout

A retrieval model (stage 1, HF Blip2ForImageTextRetrieval) gives ITM logits, ITC scores and features; an LLM
model (stage 2, Blip2ForConditionalGeneration) gives LLM logits, captions, VQA answers and prompted generation. A
question-conditioned LLM model (`question_conditioned`; HF InstructBlipForConditionalGeneration) also gives text to
its Q-Former: `qformer_ids` / `qformer_mask` (its tokenizer's ids), or, for generation, the question or prompt
through `qformer_tokenizer`.
Images are [B, H, W, 3] (channels last), normalised as the BLIP-2 processors do (CLIP mean/std); HF's
pixel_values are the same numbers as [B, 3, H, W]. Reading and building: state.py; the HF layout: hf.py.
"""

import functools
import json
import logging
from pathlib import Path

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from blip2_jax import hf
from blip2_jax import losses
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax import tasks
from blip2_jax import weights
from blip2_jax.data import images as images_lib
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import llms
from blip2_jax.models import lora
from blip2_jax.models.blip2 import Blip2LLM
from blip2_jax.models.blip2 import qformer_text_input

log = logging.getLogger(__name__)


class Blip2:
  """A BLIP-2 model with its parameters (sharded over `mesh`) and, when the directory has one, its tokenizer.

  `kind` is 'retrieval' (image-text matching and contrastive scores, feature extraction) or the LLM family,
  'opt' / 't5' / 'llama' / 'qwen2' (LLM logits and generation); models/llms.py. `qformer_tokenizer`: the
  Q-Former's (BERT) tokenizer of a question-conditioned model, when known (saved in and read from the
  `qformer_tokenizer` subfolder, as HF's InstructBlipProcessor does)."""

  def __init__(
    self,
    cfg,
    kind: str,
    params: dict,
    mesh,
    tokenizer=None,
    llm_hf_config=None,
    image_token_index=None,
    qformer_tokenizer=None,
  ):
    self.cfg, self.kind, self.params, self.mesh, self.tokenizer = cfg, kind, params, mesh, tokenizer
    self.llm_hf_config, self.image_token_index = llm_hf_config, image_token_index
    self.qformer_tokenizer = qformer_tokenizer
    self.module = state_lib.build_module(cfg, kind)

  @property
  def question_conditioned(self) -> bool:
    """Whether the Q-Former reads the question beside the queries (model config `qformer_text_input`)."""
    return self.kind != llms.RETRIEVAL and qformer_text_input(self.cfg)

  # --- loading -------------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(
    cls, path, *, dtype: str = "float32", mesh=None, rules=state_lib.DEFAULT_RULES, remat_policy: str = "none"
  ) -> "Blip2":
    """Loads a local HF BLIP-2 (or InstructBLIP: a question-conditioned model) directory (`state.load_hf_blip2`).
    `dtype` applies to the frozen ViT and LLM ("bfloat16" halves their memory); `mesh` defaults to all devices on
    one 'fsdp' axis."""
    hf_config, cfg, kind, params, mesh = state_lib.load_hf_blip2(
      path, dtype=dtype, mesh=mesh, rules=rules, remat_policy=remat_policy
    )
    qformer_dir = Path(path) / "qformer_tokenizer"  # InstructBlipProcessor's second tokenizer
    return cls(
      cfg,
      kind,
      params,
      mesh,
      _load_tokenizer(Path(path), llm=kind != llms.RETRIEVAL),
      llm_hf_config=hf_config.get("text_config") if kind != llms.RETRIEVAL else None,
      image_token_index=hf_config.get("image_token_index"),
      qformer_tokenizer=_load_tokenizer(qformer_dir) if qformer_dir.is_dir() else None,
    )

  @classmethod
  def from_workdir(cls, workdir, *, devices=None) -> "Blip2":
    """The latest checkpoint of a training workdir (its config.json says how it was trained) with its frozen
    weights (`state.restore_workdir`): a retrieval model (stage 1) or an LLM one (stage 2; a question-conditioned
    one with its Q-Former tokenizer, config.qformer_tokenizer)."""
    config, tokenizer, setup, state, frozen = state_lib.restore_workdir(workdir, devices=devices)
    cfg = state_lib.model_config(config, tokenizer)
    params = partitioning.merge(state["params"], frozen)
    kind = state_lib.kind(config)
    llm_hf_config = None if kind == llms.RETRIEVAL else hf.llm_hf_config(config)
    return cls(
      cfg,
      kind,
      params,
      setup.mesh,
      tokenizer,
      llm_hf_config=llm_hf_config,
      qformer_tokenizer=state_lib.load_qformer_tokenizer(config),
    )

  # --- forward API ---------------------------------------------------------------------------------------

  @functools.cached_property
  def _jitted(self):
    def apply(method, params, *args):
      return self.module.apply({"params": params}, *args, method=method)

    return jax.jit(apply, static_argnums=0)

  def _call(self, method, *args):
    return self._jitted(method, self.params, *(None if a is None else jnp.asarray(a) for a in args))

  def pixels(self, images):
    """The model's input, float [B, S, S, 3], from images as a user has them (`data.images.to_pixels`): one image
    or a list, each a PIL image, a file path, or an [H, W, 3] array (uint8 pixels of any size, or float already
    preprocessed); a float [B, S, S, 3] array is taken as preprocessed. Every method that takes images accepts
    all of these."""
    return images_lib.to_pixels(images, self.cfg.vit.image_size)

  def vision_features(self, images):
    """[B, H, W, 3] -> the ViT's output after ln_vision [B, 1 + patches, width] (HF's vision last_hidden_state)."""
    return self._call(_vision_features, self.pixels(images))

  def query_output(self, images, qformer_ids=None, qformer_mask=None):
    """[B, H, W, 3] -> the Q-Former's query outputs [B, num_query_tokens, hidden] (HF's qformer last_hidden_state;
    question-conditioned models: its first num_query_tokens positions, with qformer_ids [B, T] and qformer_mask)."""
    return self._call(_query_output, self.pixels(images), qformer_ids, qformer_mask)

  def image_prompt(self, images, qformer_ids=None, qformer_mask=None):
    """Captioning/VQA models: the projected query outputs, the LLM's soft prompt [B, Q, LLM width]."""
    self._need_llm(what="image_prompt")
    return self._call(Blip2LLM.image_prompt, self.pixels(images), qformer_ids, qformer_mask)

  def lm_logits(
    self,
    images,
    input_ids,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    qformer_ids=None,
    qformer_mask=None,
  ):
    """LLM logits for (images, prompt ids), float32: OPT over the [queries; text] positions, T5 over the decoder
    positions. `input_ids` hold the text only (no `<image>` placeholders: the queries are prepended here).
    qformer_ids, qformer_mask: the Q-Former's text (question-conditioned models; HF's qformer_input_ids)."""
    self._need_llm(what="lm_logits")
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    if llms.family(self.kind).encoder_decoder:
      if decoder_input_ids is None:
        raise ValueError(f"An encoder-decoder ({self.kind}) BLIP-2 needs decoder_input_ids for lm_logits.")
      if decoder_attention_mask is None:
        decoder_attention_mask = np.ones_like(decoder_input_ids)
    return self._call(
      _lm_logits,
      self.pixels(images),
      input_ids,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask,
      qformer_ids,
      qformer_mask,
    )

  def itm_logits(self, images, input_ids, attention_mask):
    """Retrieval models: image-text matching logits [B, 2] (index 1 = match) for the pairs (image i, text i)."""
    self._need_retrieval(what="itm_logits")
    return self._call(_itm_logits, self.pixels(images), input_ids, attention_mask)

  def itc_scores(self, images, input_ids, attention_mask):
    """Retrieval models: contrastive scores [B_img, B_txt], the cosine similarity maxed over queries (no
    temperature), as HF's `logits_per_image`."""
    self._need_retrieval(what="itc_scores")
    return self._call(_itc_scores, self.pixels(images), input_ids, attention_mask)

  def generate(self, images, prompts="", **settings) -> list[str]:
    """Captioning/VQA models: text for each image after its prompt (one string, or one per image); settings as
    `tasks.generate_text` (max_new_tokens, min_new_tokens, num_beams, length_penalty, repetition_penalty,
    do_sample, top_p, temperature, seed)."""
    self._need_llm(what="generate")
    return tasks.generate_text(
      self.module, self.params, self._tokenizer(), self.pixels(images), prompts, **self._qformer_settings(settings)
    )

  def caption(self, images, **settings) -> list[str]:
    """Captions with the paper's settings (prompt "a photo of", beams 5, 8-30 new tokens) unless overridden."""
    self._need_llm(what="caption")
    return tasks.caption(
      self.module, self.params, self._tokenizer(), self.pixels(images), **self._qformer_settings(settings)
    )

  def answer(self, images, questions, **settings) -> list[str]:
    """Zero-shot VQA with the paper's prompt and settings (beams 5, at most 10 new tokens, length penalty -1)."""
    self._need_llm(what="answer")
    return tasks.answer(
      self.module, self.params, self._tokenizer(), self.pixels(images), questions, **self._qformer_settings(settings)
    )

  def _qformer_settings(self, settings: dict) -> dict:
    """Generation settings plus, for a question-conditioned model, its Q-Former tokenizer."""
    if not self.question_conditioned or "qformer_tokenizer" in settings:
      return settings
    if self.qformer_tokenizer is None:
      raise ValueError(
        "This question-conditioned model has no Q-Former tokenizer: set `model.qformer_tokenizer` (a BERT "
        "tokenizer) or add a qformer_tokenizer/ subfolder with its files to the directory."
      )
    return dict(settings, qformer_tokenizer=self.qformer_tokenizer)

  def _tokenizer(self):
    if self.tokenizer is None:
      raise ValueError(
        "This model has no tokenizer (its directory had no tokenizer files): add the LLM's "
        "tokenizer files to the directory."
      )
    return self.tokenizer

  @classmethod
  def load(cls, path, **kwargs) -> "Blip2":
    """A HF BLIP-2 directory (from_pretrained) or a blip2_jax training workdir (from_workdir)."""
    root = Path(path)
    if (root / "checkpoints").is_dir():
      return cls.from_workdir(root)
    return cls.from_pretrained(root, **kwargs)

  def _need_llm(self, what):
    if self.kind == llms.RETRIEVAL:
      raise ValueError(f"{what} needs a {' or '.join(llms.FAMILIES)} model; this one is a {self.kind} model.")

  def _need_retrieval(self, what):
    if self.kind != llms.RETRIEVAL:
      raise ValueError(f"{what} needs a {llms.RETRIEVAL} model; this one is a {self.kind} model.")

  # --- export --------------------------------------------------------------------------------------------

  def save_pretrained(self, path, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Writes config.json, model.safetensors (sharded with an index past max_shard_bytes) and the tokenizer,
    in the layout transformers' Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval load, or
    InstructBlipForConditionalGeneration for a question-conditioned model (its Q-Former tokenizer, if known, in
    the `qformer_tokenizer` subfolder, where InstructBlipProcessor reads it). `dtype`
    (default: each parameter's own) casts every tensor. `temp` and the Q-Former LM head are dropped: HF has
    no place for them. With several processes every one must call it (the parameters are gathered from all of
    them) and process 0 writes."""
    out = Path(path)
    if self.cfg.ln_vision_eps != self.cfg.vit.layer_norm_eps:
      log.warning(
        "HF's BLIP-2 config has one LayerNorm eps for the ViT and ln_vision (post_layernorm); this "
        "model uses %g and %g: the export writes %g for both.",
        self.cfg.vit.layer_norm_eps,
        self.cfg.ln_vision_eps,
        self.cfg.vit.layer_norm_eps,
      )
    dropped = [p for p in ("temp", "qformer/lm_bias") if p in traverse_util.flatten_dict(self.params, sep="/")]
    if dropped:
      log.info("Not exported (HF's BLIP-2 has no place for them): temp and the Q-Former LM head.")
    host = lora.merged_blip2(partitioning.host_copy(self.params), self.cfg)  # LoRA adapters folded in
    if jax.process_index() != 0:
      return
    out.mkdir(parents=True, exist_ok=True)
    tensors = weights.hf_tensors(host, hf.blip2_weight_map(self.cfg, self.kind))
    llm_hf_config, image_token = self.llm_hf_config, self.image_token_index
    if self.kind != llms.RETRIEVAL and image_token is None:
      # transformers (>= 4.47) finds where the queries go by `image_token_index` placeholders in input_ids, so
      # the exported LLM gets one more token, <image>, whose embedding row is never read (HF's own conversion
      # does the same). Its output logit is h . 0 = 0 (OPT, tied) / 0 (T5's lm_head row): compare the first
      # vocab_size logits.
      image_token = llm_hf_config["vocab_size"]
      llm_hf_config = dict(llm_hf_config, vocab_size=image_token + 1)
      tensors = hf.with_image_token_row(tensors, self.kind)
    hf_config = hf.hf_config_from_ours(self.cfg, self.kind, llm_hf_config, image_token)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if dtype is not None:
      tensors = ((n, t.astype(jnp.dtype(dtype))) for n, t in tensors)
    hf.write_safetensors(out, tensors, max_shard_bytes)
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(str(out))
    if self.question_conditioned and self.qformer_tokenizer is not None:
      self.qformer_tokenizer.save_pretrained(str(out / "qformer_tokenizer"))
    log.info("Wrote %s (%s) to %s.", hf_config["architectures"][0], self.kind, out)


def _vision_features(module, images):
  return module.encode_image(images)


def _query_output(module, images, qformer_ids=None, qformer_mask=None):
  question = () if qformer_ids is None else (qformer_ids, qformer_mask)
  return module.query_features(module.encode_image(images), *question)[0]


def _lm_logits(module, images, ids, mask, decoder_ids, decoder_mask, qformer_ids, qformer_mask):
  return module(images, ids, mask, decoder_ids, decoder_mask, qformer_ids=qformer_ids, qformer_mask=qformer_mask)


def _itm_logits(module, images, input_ids, attention_mask):
  return module.itm_logits(module.encode_image(images), input_ids, attention_mask)


def _itc_scores(module, images, input_ids, attention_mask):
  image_feats = module.image_feats(module.query_features(module.encode_image(images))[0])
  text_feat = module.text_feat(module.text_features(input_ids, attention_mask))
  return losses.itc_similarities(image_feats, text_feat)


def _load_tokenizer(root: Path, llm: bool = False):
  """The tokenizer saved beside the weights, if any (HF BLIP-2 directories have one); an LLM's gets a pad token
  if it has none (tokenizer.load_llm_tokenizer)."""
  if not any((root / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "spiece.model")):
    log.info("%s has no tokenizer files; pass token ids yourself.", root)
    return None
  if llm:
    return tokenizer_lib.load_llm_tokenizer(str(root), local_files_only=False)
  return transformers.AutoTokenizer.from_pretrained(str(root))
