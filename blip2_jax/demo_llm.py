"""Tiny pretrained LLMs for the stage-2 demo, made here because nothing can be downloaded.

BLIP-2's stage 2 feeds the Q-Former's output to a *frozen, pretrained* LLM. What stage 2 relies on is that the LLM
already writes the language and already reads what precedes the text it writes: the Q-Former's 32 outputs sit in
front of the caption, and the Q-Former only has to learn to say there, in the LLM's embedding space, what the
image shows. A random LLM would make the demo test something else (the Q-Former teaching a language model from
scratch), and so would a tiny LLM pretrained on captions alone: it learns to ignore whatever comes before a
caption (measured: stage 2 then converges to fluent, image-independent captions, exact match 0).

So `make_demo_llm` pretrains one, text only, on the training captions of the demo data, every example in the
layout of a stage-2 example: a *context window* of CONTEXT_SLOTS = 32 tokens where the queries go (in front of
"</s>" and the prompt for OPT, at the start of the encoder input for T5) holding the caption's own words, then
random words to fill it, then the caption to predict. A tiny OPT learns this as a causal LM, a tiny Flan-T5-like
encoder-decoder as BLIP-2's prefix LM (the two LLM families of BLIP-2): they learn the caption grammar ("large red
circle top left, small blue square top right, ...") and to write the caption their context describes, ignoring
the filler. The window never holds an image or anything computed from one. The result is a Hugging Face
directory (config.json, model.safetensors, tokenizer), so it is loaded exactly as a real OPT or Flan-T5 would be,
by us and by transformers.

Questions too (for VQA fine-tuning, as a real LLM knows BLIP-2's VQA prompts): for OPT, QA_FRACTION of the rows
keep the caption's window but follow it with a synthetic_vqa question about that scene in BLIP-2's VQA prompt and
its answer ("</s>Question: what colour is the object at the top left? Answer: red\n"). The questions are drawn
afresh each step from the scenes of the training captions (data/synthetic_vqa.py's generator, never an image). The
tiny LLM learns the format at once, the answers slowly: see DEFAULT_STEPS and docs/demo.md. The T5 code path takes
questions too ("Question: ... Short answer:" to the encoder, the answer from the decoder) but its share is 0.

The tokenizer is word level: one token per caption, question and answer word, ",", "?" and ":" their own tokens,
plus the captioning prompt's words ("a photo of"), the VQA prompts' ("question", "short", "answer") and, for OPT,
"\n", BLIP-2's end of caption for OPT. Special tokens and their ids are those of OPT
(`<s>` 0, `<pad>` 1, `</s>` 2 as bos, put in front of every text, `<unk>` 3) or of T5 (`<pad>` 0, `</s>` 1 appended,
`<unk>` 2), so code written for the real tokenizers needs no exceptions.
"""

import json
import logging
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import safetensors.numpy
import tokenizers
from tokenizers import decoders
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
import transformers

from blip2_jax import losses as losses_lib
from blip2_jax import optim
from blip2_jax import weights
from blip2_jax.data import pipeline
from blip2_jax.data import synthetic_shapes
from blip2_jax.data import synthetic_vqa
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import llms
from blip2_jax.models import opt
from blip2_jax.models import t5

log = logging.getLogger(__name__)

KINDS = ("opt", "t5")
PROMPT = "a photo of"  # BLIP-2's captioning prompt
NEWLINE = "\n"  # BLIP-2's end of caption for OPT (id 50118 in the real vocabulary)
WORD_START = "\u2581"  # marks a token that follows a space, as in SentencePiece, so decoding restores the spaces
SPECIAL_TOKENS = {"opt": ("<s>", "<pad>", "</s>", "<unk>"), "t5": ("<pad>", "</s>", "<unk>")}
# What a finished directory holds; the tokenizer files and demo_llm.json (how it was made) are written with it.
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "demo_llm.json")

# Sizes: tiny, so that pretraining takes seconds on a CPU.
OPT_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, max_position_embeddings=128)
# Flan-T5 as BLIP-2 runs it: gated FFN with the exact GELU, an lm_head of its own.
T5_SIZES = dict(
  d_model=64,
  d_kv=16,
  num_heads=4,
  d_ff=128,
  num_layers=2,
  num_decoder_layers=2,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
)
# Measured on the demo's 20,000 captions (docs/demo.md): with half its rows questions, OPT writes every held-out
# caption from its window after ~200 steps; of the questions it answers those about one object's colour, shape or
# size best, and counts and positions barely above their priors (they need far more steps than the demo affords).
DEFAULT_STEPS = {"opt": 1000, "t5": 800}
BATCH_SIZE = {"opt": 16, "t5": 32}  # rows of one caption or one question each
# The share of each batch's rows that are a question and its answer (synthetic_vqa's templates, about the scene of
# a training caption) instead of a caption, so that the demo LLM knows BLIP-2's VQA prompt, as a real pretrained LLM
# does. T5 gets none: with half its rows questions its 800 steps no longer taught it to read the captions' windows,
# and with a quarter it answered no better than its priors (colour 0.00) while the stage-2 T5 demo fell from CIDEr-D
# 5.0-5.5 to 4.46 (docs/demo.md). Its tokenizer still has the questions' words, so the VQA recipe's T5 variants run.
QA_FRACTION = {"opt": 0.5, "t5": 0.0}
# The random init's weights (std 0.02) are multiplied by this: at width 64, std 0.02 leaves attention near uniform
# (as in the stage-1 demo's Q-Former, docs/demo.md). Measured with half the rows questions: OPT at std 0.02 had not
# learned to read its window after 1,200 steps, at 0.07 it does after ~100, and at 0.14 it learns the question
# lookups sooner still. T5 keeps 0.02 (measured: 0.07 with half its rows questions reads no caption either).
INIT_SCALE = {"opt": 7.0, "t5": 1.0}
PUNCTUATION = (",", "?", ":")  # tokens of their own, not after a space (decoding writes "left?", "answer:")
# T5: the fraction of examples that put the prompt before the whole caption, the others a cut caption's first
# part (BLIP-2's prefix LM). OPT's always have the prompt, as the demo's stage-2 examples do.
PROMPT_FRACTION = 0.25
CONTEXT_SLOTS = 32  # BLIP-2's number of query tokens
LR, WARMUP_FRACTION, WEIGHT_DECAY = 3e-3, 0.1, 0.01


# --- tokenizer ---------------------------------------------------------------------------------------------------


def make_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
  """The word-level tokenizer of the demo LLM `kind` ('opt' or 't5'); `len()` of it is the model's vocab size."""
  _check_kind(kind)
  specials = SPECIAL_TOKENS[kind]
  words = synthetic_shapes.vocabulary()
  # The captioning prompt, the questions' and answers' words and both families' VQA prompts: the two tokenizers
  # have the same words.
  prompts = [PROMPT, *(family.vqa_prompt.format("") for family in llms.FAMILIES.values())]
  for word in [w for text in prompts for w in text.lower().replace(":", " :").split()] + synthetic_vqa.vocabulary():
    if word not in words:
      words.append(word)
  vocab = {token: i for i, token in enumerate(specials)}
  if kind == "opt":
    vocab[NEWLINE] = len(vocab)
  for word in words:
    vocab[word if word in PUNCTUATION else WORD_START + word] = len(vocab)

  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  # Canonical spacing first ("a ,b" -> "a, b"), so every word starts with a space and gets its WORD_START form.
  tok.normalizer = normalizers.Sequence(
    [
      normalizers.Lowercase(),
      normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      normalizers.Replace(tokenizers.Regex(r" ?, ?"), ", "),
      normalizers.Replace(tokenizers.Regex(r" ?\? ?"), "? "),
      normalizers.Replace(tokenizers.Regex(r" ?: ?"), ": "),
      normalizers.Strip(),
    ]
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Metaspace(WORD_START, prepend_scheme="always"), pre_tokenizers.Punctuation()]
  )
  tok.decoder = decoders.Metaspace(WORD_START, prepend_scheme="always")
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
  if kind == "opt":
    # Not normalized, so it is cut out of the text before the normalizer would turn it into a space.
    tok.add_tokens([tokenizers.AddedToken(NEWLINE, special=False, normalized=False)])
    eos = bos = "</s>"
    tok.post_processor = processors.TemplateProcessing(  # OPT's tokenizer puts "</s>" in front of each text
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
    )
  else:
    eos, bos = "</s>", None
    tok.post_processor = processors.TemplateProcessing(  # T5's appends it
      single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, vocab[eos])]
    )
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=bos,
    eos_token=eos,
    unk_token="<unk>",
    pad_token="<pad>",
    model_max_length=OPT_SIZES["max_position_embeddings"] if kind == "opt" else 512,
  )


# --- the demo LLM ------------------------------------------------------------------------------------------------


def make_demo_llm(kind: str, out_dir, data_cfg, *, steps: int | None = None, seed: int = 0) -> str:
  """Pretrains the tiny LLM `kind` ('opt' or 't5') on the captions of `data_cfg`'s training split and writes it to
  `out_dir` in the Hugging Face layout; returns out_dir. A complete directory already there is reused as it is.

  `data_cfg` is a config's `data` section (name, data_dir, builder_kwargs, train_split), `steps` defaults to
  DEFAULT_STEPS[kind]. The same arguments give the same weights.
  """
  _check_kind(kind)
  out_dir = os.fspath(out_dir)
  present = [f for f in FILES if os.path.exists(os.path.join(out_dir, f))]
  if len(present) == len(FILES):
    with open(os.path.join(out_dir, "demo_llm.json")) as f:
      made = json.load(f)
    if made["kind"] != kind:
      raise ValueError(f"{out_dir} holds a demo {made['kind']} LLM, not a {kind} one; give another out_dir.")
    log.info(
      "Reusing the demo %s LLM in %s (%d steps, seed %d, final loss %.3f).",
      kind,
      out_dir,
      made["steps"],
      made["seed"],
      made["final_loss"],
    )
    return out_dir
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    missing = [f for f in FILES if f not in present]
    raise ValueError(
      f"{out_dir} is not empty but not a complete demo LLM (no {', '.join(missing)}); delete it or "
      "give another out_dir."
    )

  steps = DEFAULT_STEPS[kind] if steps is None else steps
  if steps < 1:
    raise ValueError(f"make_demo_llm needs steps >= 1; got {steps}.")
  tok = make_tokenizer(kind)
  captions = _training_captions(data_cfg, tok)
  start = time.time()
  train = _train_opt if kind == "opt" else _train_t5
  hf_config, cfg, params, losses = train(tok, captions, steps, seed)
  final_loss = float(np.mean(losses[-max(1, steps // 10) :]))  # of the last 10% of the steps: one step's is noisy
  log.info(
    "Pretrained the demo %s LLM on %d captions: %d steps in %.1f s, loss %.3f -> %.3f.",
    kind,
    len(captions),
    steps,
    time.time() - start,
    losses[0],
    final_loss,
  )

  # Written next to out_dir and renamed into place, so an interrupted run never leaves a directory to reuse.
  tmp = f"{os.path.abspath(out_dir)}.incomplete"
  shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
  os.makedirs(tmp)
  hf_config.save_pretrained(tmp)
  if kind == "t5":
    _write_flan_t5_tying(os.path.join(tmp, "config.json"))
  weight_map = (opt if kind == "opt" else t5).weight_map(cfg)
  tensors = {name: np.asarray(value, np.float32) for name, value in weights.hf_tensors(params, weight_map)}
  safetensors.numpy.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  tok.save_pretrained(tmp)
  with open(os.path.join(tmp, "demo_llm.json"), "w") as f:
    json.dump(
      dict(
        kind=kind,
        data=data_cfg.name,
        num_captions=len(captions),
        steps=steps,
        seed=seed,
        final_loss=final_loss,
        qa_fraction=QA_FRACTION[kind],
      ),
      f,
      indent=2,
    )
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty (checked above)
  os.replace(tmp, out_dir)
  log.info("Wrote the demo %s LLM to %s.", kind, out_dir)
  return out_dir


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"Unknown demo LLM kind {kind!r}; choose one of {', '.join(KINDS)}.")


def _training_captions(data_cfg, tok) -> list[str]:
  """The cleaned captions of the training split, each checked to be covered by the tokenizer. synthetic_vqa has
  no captions: its training scenes' captions, worked out from its generation arguments (no image is read)."""
  if data_cfg.name == synthetic_vqa.SyntheticVqa.name:
    kwargs = dict(data_cfg.builder_kwargs or {})
    defaults = synthetic_vqa.SyntheticVqaConfig(name="defaults")
    args = {k: kwargs.get(k, getattr(defaults, k)) for k in ("num_train", "num_test", "num_objects", "seed")}
    scenes = synthetic_vqa.split_scenes(**args)
    if data_cfg.train_split not in scenes:
      raise ValueError(
        f"The demo LLM reads a whole split of synthetic_vqa ({', '.join(scenes)}), not {data_cfg.train_split!r}."
      )
    num_objects = args["num_objects"]
    captions = [
      synthetic_shapes.caption(synthetic_shapes.combination(int(s), num_objects)) for s in scenes[data_cfg.train_split]
    ]
  else:
    source = pipeline.get_source(data_cfg, data_cfg.train_split)
    captions = []
    for i in range(len(source)):
      text = source[i]["caption"]
      captions.append(tokenizer_lib.clean_caption(text.decode("utf-8") if isinstance(text, bytes) else text))
  if not captions:
    raise ValueError(f"The {data_cfg.train_split!r} split of {data_cfg.name!r} has no examples to pretrain on.")
  ids = tok(captions).input_ids
  for caption, row in zip(captions, ids):
    if tok.unk_token_id in row:
      raise ValueError(
        f"Caption {caption!r} of {data_cfg.name!r} has words outside the demo vocabulary: the demo "
        "LLM is made for synthetic_shapes captions only."
      )
  return captions


def _optimizer_config(steps: int) -> ml_collections.ConfigDict:
  """The demo's AdamW in the fields of a config's `optimizer` section (see blip2_jax.optim): warmup from 0 over
  the first WARMUP_FRACTION of the steps, then cosine decay to LR / 10; gradients clipped to global norm 1."""
  return ml_collections.ConfigDict(
    dict(
      lr=LR,
      warmup_steps=int(WARMUP_FRACTION * steps),
      warmup_lr=0.0,
      min_lr=LR / 10,
      b1=0.9,
      b2=0.98,
      weight_decay=WEIGHT_DECAY,
      grad_clip=1.0,
    )
  )


def _decay_mask(params):
  """Weight decay on every leaf of more than one dimension. The LLM's layers are scanned, so its per-layer biases
  and norm scales are 2-D and decayed too (optim.decay_mask exempts them by name); the demo LLMs were made, and
  their demo results measured, with this mask."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _scale_init(params, factor: float):
  """The random weights times `factor` (LayerNorm scales and biases, constant at init, unchanged)."""
  return jax.tree.map(lambda p: p * factor if float(jnp.std(p)) > 0 else p, params)


def _fit(loss_fn, params, next_batch, steps: int) -> tuple[dict, list[float]]:
  """`steps` AdamW steps of loss_fn(params, *batch), each on a new batch from `next_batch()`; returns the trained
  parameters and the loss of every step."""
  tx, _ = optim.make_optimizer(_optimizer_config(steps), steps, mask=_decay_mask)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, *next_batch())
    losses.append(loss)
  return params, [float(x) for x in losses]


# --- the context window ------------------------------------------------------------------------------------------


def _context_window(rng, caption_ids, fillers):
  """CONTEXT_SLOTS token ids: the caption's ids, then random ids from `fillers`."""
  fill = rng.choice(fillers, size=CONTEXT_SLOTS - len(caption_ids))
  return np.concatenate([caption_ids, fill]).astype(np.int32)


def _word_ids(tok) -> np.ndarray:
  """The ids of the words and punctuation (no special tokens, no "\n"): the context window's filler."""
  specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(NEWLINE)}
  return np.array(sorted(i for i in tok.get_vocab().values() if i not in specials), np.int32)


# --- questions ---------------------------------------------------------------------------------------------------


def vqa_prompt(kind: str, question: str) -> str:
  """The text before the answer: BLIP-2's zero-shot VQA template of the family `kind` with `question` in it."""
  return llms.family(kind).vqa_prompt.format(question)


def random_questions(captions: list[str], n: int, rng: np.random.Generator) -> list[tuple[int, str, str]]:
  """`n` random (caption index, question, answer): a question of synthetic_vqa's about the scene of a random
  caption, its type drawn uniformly among those the scene can be asked, and its true answer."""
  out = []
  for i in rng.integers(len(captions), size=n):
    scene = synthetic_vqa.parse_caption(captions[i])
    types = [t for t in synthetic_vqa.QUESTION_TYPES if synthetic_vqa.can_ask(scene, t)]
    out.append((int(i), *synthetic_vqa.random_question(scene, types[int(rng.integers(len(types)))], rng)))
  return out


def _num_questions(kind: str, batch_size: int) -> int:
  """Rows of a batch that are a question (the first ones; the others are captions)."""
  return round(QA_FRACTION[kind] * batch_size)


# --- OPT: causal LM after a context window ------------------------------------------------------------------------


def _train_opt(tok, captions, steps, seed):
  hf_config = transformers.OPTConfig(
    vocab_size=len(tok),
    word_embed_proj_dim=OPT_SIZES["hidden_size"],
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    layerdrop=0.0,
    pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    architectures=["OPTForCausalLM"],
    **OPT_SIZES,
  )
  cfg = opt.config_from_hf(hf_config)
  model = opt.OPTForCausalLM(cfg)
  params = nn.unbox(
    jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8, cfg.hidden_size)), jnp.ones((1, 8), jnp.int32))[
      "params"
    ]
  )
  params = _scale_init(params, INIT_SCALE["opt"])

  def logits(params, inputs):
    embeds = model.apply({"params": params}, inputs, method="embed")
    return model.apply({"params": params}, embeds, jnp.ones_like(inputs))[0]

  def loss_fn(params, tokens, labels):
    return losses_lib.lm_loss(logits(params, tokens[:, :-1]), tokens[:, 1:], labels[:, 1:])

  batches = _opt_batches(tok, captions, BATCH_SIZE["opt"], np.random.default_rng([seed, 1]))
  params, losses = _fit(loss_fn, params, batches, steps)
  return hf_config, cfg, params, losses


def _opt_batches(tok, captions, batch_size, rng):
  """Rows [context window] "</s>" PROMPT caption "\n" (right-padded), and a mask of the tokens to predict (the
  caption and "\n"): the layout of a stage-2 demo example (data.prompt is PROMPT) with the caption's words where
  the queries go. The first QA_FRACTION["opt"] of the rows are a question about the scene of the caption in their
  window instead: [context window] "</s>" "Question: {question} Answer:" answer "\n", predicting answer and "\n"."""
  newline, bos, pad = tok.convert_tokens_to_ids(NEWLINE), tok.bos_token_id, tok.pad_token_id
  encode = lambda texts: [np.asarray(row, np.int32) for row in tok(texts, add_special_tokens=False).input_ids]
  ids = encode(captions)
  prompt = np.asarray(tok(PROMPT, add_special_tokens=False).input_ids, np.int32)
  if max(len(row) for row in ids) > CONTEXT_SLOTS:
    raise ValueError(f"A caption is longer than the demo LLM's context window of {CONTEXT_SLOTS} tokens.")
  longest_qa = max(len(row) for row in encode([vqa_prompt("opt", q) for q in synthetic_vqa.all_questions()])) + 2
  length = CONTEXT_SLOTS + 1 + max(len(prompt) + max(len(row) for row in ids), longest_qa) + 1
  length = -(-length // 8) * 8 + 1  # + 1: inputs and labels are the row shifted by one
  fillers = _word_ids(tok)
  num_questions = _num_questions("opt", batch_size)

  def next_batch():
    tokens = np.full((batch_size, length), pad, np.int32)
    labels = np.zeros((batch_size, length), np.int32)
    qa = random_questions(captions, num_questions, rng)
    rows = [(i, np.concatenate([[bos], prompt]), ids[i]) for i in rng.integers(len(ids), size=batch_size - len(qa))]
    if qa:
      prompts, answers = encode([vqa_prompt("opt", q) for _, q, _ in qa]), encode([a for _, _, a in qa])
      rows = [(i, np.concatenate([[bos], p]), a) for (i, _, _), p, a in zip(qa, prompts, answers)] + rows
    for row, (i, before, target) in enumerate(rows):
      head = np.concatenate([_context_window(rng, ids[i], fillers), before])
      text = np.concatenate([target, [newline]])
      tokens[row, : len(head) + len(text)] = np.concatenate([head, text])
      labels[row, len(head) : len(head) + len(text)] = 1
    return jnp.asarray(tokens), jnp.asarray(labels)

  return next_batch


# --- T5: prefix LM -----------------------------------------------------------------------------------------------


def _train_t5(tok, captions, steps, seed):
  hf_config = transformers.T5Config(
    vocab_size=len(tok),
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
    pad_token_id=tok.pad_token_id,
    eos_token_id=tok.eos_token_id,
    decoder_start_token_id=tok.pad_token_id,
    architectures=["T5ForConditionalGeneration"],
    **T5_SIZES,
  )
  cfg = t5.config_from_hf(hf_config, has_lm_head=True)
  model = t5.T5ForConditionalGeneration(cfg)
  # The longest text either side can get: a whole caption (or a prompt) with its "</s>", rounded up.
  prompts = [PROMPT, *(vqa_prompt("t5", q) for q in synthetic_vqa.all_questions())]
  length = -(-max(len(row) for row in tok([*captions, *prompts]).input_ids) // 8) * 8
  zeros = jnp.zeros((1, length), jnp.int32)
  params = nn.unbox(
    jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, length, cfg.d_model)), zeros + 1, zeros)["params"]
  )
  params = _scale_init(params, INIT_SCALE["t5"])

  def loss_fn(params, enc_ids, enc_mask, labels, label_mask):
    embeds = model.apply({"params": params}, enc_ids, method="embed")
    decoder_ids = jnp.pad(labels[:, :-1], ((0, 0), (1, 0)), constant_values=cfg.decoder_start_token_id)
    logits = model.apply({"params": params}, embeds, enc_mask, decoder_ids)
    return losses_lib.lm_loss(logits, labels, label_mask)

  batches = _t5_batches(tok, captions, length, BATCH_SIZE["t5"], np.random.default_rng([seed, 1]))
  params, losses = _fit(loss_fn, params, batches, steps)
  return hf_config, cfg, params, losses


def _t5_batches(tok, captions, length, batch_size, rng):
  """Prefix-LM pairs as BLIP-2 trains Flan-T5: a caption cut at a random word boundary, the first part to the
  encoder, the rest (with "</s>") to be predicted; for PROMPT_FRACTION of them the prompt, then the whole caption.
  The first QA_FRACTION["t5"] of the pairs are a question about the scene of the caption in their window instead:
  "Question: {question} Short answer:" to the encoder, the answer to be predicted. The encoder input starts with
  the caption's context window, where the queries go in stage 2."""
  encode = lambda texts: tok(texts, padding="max_length", max_length=length, return_tensors="np")

  ids = [np.asarray(row[:-1], np.int32) for row in tok(captions).input_ids]  # without the trailing "</s>"
  fillers = _word_ids(tok)
  num_questions = _num_questions("t5", batch_size)

  def next_batch():
    qa = random_questions(captions, num_questions, rng)
    prefixes, suffixes = [vqa_prompt("t5", q) for _, q, _ in qa], [a for _, _, a in qa]
    chosen = rng.integers(len(captions), size=batch_size - len(qa))
    for i in chosen:
      # The draws in data.pipeline.train_preprocess's order: whether to use the prompt, then where to cut.
      if rng.random() < PROMPT_FRACTION:
        prefix, suffix = PROMPT, captions[i]
      else:
        prefix, suffix = pipeline.split_prefix_lm(captions[i], rng)
      prefixes.append(prefix)
      suffixes.append(suffix)
    enc, dec = encode(prefixes), encode(suffixes)
    windows = np.stack([_context_window(rng, ids[i], fillers) for i in [*(i for i, _, _ in qa), *chosen]])
    enc_ids = np.concatenate([windows, enc.input_ids], axis=1)
    enc_mask = np.concatenate([np.ones_like(windows), enc.attention_mask], axis=1)
    return tuple(jnp.asarray(a, jnp.int32) for a in (enc_ids, enc_mask, dec.input_ids, dec.attention_mask))

  return next_batch


def _write_flan_t5_tying(path):
  """Sets tie_word_embeddings=False in a T5 config.json, as released Flan-T5 configs say it.

  transformers >= 5 writes True for every T5 (it unties when the checkpoint stores its own `lm_head.weight`, as
  ours does), but a reader of the file alone, `t5.config_from_hf` of a dict included, takes True for T5 1.0's tied
  and scaled head and would silently use the wrong one."""
  with open(path) as f:
    config = json.load(f)
  config["tie_word_embeddings"] = False
  with open(path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
