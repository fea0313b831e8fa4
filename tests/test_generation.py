"""Generation: token-for-token parity with transformers' `generate` (greedy and beam search, for OPT and T5),
the properties of sampling, and one compile per shape and options.

The HF models are tiny and randomised (std 0.5, norm scales around 1). Their token embeddings double as the
lm_head (OPT ties them; a fresh T5 in transformers 5 does too), which makes a random decoder repeat whichever
token has the longest embedding row; rows rescaled to one norm give varied sequences instead. EOS is a token the
models actually produce, so that some sequences stop early and others run to max_new_tokens.
"""

from flax import struct
from helpers import randomise
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import generation
from blip2_jax import weights
from blip2_jax.models import opt
from blip2_jax.models import t5

VOCAB, WIDTH, MAX_NEW = 64, 32, 10
F32 = np.dtype("float32")
OPT_PAD, T5_PAD = 1, 0
# Prompts of 6, 3, 5 and 1 tokens.
LENGTHS = np.array([6, 3, 5, 1])


def _prompts(pad: int, *, left: bool, seed=0):
  """Token ids [4, 6] and mask, padded on the left (decoder-only batching) or the right (T5's tokenizer)."""
  rng = np.random.default_rng(seed)
  positions = np.arange(LENGTHS.max())[None]
  mask = (positions >= LENGTHS.max() - LENGTHS[:, None]) if left else (positions < LENGTHS[:, None])
  ids = np.where(mask, rng.integers(3, VOCAB, mask.shape), pad)
  return ids, mask.astype(np.int64)


def _until_eos(tokens, eos: int, pad: int):
  """HF's output cut to the generated tokens: everything after the first EOS becomes `pad` (HF's beam search pads
  with EOS when pad is 0), padded to MAX_NEW."""
  tokens = np.asarray(tokens)
  after_eos = np.cumsum(np.cumsum(tokens == eos, axis=1), axis=1) > 1
  tokens = np.where(after_eos, pad, tokens)
  return np.pad(tokens, ((0, 0), (0, MAX_NEW - tokens.shape[1])), constant_values=pad)


def _assert_stops_vary(tokens, pad: int):
  """The EOS choice exercises both endings: some rows stop early, some run to MAX_NEW."""
  last = np.asarray(tokens)[:, -1]
  assert (last == pad).any() and (last != pad).any(), tokens


@pytest.fixture(scope="module")
def opt_models():
  config = transformers.OPTConfig(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    word_embed_proj_dim=WIDTH,
    pad_token_id=OPT_PAD,
  )
  model = randomise(transformers.OPTForCausalLM(config), seed=1, std=0.5, embedding_norm=2.0)
  cfg = opt.config_from_hf(config)
  args = (jnp.zeros((1, 4, WIDTH)), jnp.ones((1, 4), jnp.int32))
  template = jax.eval_shape(lambda: opt.OPTForCausalLM(cfg).init(jax.random.PRNGKey(0), *args))["params"]
  state_dict = model.state_dict()
  params = weights.tree_from_hf(lambda n: state_dict[n].numpy(), opt.weight_map(cfg), template, dtype=F32)
  return model, opt.OPTDecoder.create(opt.OPTForCausalLM(cfg), params)


@pytest.fixture(scope="module")
def t5_models():
  # Flan-T5's block (gated exact GELU), as BLIP-2 runs it.
  config = transformers.T5Config(
    vocab_size=VOCAB,
    d_model=WIDTH,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu",
    tie_word_embeddings=False,
    pad_token_id=T5_PAD,
    decoder_start_token_id=T5_PAD,
  )
  model = randomise(transformers.T5ForConditionalGeneration(config), seed=1, std=0.5, embedding_norm=2.0)
  cfg = t5.config_from_hf(model.config)
  args = (jnp.zeros((1, 4, WIDTH)), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 2), jnp.int32))
  template = jax.eval_shape(lambda: t5.T5ForConditionalGeneration(cfg).init(jax.random.PRNGKey(0), *args))["params"]
  state_dict = model.state_dict()
  params = weights.tree_from_hf(lambda n: state_dict[n].numpy(), t5.weight_map(cfg), template, dtype=F32)
  return model, t5.T5Decoder.create(t5.T5ForConditionalGeneration(cfg), params)


def _opt_inputs(model):
  ids, mask = _prompts(OPT_PAD, left=True)
  with torch.no_grad():
    embeds = model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
  return ids, mask, embeds


# --- parity with HF ------------------------------------------------------------------------------------------

OPT_EOS, T5_EOS = 22, 57  # tokens these models produce mid-sequence
GREEDY = dict(repetition_penalty=1.3, min_new_tokens=2)


def test_opt_greedy_matches_hf(opt_models):
  """Left-padded input_ids: positions come from the mask, and the repetition penalty counts the prompt tokens
  but not the padding, as HF does when it is given input_ids."""
  model, decoder = opt_models
  ids, mask, embeds = _opt_inputs(model)
  theirs = model.generate(
    input_ids=torch.from_numpy(ids),
    attention_mask=torch.from_numpy(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=OPT_EOS,
    pad_token_id=OPT_PAD,
    do_sample=False,
    **GREEDY,
  )
  ours = generation.generate(
    decoder,
    jnp.asarray(embeds),
    jnp.asarray(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=OPT_EOS,
    pad_token_id=OPT_PAD,
    prompt_ids=np.where(mask, ids, -1),
    **GREEDY,
  )
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs[:, ids.shape[1] :], OPT_EOS, OPT_PAD))
  _assert_stops_vary(ours.tokens, OPT_PAD)
  assert ours.scores is None


def test_opt_beam_search_matches_hf(opt_models):
  """BLIP-2's layout: query vectors in front of the left-padded prompt, given as inputs_embeds (so padding sits
  between the queries and the prompt); length penalty and min_new_tokens; HF's sequences_scores."""
  model, decoder = opt_models
  ids, mask, embeds = _opt_inputs(model)
  queries = np.random.default_rng(2).normal(size=(len(ids), 3, WIDTH)).astype(np.float32)
  embeds = np.concatenate([queries, embeds], axis=1)
  mask = np.concatenate([np.ones((len(ids), 3), np.int64), mask], axis=1)
  options = dict(num_beams=3, length_penalty=0.6, min_new_tokens=3)
  theirs = model.generate(
    inputs_embeds=torch.from_numpy(embeds),
    attention_mask=torch.from_numpy(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=OPT_EOS,
    pad_token_id=OPT_PAD,
    do_sample=False,
    return_dict_in_generate=True,
    output_scores=True,
    **options,
  )
  ours = generation.generate(
    decoder,
    jnp.asarray(embeds),
    jnp.asarray(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=OPT_EOS,
    pad_token_id=OPT_PAD,
    **options,
  )
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs.sequences, OPT_EOS, OPT_PAD))
  np.testing.assert_allclose(ours.scores, theirs.sequences_scores, rtol=1e-5)
  _assert_stops_vary(ours.tokens, OPT_PAD)


def _t5_inputs(model):
  ids, mask = _prompts(T5_PAD, left=False)
  with torch.no_grad():
    embeds = model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
  return embeds, mask


def test_t5_greedy_matches_hf(t5_models):
  """Padded encoder input given as inputs_embeds; the decoder starts from decoder_start_token_id."""
  model, decoder = t5_models
  embeds, mask = _t5_inputs(model)
  theirs = model.generate(
    inputs_embeds=torch.from_numpy(embeds),
    attention_mask=torch.from_numpy(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=T5_EOS,
    pad_token_id=T5_PAD,
    do_sample=False,
  )
  ours = generation.generate(
    decoder, jnp.asarray(embeds), jnp.asarray(mask), max_new_tokens=MAX_NEW, eos_token_id=T5_EOS, pad_token_id=T5_PAD
  )
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs[:, 1:], T5_EOS, T5_PAD))
  _assert_stops_vary(ours.tokens, T5_PAD)


def test_t5_beam_search_matches_hf(t5_models):
  """Beam search with a length penalty that favours short answers (BLIP-2's VQA setting), min_new_tokens and a
  repetition penalty (which counts the decoder start token, as HF's decoder input_ids hold it)."""
  model, decoder = t5_models
  embeds, mask = _t5_inputs(model)
  options = dict(num_beams=4, length_penalty=-1.0, min_new_tokens=2, repetition_penalty=1.2)
  theirs = model.generate(
    inputs_embeds=torch.from_numpy(embeds),
    attention_mask=torch.from_numpy(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=T5_EOS,
    pad_token_id=T5_PAD,
    do_sample=False,
    return_dict_in_generate=True,
    output_scores=True,
    **options,
  )
  ours = generation.generate(
    decoder,
    jnp.asarray(embeds),
    jnp.asarray(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=T5_EOS,
    pad_token_id=T5_PAD,
    **options,
  )
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs.sequences[:, 1:], T5_EOS, T5_PAD))
  np.testing.assert_allclose(ours.scores, theirs.sequences_scores, rtol=1e-5)
  _assert_stops_vary(ours.tokens, T5_PAD)


# --- sampling and compilation ---------------------------------------------------------------------------------


def _opt_generate(decoder, model, **options):
  ids, mask, embeds = _opt_inputs(model)
  return generation.generate(
    decoder,
    jnp.asarray(embeds),
    jnp.asarray(mask),
    max_new_tokens=MAX_NEW,
    eos_token_id=OPT_EOS,
    pad_token_id=OPT_PAD,
    prompt_ids=np.where(mask, ids, -1),
    **options,
  ).tokens


def test_sampling_with_a_tiny_top_p_is_greedy(opt_models):
  model, decoder = opt_models
  greedy = _opt_generate(decoder, model, **GREEDY)
  sampled = _opt_generate(decoder, model, do_sample=True, top_p=1e-6, rng=jax.random.PRNGKey(0), **GREEDY)
  np.testing.assert_array_equal(sampled, greedy)


_TRACES = []


@struct.dataclass
class _CountingDecoder:
  """An adapter that counts how often jit traces the generation program (once per compile)."""

  inner: opt.OPTDecoder

  @property
  def start_ids(self):
    return self.inner.start_ids

  def prefill(self, *args):
    _TRACES.append(1)
    return self.inner.prefill(*args)

  def step(self, tokens, state):
    return self.inner.step(tokens, state)


def test_top_k_sampling_is_reproducible_stays_in_the_top_k_and_compiles_once(opt_models):
  model, decoder = opt_models
  ids, mask, _ = _opt_inputs(model)
  options = dict(do_sample=True, top_k=3, temperature=0.7)
  _TRACES.clear()
  first = _opt_generate(_CountingDecoder(decoder), model, rng=jax.random.PRNGKey(1), **options)
  # A new adapter built from an equal module and new arrays of the same shapes reuses the compiled program.
  rebuilt = opt.OPTDecoder.create(
    opt.OPTForCausalLM(decoder.module.cfg.as_configdict()), jax.tree.map(jnp.array, decoder.params)
  )
  again = _opt_generate(_CountingDecoder(rebuilt), model, rng=jax.random.PRNGKey(1), **options)
  other = _opt_generate(_CountingDecoder(decoder), model, rng=jax.random.PRNGKey(2), **options)
  assert len(_TRACES) == 1
  np.testing.assert_array_equal(first, again)
  assert (np.asarray(first) != np.asarray(other)).any()

  # Every sampled token up to EOS is among the 3 most likely under the reference model.
  first = np.asarray(first)
  full_ids = torch.from_numpy(np.concatenate([ids, first], axis=1))
  full_mask = torch.from_numpy(np.concatenate([mask, np.ones_like(first)], axis=1))
  with torch.no_grad():
    logits = model(input_ids=full_ids, attention_mask=full_mask).logits.numpy()
  logits = logits[:, ids.shape[1] - 1 : -1]  # the logits each generated token was sampled from
  third = np.sort(logits, axis=-1)[..., -3]
  chosen = np.take_along_axis(logits, first[..., None], axis=-1)[..., 0]
  generated = np.cumsum(np.cumsum(first == OPT_EOS, axis=1), axis=1) <= 1  # up to and including EOS
  assert (chosen >= third - 1e-4)[generated].all()
  assert (first[~generated] == OPT_PAD).all()


def test_generate_rejects_bad_options(opt_models):
  _, decoder = opt_models
  embeds, mask = jnp.zeros((2, 3, WIDTH)), jnp.ones((2, 3), jnp.int32)
  kw = dict(max_new_tokens=4, eos_token_id=OPT_EOS, pad_token_id=OPT_PAD)
  with pytest.raises(ValueError, match="rng"):
    generation.generate(decoder, embeds, mask, do_sample=True, **kw)
  with pytest.raises(ValueError, match="sampling with beams"):
    generation.generate(decoder, embeds, mask, do_sample=True, num_beams=2, rng=jax.random.PRNGKey(0), **kw)
  with pytest.raises(ValueError, match="prefix_mask"):
    generation.generate(decoder, embeds, mask[:, :2], **kw)
