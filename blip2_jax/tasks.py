"""What a trained BLIP-2 does: captioning, zero-shot VQA and prompted generation (stage-2 models).

All three are `generate_text`: the image's soft prompt (the projected query outputs) followed by a text prompt,
then the frozen LLM generates. For OPT the prompt is "</s>" + prompt, left-padded behind the queries (positions
skip the padding, as HF counts them), and "\\n" is the end of a caption (BLIP-2/LAVIS); for T5 the prompt +
"</s>" is the encoder input behind the queries and the decoder generates from decoder_start_token_id to "</s>".

A question-conditioned model (model config `qformer_text_input`, VQA fine-tuning / InstructBLIP) also gives text to
its Q-Former, in the Q-Former's own (BERT) tokenizer: the question for `answer`, else the prompt (as HF's
InstructBlipProcessor does); `qformer_tokenizer` is then required.

Compilation: prompts are padded to a multiple of PROMPT_BUCKET tokens and batches to the batch size given, so a
folder of images with prompts of different lengths compiles a handful of programs, not one per call.
"""

import contextlib
import functools

import jax
import numpy as np

from blip2_jax import generation
from blip2_jax import partitioning
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import layers
from blip2_jax.models import llms
from blip2_jax.models.blip2 import Blip2LLM
from blip2_jax.models.blip2 import qformer_text_input

PROMPT_BUCKET = 8
CAPTION_PROMPT = "a photo of"
# Paper / LAVIS inference settings.
CAPTION_SETTINGS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
VQA_SETTINGS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def _prefix(module: Blip2LLM, params, images, ids, mask, qformer_ids=None, qformer_mask=None):
  """Soft prompt + prompt embeddings, and their mask. qformer_ids/mask: question-conditioned models only."""
  prompt = module.apply({"params": params}, images, qformer_ids, qformer_mask, method=Blip2LLM.image_prompt)
  return module.apply({"params": params}, prompt, ids, mask, method=Blip2LLM.llm_inputs)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(module: Blip2LLM, params, images, ids, mask, options, rng, qformer_ids=None, qformer_mask=None):
  """One program per (module, shapes, options): the image's soft prompt, the prompt, and the whole search."""
  embeds, prefix_mask = _prefix(module, params, images, ids, mask, qformer_ids, qformer_mask)
  family = llms.family(module.cfg.llm.kind)
  adapter = family.decoder.create(family.module(module.cfg.llm), params["language_model"])
  return generation.generate(adapter, embeds, prefix_mask, rng=rng, **dict(options)).tokens


def tokenize_prompts(tokenizer, prompts: list[str], family: llms.LLMFamily) -> tuple[np.ndarray, np.ndarray]:
  """Prompt ids and mask, [B, L] with L a multiple of PROMPT_BUCKET, padded on the family's side: OPT left
  ("</s>" + prompt), T5 right (prompt + "</s>"). The padding is the tokenizer's pad, or its EOS without one
  (LLaMA's tokenizers ship none; HF users set pad = eos): the mask hides it, any id in the vocabulary would do."""
  out = tokenizer(list(prompts), add_special_tokens=True)
  ids = out["input_ids"]
  length = max(len(x) for x in ids)
  length = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
  pad = tokenizer_lib.pad_id(tokenizer)
  arr = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for i, x in enumerate(ids):
    if family.padding_side == "left":
      arr[i, length - len(x) :], mask[i, length - len(x) :] = x, 1
    else:
      arr[i, : len(x)], mask[i, : len(x)] = x, 1
  return arr, mask


def tokenize_qformer(qformer_tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """The Q-Former's text input (question-conditioned models): ids and mask [B, L], "[CLS] text [SEP]" padded on
  the right to a multiple of PROMPT_BUCKET (at most max_len, the Q-Former's max_position_embeddings)."""
  ids = qformer_tokenizer(list(texts), add_special_tokens=True)["input_ids"]
  longest = max(len(x) for x in ids)
  if longest > max_len:
    raise ValueError(f"A Q-Former text of {longest} tokens exceeds its max_position_embeddings={max_len}.")
  length = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, max_len)
  arr = np.full((len(ids), length), qformer_tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for i, x in enumerate(ids):
    arr[i, : len(x)], mask[i, : len(x)] = x, 1
  return arr, mask


def generate_text(
  module: Blip2LLM,
  params,
  tokenizer,
  images,
  prompts,
  *,
  qformer_tokenizer=None,
  qformer_prompts=None,
  max_new_tokens: int = 30,
  min_new_tokens: int = 0,
  num_beams: int = 1,
  length_penalty: float = 1.0,
  repetition_penalty: float = 1.0,
  do_sample: bool = False,
  top_p: float = 1.0,
  temperature: float = 1.0,
  seed: int = 0,
  sharding=None,
) -> list[str]:
  """images [B, S, S, 3] (CLIP-normalised); prompts: one string, or one per image. -> B generated strings.

  sharding: a batch sharding (e.g. the trainer's) that splits the B rows over its devices and processes, each
  process passing the same images and generating for its own rows; B must be a multiple of its batch shards.
  Without it, inputs follow the parameters (replicated).

  Question-conditioned models (cfg.qformer_text_input): qformer_prompts (one string, or one per image; default
  `prompts`) go to the Q-Former, tokenized by qformer_tokenizer."""
  cfg = module.cfg
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != (cfg.vit.image_size, cfg.vit.image_size, 3):
    raise ValueError(f"Images must be [B, {cfg.vit.image_size}, {cfg.vit.image_size}, 3]; got {images.shape}.")
  prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
  if len(prompts) != len(images):
    raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt, or one per image.")
  family = llms.family(cfg.llm.kind)
  ids, mask = tokenize_prompts(tokenizer, prompts, family)
  qformer_ids = qformer_mask = None
  if qformer_text_input(cfg):
    if qformer_tokenizer is None:
      raise ValueError("This model's Q-Former reads the question (cfg.qformer_text_input): pass qformer_tokenizer.")
    qformer_prompts = prompts if qformer_prompts is None else qformer_prompts
    qformer_prompts = [qformer_prompts] * len(images) if isinstance(qformer_prompts, str) else list(qformer_prompts)
    if len(qformer_prompts) != len(images):
      raise ValueError(f"{len(qformer_prompts)} Q-Former prompts for {len(images)} images.")
    qformer_ids, qformer_mask = tokenize_qformer(
      qformer_tokenizer, qformer_prompts, cfg.qformer.max_position_embeddings
    )
  elif qformer_prompts is not None:
    raise ValueError("qformer_prompts given, but this model's Q-Former has no text side (cfg.qformer_text_input off).")
  if "max_position_embeddings" in cfg.llm:  # learned positions (OPT); T5's relative positions have no limit
    needed = cfg.num_query_tokens + ids.shape[1] + max_new_tokens
    if needed > cfg.llm.max_position_embeddings:
      raise ValueError(
        f"Prompt too long: {cfg.num_query_tokens} queries + {ids.shape[1]} prompt tokens (padded) + "
        f"{max_new_tokens} new tokens exceed the LLM's {cfg.llm.max_position_embeddings} positions."
      )
  options = dict(
    max_new_tokens=max_new_tokens,
    min_new_tokens=min_new_tokens,
    num_beams=num_beams,
    length_penalty=length_penalty,
    repetition_penalty=repetition_penalty,
    do_sample=do_sample,
    top_p=top_p,
    temperature=temperature,
    eos_token_id=family.eos_token_id(tokenizer),
    pad_token_id=tokenizer_lib.pad_id(tokenizer),
  )
  module = layers.frozen_config(module)  # hashable: jit's static argument
  rng = jax.random.PRNGKey(seed) if do_sample else None
  if sharding is not None:
    if len(images) % partitioning.batch_shards(sharding):
      raise ValueError(
        f"{len(images)} images do not split over the {partitioning.batch_shards(sharding)} batch shards of the "
        "sharding: pad the batch to a multiple."
      )
    images, ids, mask = (partitioning.from_host(x, sharding) for x in (images, ids, mask))
    if qformer_ids is not None:
      qformer_ids, qformer_mask = (partitioning.from_host(x, sharding) for x in (qformer_ids, qformer_mask))
  # The batch's mesh axes, for the Pallas attention kernel (layers.kernel_mesh).
  kernel = contextlib.nullcontext() if sharding is None else layers.kernel_mesh(sharding.mesh, sharding.spec[0])
  with kernel:
    tokens = _generate(
      module, params, images, ids, mask, tuple(sorted(options.items())), rng, qformer_ids, qformer_mask
    )
  texts = tokenizer.batch_decode(partitioning.host_copy(tokens), skip_special_tokens=True)
  return [t.strip() for t in texts]


def caption(module, params, tokenizer, images, *, prompt: str = CAPTION_PROMPT, **settings) -> list[str]:
  """Captions (paper: prompt "a photo of", beams 5, 8-30 new tokens); the prompt is not repeated in the output."""
  return generate_text(module, params, tokenizer, images, prompt, **{**CAPTION_SETTINGS, **settings})


def answer(module, params, tokenizer, images, questions, **settings) -> list[str]:
  """Zero-shot VQA with the paper's prompt template (OPT "Question: {} Answer:", T5 "... Short answer:"). A
  question-conditioned model's Q-Former reads the question alone (settings: qformer_tokenizer)."""
  questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
  if any(not q.strip() for q in questions):
    raise ValueError("An empty question: VQA needs a question per image.")
  template = llms.family(module.cfg.llm.kind).vqa_prompt
  if qformer_text_input(module.cfg):
    settings = {"qformer_prompts": [q.strip() for q in questions], **settings}
  return generate_text(
    module, params, tokenizer, images, [template.format(q.strip()) for q in questions], **{**VQA_SETTINGS, **settings}
  )
