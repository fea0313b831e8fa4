"""Text generation from BLIP-2's frozen LLMs: greedy, beam search and sampling, each compiled whole with jit.

`generate(decoder, prefix_embeds, prefix_mask, ...)` runs the prefill and the whole decoding loop (a
lax.while_loop that stops once every sequence is finished) in one jitted program, compiled once per distinct
(shapes, options). A decoder adapter (`opt.OPTDecoder`, `t5.T5Decoder`, named by the LLM registry
models/llms.py) turns a frozen LLM into two functions:
`prefill(prefix_embeds, prefix_mask, max_new_tokens) -> (logits [B, V], state)` and
`step(tokens [N], state) -> (logits [N, V], state)`, where every leaf of `state` has the batch first, so beam
search reorders a whole decoding state with one gather on axis 0; its `start_ids` are the tokens HF's input_ids
hold before the first new one, besides the prompt (T5's decoder start token), for the repetition penalty. Beam
search runs the prefill once per sequence and copies its state to the beams.

BLIP-2 puts its 32 projected query outputs in front of the prompt's token embeddings; for OPT that prefix is the
decoder's input, left-padded (the last prefix position must be a real token), for T5 it is the encoder's input.

Semantics are those of transformers 5.24 `generate` (utils.py `_sample`, `_beam_search` and its helpers;
logits_process.py), matched token for token:
- Logits processors run in HF's order: repetition penalty, min-new-tokens, then (sampling only) temperature,
  top-k, top-p. Greedy and sampling process the raw float32 logits; beam search processes log_softmax(logits).
- Repetition penalty: a score s of a token already present becomes s / p if s > 0, else s * p (no
  renormalisation). "Present" means HF's `input_ids`: the tokens generated so far, plus the prompt tokens when
  the caller passed input_ids (here `prompt_ids`; left padding is not counted, as HF skips the leading masked
  positions), plus T5's decoder_start_token_id, which HF keeps at the head of its decoder input_ids.
- min_new_tokens: EOS scores -inf while fewer than min_new_tokens tokens have been generated.
- Greedy and sampling: once a sequence emits EOS every later token is pad_token_id.
- Beam search keeps the top 2 * num_beams continuations over all beams (2 = one EOS token + 1); a candidate
  "hits a stop" if its token is EOS or it reaches max_new_tokens. Hitting candidates are dropped from the
  running beams (score - 1e9); those among the top num_beams candidates become finished hypotheses scored
  sum(log-probs) / L ** length_penalty, where L counts the *generated* tokens only, EOS included: neither the
  prompt of a decoder-only model nor T5's decoder start token (older transformers counted the prompt). The
  num_beams best hypotheses are kept.
- early_stopping=False (HF's default): a batch item stops changing once all num_beams hypotheses are finished
  and the best running beam, scored at its current length, cannot beat the worst of them; the loop ends when no
  batch item can improve or every candidate hit a stop. The result is the best hypothesis and its score (HF's
  `sequences_scores`).
- Output: [B, max_new_tokens] generated tokens only, pad_token_id after EOS. HF returns the prompt (T5: the
  decoder start token) in front, crops at the longest sequence, and in beam search pads with
  `pad_token_id or eos_token_id`, which is eos_token_id when pad_token_id == 0 (T5); we always pad with
  pad_token_id.
Sampling with beams (do_sample and num_beams > 1) and early_stopping=True/"never" are not implemented.
"""

import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# HF's "very large negative" score for candidates that must not be chosen; added in float32 exactly as HF does.
_NEG = -1.0e9


class Generation(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] int32, pad_token_id after EOS
  scores: jax.Array | None  # beam search: [B] float32, HF's sequences_scores; None for greedy and sampling


# --- logits processors (HF's order) -------------------------------------------------------------------------


class _Options(NamedTuple):
  """Everything static about one generate call; jit compiles once per distinct value (and shapes)."""

  max_new_tokens: int
  min_new_tokens: int
  num_beams: int
  length_penalty: float
  do_sample: bool
  temperature: float
  top_p: float
  top_k: int
  repetition_penalty: float
  eos_token_id: int
  pad_token_id: int


def _process(scores, seen, t, o: _Options):
  """Repetition penalty, then min-new-tokens; `t` tokens have been generated so far."""
  if o.repetition_penalty != 1.0:
    penalized = jnp.where(scores < 0, scores * o.repetition_penalty, scores / o.repetition_penalty)
    scores = jnp.where(seen, penalized, scores)
  if o.min_new_tokens > 0:
    is_eos = jnp.arange(scores.shape[-1]) == o.eos_token_id
    scores = jnp.where(is_eos & (t < o.min_new_tokens), -jnp.inf, scores)
  return scores


def _warp(scores, o: _Options):
  """Temperature, top-k, top-p, as HF applies them when sampling."""
  if o.temperature != 1.0:
    scores = scores / o.temperature
  if o.top_k:
    kth = lax.top_k(scores, min(o.top_k, scores.shape[-1]))[0][:, -1:]
    scores = jnp.where(scores < kth, -jnp.inf, scores)  # ties with the k-th score survive, as in HF
  if o.top_p < 1.0:
    order = jnp.argsort(scores, axis=-1)  # ascending
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= 1 - o.top_p).at[:, -1].set(False)  # the most likely token always stays
    drop = jnp.zeros_like(drop).at[jnp.arange(drop.shape[0])[:, None], order].set(drop)
    scores = jnp.where(drop, -jnp.inf, scores)
  return scores


def _initial_seen(prompt_ids, start_ids, batch: int, vocab: int, o: _Options):
  """[batch, vocab] bool: the tokens HF's repetition penalty already counts; None when there is no penalty."""
  if o.repetition_penalty == 1.0:
    return None
  seen = jnp.zeros((batch, vocab), bool)
  if start_ids:
    seen = seen.at[:, jnp.asarray(start_ids)].set(True)
  if prompt_ids is not None:
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], prompt_ids.shape)
    # Negative entries (padding) and ids the lm_head cannot produce are dropped by the scatter.
    seen = seen.at[rows, jnp.where(prompt_ids < 0, vocab, prompt_ids)].set(True, mode="drop")
  return seen


def _mark_seen(seen, tokens):
  return None if seen is None else seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


# --- greedy and sampling ------------------------------------------------------------------------------------


class _Carry(NamedTuple):
  t: jax.Array  # tokens generated so far
  tokens: jax.Array  # [B, T]
  finished: jax.Array  # [B] emitted EOS
  seen: jax.Array | None  # [B, V]
  state: Any


def _greedy_or_sample(decoder, prefix_embeds, prefix_mask, prompt_ids, rng, o: _Options) -> Generation:
  logits, state = decoder.prefill(prefix_embeds, prefix_mask, o.max_new_tokens)
  b, vocab = logits.shape

  def pick(logits, c: _Carry) -> _Carry:
    scores = _process(logits, c.seen, c.t, o)
    if o.do_sample:
      token = jax.random.categorical(jax.random.fold_in(rng, c.t), _warp(scores, o), axis=-1)
    else:
      token = jnp.argmax(scores, axis=-1)
    token = jnp.where(c.finished, o.pad_token_id, token).astype(jnp.int32)
    return _Carry(
      c.t + 1,
      c.tokens.at[:, c.t].set(token),
      c.finished | (token == o.eos_token_id),
      _mark_seen(c.seen, token),
      c.state,
    )

  def body(c: _Carry) -> _Carry:
    logits, state = decoder.step(c.tokens[:, c.t - 1], c.state)
    return pick(logits, c._replace(state=state))

  c = _Carry(
    jnp.int32(0),
    jnp.full((b, o.max_new_tokens), o.pad_token_id, jnp.int32),
    jnp.zeros((b,), bool),
    _initial_seen(prompt_ids, decoder.start_ids, b, vocab, o),
    state,
  )
  c = lax.while_loop(lambda c: (c.t < o.max_new_tokens) & ~c.finished.all(), body, pick(logits, c))
  return Generation(c.tokens, None)


# --- beam search ----------------------------------------------------------------------------------------------


class _Beams(NamedTuple):
  t: jax.Array  # tokens generated so far
  running_tokens: jax.Array  # [B, K, T]
  running_scores: jax.Array  # [B, K] summed log-probs
  tokens: jax.Array  # [B, K, T] finished hypotheses, best first
  scores: jax.Array  # [B, K] their length-penalised scores (-1e9: empty slot)
  finished: jax.Array  # [B, K] slot holds a hypothesis
  improvable: jax.Array  # [B] HF's is_early_stop_heuristic_unsatisfied
  all_stopped: jax.Array  # every candidate of the last step hit a stop
  seen: jax.Array | None  # [B * K, V]
  state: Any  # decoder state, [B * K, ...]


def _take(x, index):
  """x[b, index[b, j], ...] for [B, K, ...] x and [B, J] index."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(decoder, prefix_embeds, prefix_mask, prompt_ids, o: _Options) -> Generation:
  k, steps = o.num_beams, o.max_new_tokens
  logits, state = decoder.prefill(prefix_embeds, prefix_mask, steps)
  b, vocab = logits.shape
  # Every beam starts as a copy of the prefill; only beam 0 competes in the first step (the others score -1e9).
  logits, state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), (logits, state))
  seen = _initial_seen(
    None if prompt_ids is None else jnp.repeat(prompt_ids, k, axis=0), decoder.start_ids, b * k, vocab, o
  )
  # L ** length_penalty for L = 1..T, computed in double and rounded once, as HF's Python float is.
  penalty = jnp.asarray(np.arange(1, steps + 1, dtype=np.float64) ** o.length_penalty, jnp.float32)
  is_top_k = jnp.arange(2 * k) < k

  def update(logits, c: _Beams) -> _Beams:
    log_probs = _process(jax.nn.log_softmax(logits, axis=-1), c.seen, c.t, o)
    log_probs = (log_probs.reshape(b, k, vocab) + c.running_scores[:, :, None]).reshape(b, k * vocab)
    top_scores, top_index = lax.top_k(log_probs, 2 * k)
    parent, token = top_index // vocab, top_index % vocab
    top_tokens = _take(c.running_tokens, parent).at[:, :, c.t].set(token)
    stopped = (token == o.eos_token_id) | (c.t + 1 >= steps)

    # The best num_beams candidates that did not stop go on.
    alive_scores = top_scores + stopped.astype(jnp.float32) * _NEG
    keep = lax.top_k(alive_scores, k)[1]
    running_tokens, running_scores = _take(top_tokens, keep), _take(alive_scores, keep)

    # Stopped candidates among the top num_beams compete with the finished hypotheses.
    just_finished = stopped & is_top_k
    candidate = top_scores / penalty[c.t]
    candidate = candidate + (~c.improvable[:, None]).astype(jnp.float32) * _NEG
    candidate = candidate + (~just_finished).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([c.scores, candidate], axis=1)
    best = lax.top_k(merged_scores, k)[1]
    tokens = _take(jnp.concatenate([c.tokens, top_tokens], axis=1), best)
    finished = _take(jnp.concatenate([c.finished, just_finished], axis=1), best)
    scores = _take(merged_scores, best)

    # Could the best running beam, at its current length, still beat the worst hypothesis?
    best_possible = running_scores[:, :1] / penalty[c.t]
    worst = jnp.where(finished, scores.min(axis=1, keepdims=True), _NEG)
    improvable = c.improvable & (best_possible > worst).any(axis=1)

    rows = (_take(parent, keep) + jnp.arange(b)[:, None] * k).reshape(-1)
    state, seen = jax.tree.map(lambda x: x[rows], (c.state, c.seen))
    seen = _mark_seen(seen, running_tokens[:, :, c.t].reshape(-1))
    return _Beams(
      c.t + 1, running_tokens, running_scores, tokens, scores, finished, improvable, stopped.all(), seen, state
    )

  def body(c: _Beams) -> _Beams:
    logits, state = decoder.step(c.running_tokens[:, :, c.t - 1].reshape(-1), c.state)
    return update(logits, c._replace(state=state))

  empty = jnp.full((b, k, steps), o.pad_token_id, jnp.int32)
  c = _Beams(
    t=jnp.int32(0),
    running_tokens=empty,
    running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),
    tokens=empty,
    scores=jnp.full((b, k), _NEG, jnp.float32),
    finished=jnp.zeros((b, k), bool),
    improvable=jnp.ones((b,), bool),
    all_stopped=jnp.bool_(False),
    seen=seen,
    state=state,
  )
  c = lax.while_loop(lambda c: c.improvable.any() & ~c.all_stopped, body, update(logits, c))
  return Generation(c.tokens[:, 0], c.scores[:, 0])


# --- entry point --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("o",))
def _generate(decoder, prefix_embeds, prefix_mask, prompt_ids, rng, o: _Options) -> Generation:
  if o.num_beams > 1:
    return _beam_search(decoder, prefix_embeds, prefix_mask, prompt_ids, o)
  return _greedy_or_sample(decoder, prefix_embeds, prefix_mask, prompt_ids, rng, o)


def generate(
  decoder,
  prefix_embeds,
  prefix_mask,
  *,
  max_new_tokens: int,
  eos_token_id: int,
  pad_token_id: int,
  min_new_tokens: int = 0,
  num_beams: int = 1,
  length_penalty: float = 1.0,
  do_sample: bool = False,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  repetition_penalty: float = 1.0,
  prompt_ids=None,
  rng=None,
) -> Generation:
  """Generates up to `max_new_tokens` tokens after the prefix; see the module docstring for the exact rules.

  decoder: an adapter (a model file's decoder, e.g. `opt.OPTDecoder.create(module, params)`). prefix_embeds [B, P, D]
  and prefix_mask [B, P] (1 = real): OPT's whole input, left-padded; T5's encoder input. prompt_ids [B, L]
  int: the prompt's token ids for the repetition penalty, as HF counts the input_ids it is given (negative
  entries, e.g. padding, are skipped). rng: a PRNG key, needed when do_sample. Returns `Generation(tokens,
  scores)`: tokens [B, max_new_tokens] int32, pad_token_id after EOS; scores [B] for beam search.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1.")
  if num_beams < 1:
    raise ValueError(f"generate: num_beams={num_beams} must be at least 1.")
  if do_sample and num_beams > 1:
    raise ValueError(
      "generate: sampling with beams (do_sample=True, num_beams > 1) is not supported; sample "
      "with num_beams=1 or search with do_sample=False."
    )
  if do_sample and rng is None:
    raise ValueError("generate: do_sample=True needs a PRNG key in `rng`.")
  if not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0 and repetition_penalty > 0):
    raise ValueError(
      f"generate: need temperature > 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0; got "
      f"{temperature}, {top_p}, {top_k}, {repetition_penalty}."
    )
  if prefix_embeds.ndim != 3 or prefix_mask.shape != prefix_embeds.shape[:2]:
    raise ValueError(
      f"generate: prefix_embeds {prefix_embeds.shape} must be [B, P, D] and prefix_mask {prefix_mask.shape} [B, P]."
    )
  if prompt_ids is not None:
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids is not None and (prompt_ids.ndim != 2 or prompt_ids.shape[0] != prefix_embeds.shape[0]):
    raise ValueError(f"generate: prompt_ids {prompt_ids.shape} must be [B, L] with B = {prefix_embeds.shape[0]}.")
  o = _Options(
    max_new_tokens=max_new_tokens,
    min_new_tokens=min_new_tokens,
    num_beams=num_beams,
    length_penalty=float(length_penalty),
    do_sample=do_sample,
    temperature=float(temperature),
    top_p=float(top_p),
    top_k=top_k,
    repetition_penalty=float(repetition_penalty),
    eos_token_id=eos_token_id,
    pad_token_id=pad_token_id,
  )
  return _generate(
    decoder, prefix_embeds, jnp.asarray(prefix_mask, jnp.int32), prompt_ids, rng if do_sample else None, o
  )
