"""The frozen LLaMA-family decoder (models/llama.py): parity with transformers' LlamaForCausalLM and
Qwen2ForCausalLM, cached decoding, generation token for token, remat, weights, errors.

The HF models are tiny and randomised (std 0.2, norm scales around 1; generation: std 0.5 with the embedding rows
rescaled to one norm, as tests/test_generation.py) so that a wrong transpose or name cannot hide behind zeros.
Parity is max |ours - theirs| / max |theirs| in float32, over the real (unpadded) tokens. HF is given the
position ids its `generate` computes from the mask (cumsum(mask) - 1), which ours count by default. Last, a tiny
HF BLIP-2 with a LLaMA LLM loads into `Blip2.from_pretrained` with HF's logits and exports back (as
tests/test_api.py checks OPT and T5).
"""

import functools
import json

from flax import traverse_util
import flax.linen as nn
from helpers import randomise
from helpers import rel_error
from helpers import word_tokenizer
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import benchmark
from blip2_jax import generation
from blip2_jax import partitioning
from blip2_jax import tasks
from blip2_jax import weights
from blip2_jax.api import Blip2
from blip2_jax.models import llama
from blip2_jax.models import llms
from blip2_jax.models import lora
from configs import stage2_opt

VOCAB, WIDTH, TOL = 100, 32, 1e-5
# Three rows: no padding, left padding (batched generation) and right padding.
MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
# Llama 3.1's scaling (factor, low/high_freq_factor) on an original length of 64. A tuple of pairs: transformers
# fills a rope dict it is given in place, so each use makes its own dict.
LLAMA3_ROPE = (
  ("rope_type", "llama3"),
  ("factor", 8.0),
  ("low_freq_factor", 1.0),
  ("high_freq_factor", 4.0),
  ("original_max_position_embeddings", 64),
)
# model_type -> (config class, model class)
HF = {
  "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
# The configs of the parity tests: LLaMA 2 (plain), grouped-query with tied head and attention biases, Llama-3's
# scaled RoPE (original length 64, so that head_dim 8's wavelengths fall in all three of its bands), and Qwen2
# (q/k/v biases, grouped-query, tied as Qwen2.5's small models).
CONFIGS = {
  "llama": ("llama", {}),
  "llama_gqa_tied_bias": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)),
  "llama3_rope": ("llama", dict(num_key_value_heads=2, max_position_embeddings=128, rope_scaling=dict(LLAMA3_ROPE))),
  "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
}


def _hf_config(model_type, vocab=VOCAB, **overrides):
  kw = dict(
    vocab_size=vocab,
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
  )
  config = HF[model_type][0](**{**kw, **overrides})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  return config


def _hf_model(config, seed=0, **randomise_kw):
  torch.manual_seed(seed)
  return randomise(HF[config.model_type][1](config), seed, **randomise_kw)


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _abstract(cfg):
  args = (jnp.zeros((1, 4, cfg.hidden_size)), jnp.ones((1, 4), jnp.int32))
  return jax.eval_shape(lambda: llama.LlamaForCausalLM(cfg).init(jax.random.PRNGKey(0), *args))["params"]


def _load(cfg, state_dict):
  return weights.tree_from_hf(state_dict, llama.weight_map(cfg), _abstract(cfg), dtype=np.dtype(np.float32))


@functools.lru_cache(maxsize=None)
def _fns(cfg_json):
  """Jitted embed / forward / cached forward of one config (cached, so each compiles once per shape)."""
  model = llama.LlamaForCausalLM(ml_collections.ConfigDict(json.loads(cfg_json)))
  embed = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="embed"))
  forward = jax.jit(lambda p, x, mask: model.apply({"params": p}, x, mask)[0])
  cached = jax.jit(
    lambda p, x, mask, pos, cache, index: model.apply(
      {"params": p}, x, mask, positions=pos, cache=cache, cache_index=index
    )
  )
  return embed, forward, cached


def _jitted(cfg):
  return _fns(cfg.to_json())


@functools.lru_cache(maxsize=None)
def _loaded(name):
  """(HF model, our config, our parameters) of CONFIGS[name]."""
  model_type, overrides = CONFIGS[name]
  hf = _hf_model(_hf_config(model_type, **overrides))
  cfg = llama.config_from_hf(hf.config)
  return hf, cfg, _load(cfg, _state_dict(hf))


def _ids(seed=0):
  return np.random.default_rng(seed).integers(3, VOCAB, size=MASK.shape)


def _generate_positions(mask):
  """HF generate's position ids: cumsum(mask) - 1, padding 0."""
  return torch.from_numpy(np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0))


# --- parity with transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf_from_ids_with_padding(name):
  hf, cfg, params = _loaded(name)
  embed, forward, _ = _jitted(cfg)
  ids = _ids()
  ours = forward(params, embed(params, jnp.asarray(ids)), jnp.asarray(MASK))
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK), position_ids=_generate_positions(MASK)
    ).logits
    # HF's forward without position ids counts 0 .. T-1 over the padding too: a shift per row, which RoPE's
    # relative angles do not see when the padding is all on one side.
    default = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK)).logits
  assert ours.dtype == jnp.float32
  assert rel_error(ours, theirs, MASK.astype(bool)) < TOL
  assert rel_error(ours, default, MASK.astype(bool)) < TOL


def test_configs_take_the_family_differences_from_hf():
  """What the parity configs are meant to exercise is really there (so the parity test covers it)."""
  assert _loaded("llama")[1].num_key_value_heads == 4 and not _loaded("llama")[1].tie_word_embeddings
  gqa = _loaded("llama_gqa_tied_bias")[1]
  assert (gqa.num_key_value_heads, gqa.tie_word_embeddings, llama.attention_biases(gqa)) == (2, True, (True, True))
  qwen = _loaded("qwen2")[1]
  assert llama.attention_biases(qwen) == (True, False) and qwen.model_type == "qwen2"
  scaled = _loaded("llama3_rope")[1]
  assert scaled.rope_parameters.rope_type == "llama3"
  default = ml_collections.ConfigDict(dict(scaled.to_dict(), rope_parameters=dict(rope_theta=10000.0)))
  # head_dim 8: one frequency kept, one interpolated, two slowed by `factor`.
  ratio = llama.rope_frequencies(default) / llama.rope_frequencies(scaled)
  assert ratio[0] == 1.0 and 1.0 < ratio[1] < 8.0 and np.allclose(ratio[2:], 8.0)


def test_logits_match_hf_from_embeddings_in_blip2_layout():
  """HF's inputs_embeds path, the one BLIP-2 takes: query vectors, then a left-padded prompt (so the padding sits
  between the queries and the text), positions counted over the real tokens as HF generate counts them."""
  hf, cfg, params = _loaded("llama3_rope")
  _, forward, _ = _jitted(cfg)
  embeds = 0.5 * np.random.default_rng(1).normal(size=(3, 11, WIDTH)).astype(np.float32)
  mask = np.concatenate([np.ones((3, 3), np.int64), MASK], axis=1)
  ours = forward(params, jnp.asarray(embeds), jnp.asarray(mask))
  with torch.no_grad():
    theirs = hf(
      inputs_embeds=torch.from_numpy(embeds),
      attention_mask=torch.from_numpy(mask),
      position_ids=_generate_positions(mask),
    ).logits
  assert rel_error(ours, theirs, mask.astype(bool)) < TOL


def test_logits_range_gives_those_positions_logits():
  _, cfg, params = _loaded("qwen2")
  model = llama.LlamaForCausalLM(cfg)
  embeds = jnp.asarray(0.5 * np.random.default_rng(2).normal(size=MASK.shape + (WIDTH,)), jnp.float32)
  full = model.apply({"params": params}, embeds, jnp.asarray(MASK))[0]
  part = model.apply({"params": params}, embeds, jnp.asarray(MASK), logits_range=(3, 7))[0]
  assert part.shape == (MASK.shape[0], 4, VOCAB)
  np.testing.assert_allclose(part, full[:, 3:7], rtol=1e-6, atol=1e-6)


# --- KV cache ----------------------------------------------------------------------------------------------


def _prefill_then_steps(cfg, params, cached, x, prefill, slots):
  b, n = MASK.shape
  positions = jnp.asarray(np.cumsum(MASK, axis=1) * MASK - 1, jnp.int32)
  key_mask = jnp.asarray(np.pad(MASK, ((0, 0), (0, slots - n))))
  cache = llama.init_cache(cfg, b, slots, jnp.float32)
  logits, cache = cached(params, x[:, :prefill], key_mask, positions[:, :prefill], cache, jnp.int32(0))
  steps = [logits]
  for t in range(prefill, n):
    logits, cache = cached(params, x[:, t : t + 1], key_mask, positions[:, t : t + 1], cache, jnp.int32(t))
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


def test_prefill_then_token_steps_match_full_forward():
  """A 5-token prefill, then one token at a time through one compiled step, grouped-query heads (the cache holds
  the 2 key/value heads only); every real position's logits equal the full forward's."""
  _, cfg, params = _loaded("llama_gqa_tied_bias")
  embed, forward, cached = _jitted(cfg)
  b, n = MASK.shape
  x = embed(params, jnp.asarray(_ids()))
  full = forward(params, x, jnp.asarray(MASK))
  stepped, cache = _prefill_then_steps(cfg, params, cached, x, 5, n + 3)
  assert cached._cache_size() == 2  # the prefill and one step program for every step
  assert cache["k"].shape == (b, cfg.num_hidden_layers, n + 3, 2, cfg.head_dim)
  assert rel_error(stepped, full, MASK.astype(bool)) < TOL


# --- generation ---------------------------------------------------------------------------------------------

GEN_VOCAB, MAX_NEW, PAD = 64, 10, 0
LENGTHS = np.array([6, 3, 5, 1])  # left-padded prompts of 6, 3, 5 and 1 tokens
# model_type -> (overrides, an EOS these models produce mid-sequence)
GEN = {
  "llama": (dict(num_key_value_heads=2, max_position_embeddings=128, rope_scaling=dict(LLAMA3_ROPE)), 19),
  "qwen2": (dict(num_key_value_heads=2, tie_word_embeddings=True), 21),
}


@functools.lru_cache(maxsize=None)
def _gen_models(model_type):
  overrides, eos = GEN[model_type]
  config = _hf_config(model_type, vocab=GEN_VOCAB, pad_token_id=PAD, **overrides)
  hf = _hf_model(config, seed=1, std=0.5, embedding_norm=2.0)
  cfg = llama.config_from_hf(config)
  return hf, llama.LlamaDecoder.create(llama.LlamaForCausalLM(cfg), _load(cfg, _state_dict(hf))), eos


def _prompts():
  positions = np.arange(LENGTHS.max())[None]
  mask = positions >= LENGTHS.max() - LENGTHS[:, None]
  ids = np.where(mask, np.random.default_rng(0).integers(3, GEN_VOCAB, mask.shape), PAD)
  return ids, mask.astype(np.int64)


def _until_eos(tokens, eos: int):
  """HF's generated tokens with everything after the first EOS as PAD, padded to MAX_NEW."""
  tokens = np.asarray(tokens)
  tokens = np.where(np.cumsum(np.cumsum(tokens == eos, axis=1), axis=1) > 1, PAD, tokens)
  return np.pad(tokens, ((0, 0), (0, MAX_NEW - tokens.shape[1])), constant_values=PAD)


def _assert_stops_vary(tokens):
  last = np.asarray(tokens)[:, -1]
  assert (last == PAD).any() and (last != PAD).any(), tokens


@pytest.mark.parametrize("model_type", sorted(GEN))
def test_greedy_matches_hf(model_type):
  """Left-padded input_ids through our decoder adapter and blip2_jax.generation: HF's tokens, with the repetition
  penalty counting the prompt tokens but not the padding."""
  hf, decoder, eos = _gen_models(model_type)
  ids, mask = _prompts()
  options = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, repetition_penalty=1.3, min_new_tokens=2)
  theirs = hf.generate(
    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **options
  )
  with torch.no_grad():
    embeds = hf.get_input_embeddings()(torch.from_numpy(ids)).numpy()
  ours = generation.generate(
    decoder, jnp.asarray(embeds), jnp.asarray(mask), prompt_ids=np.where(mask, ids, -1), **options
  )
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs[:, ids.shape[1] :], eos))
  _assert_stops_vary(ours.tokens)


@pytest.mark.parametrize("model_type", sorted(GEN))
def test_beam_search_matches_hf(model_type):
  """BLIP-2's layout: query vectors in front of the left-padded prompt, as inputs_embeds; length penalty and
  min_new_tokens; HF's sequences_scores."""
  hf, decoder, eos = _gen_models(model_type)
  ids, mask = _prompts()
  with torch.no_grad():
    embeds = hf.get_input_embeddings()(torch.from_numpy(ids)).numpy()
  queries = np.random.default_rng(2).normal(size=(len(ids), 3, WIDTH)).astype(np.float32)
  embeds = np.concatenate([queries, embeds], axis=1)
  mask = np.concatenate([np.ones((len(ids), 3), np.int64), mask], axis=1)
  options = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, num_beams=3, length_penalty=0.6)
  theirs = hf.generate(
    inputs_embeds=torch.from_numpy(embeds),
    attention_mask=torch.from_numpy(mask),
    do_sample=False,
    min_new_tokens=3,
    return_dict_in_generate=True,
    output_scores=True,
    **options,
  )
  ours = generation.generate(decoder, jnp.asarray(embeds), jnp.asarray(mask), min_new_tokens=3, **options)
  np.testing.assert_array_equal(ours.tokens, _until_eos(theirs.sequences, eos))
  np.testing.assert_allclose(ours.scores, theirs.sequences_scores, rtol=1e-5)
  _assert_stops_vary(ours.tokens)


# --- remat and low precision -------------------------------------------------------------------------------


def test_remat_policies_give_identical_logits_and_gradients():
  """Stage 2 backpropagates through the frozen LLM into the Q-Former: recomputation may only reorder float
  arithmetic, never change the logits or the input gradient."""
  hf, _, params = _loaded("llama_gqa_tied_bias")
  x = jnp.asarray(0.5 * np.random.default_rng(3).normal(size=MASK.shape + (WIDTH,)), jnp.float32)
  weight = jnp.asarray(np.random.default_rng(4).normal(size=MASK.shape + (VOCAB,)), jnp.float32)
  results = {}
  for policy in ("none", *llama.REMAT_POLICIES):
    model = llama.LlamaForCausalLM(llama.config_from_hf(hf.config, remat_policy=policy))
    loss = lambda e, model=model: jnp.sum(weight * model.apply({"params": params}, e, jnp.asarray(MASK))[0])
    results[policy] = jax.jit(jax.value_and_grad(loss))(x)
  for policy, (value, grad) in results.items():
    assert rel_error(value, results["none"][0]) < 1e-6, policy
    assert rel_error(grad, results["none"][1]) < 1e-6, policy


def test_bfloat16_compute_returns_float32_logits():
  hf, cfg, params = _loaded("llama")
  ids, mask = jnp.asarray(_ids()), jnp.asarray(MASK)
  embed, forward, _ = _jitted(cfg)
  reference = forward(params, embed(params, ids), mask)
  embed, forward, _ = _jitted(llama.config_from_hf(hf.config, dtype="bfloat16"))
  frozen = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)  # as the caller freezes the LLM
  x = embed(frozen, ids)
  assert x.dtype == jnp.bfloat16
  ours = forward(frozen, x, mask)
  assert ours.dtype == jnp.float32
  assert rel_error(ours, reference, MASK.astype(bool)) < 0.05


# --- parameters and weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_every_parameter_has_logical_axes(name):
  for path, leaf in traverse_util.flatten_dict(_abstract(_loaded(name)[1]), sep="/").items():
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path
    assert (leaf.names[0] == "layers") == path.startswith("layers/"), path


@pytest.mark.parametrize("name", ["llama", "llama_gqa_tied_bias", "qwen2"])
def test_weights_round_trip_exactly(name):
  """Our tree -> HF tensors gives every tensor of HF's state_dict back bit for bit (a tied lm_head.weight is the
  embedding matrix itself, stored once), and those tensors -> our tree gives the tree back."""
  hf, cfg, params = _loaded(name)
  state_dict = _state_dict(hf)
  back = dict(weights.hf_tensors(params, llama.weight_map(cfg)))
  tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  assert set(back) == set(state_dict) - tied
  if tied:
    np.testing.assert_array_equal(state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"])
  for key, value in back.items():
    np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
  again = traverse_util.flatten_dict(_load(cfg, back), sep="/")
  for path, value in traverse_util.flatten_dict(params, sep="/").items():
    np.testing.assert_array_equal(again[path], value, err_msg=path)


def test_registry_builds_both_families_from_a_config_dict():
  """The registry's llm_config reads a config.json dict (old-style rope_theta / rope_scaling fields too) and the
  family entry builds the same module."""
  hf = _hf_config("llama").to_dict()
  del hf["rope_parameters"]  # as an older config.json spells it:
  cfg = llms.llm_config(dict(hf, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE)))
  assert cfg.kind == "llama" and cfg.rope_parameters.to_dict() == dict(LLAMA3_ROPE, rope_theta=500000.0)
  assert isinstance(llms.family("qwen2").module(llms.llm_config(_hf_config("qwen2").to_dict())), llama.LlamaForCausalLM)


# --- errors a user can cause -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "model_type, overrides, field",
  [
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "rope_type='linear'"),
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_type='yarn'"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("llama", dict(num_key_value_heads=3), "num_key_value_heads=3"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "use_sliding_window=True"),
  ],
)
def test_unsupported_config_is_one_line_error(model_type, overrides, field):
  with pytest.raises(ValueError, match=r"^[^\n]*" + field + r"[^\n]*$"):
    llama.config_from_hf(_hf_config(model_type, **overrides))


def test_bad_arguments_are_one_line_errors():
  _, cfg, params = _loaded("llama")
  with pytest.raises(ValueError, match="remat_policy='everything'"):
    llama.config_from_hf(_hf_config("llama"), remat_policy="everything")
  with pytest.raises(ValueError, match="model_type='opt'"):
    llama.config_from_hf({"model_type": "opt"})
  model = llama.LlamaForCausalLM(cfg)
  x, mask = jnp.zeros((1, 2, WIDTH)), jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="needs both `positions`"):
    model.apply({"params": params}, x, mask, cache=llama.init_cache(cfg, 1, 8, jnp.float32), cache_index=0)
  with pytest.raises(ValueError, match=r"without a cache it must be \[batch, tokens\]"):
    model.apply({"params": params}, x, mask)


# --- BLIP-2 with a LLaMA LLM (HF Blip2ForConditionalGeneration, as tests/test_api.py for OPT) ---------------

BLIP2_QUERIES, BLIP2_IMAGE, IMAGE_TOKEN = 4, 32, 63  # HF >= 4.47 puts num_query_tokens <image> ids first


@pytest.fixture(scope="module")
def blip2_llama(tmp_path_factory):
  """A tiny random HF BLIP-2 whose LLM is a grouped-query LLaMA with an untied head (Vicuna's layout), saved with
  save_pretrained, and our Blip2 loaded from that directory onto one device."""
  vision = dict(
    hidden_size=WIDTH,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=BLIP2_IMAGE,
    patch_size=8,
    layer_norm_eps=1e-6,
    qkv_bias=True,
  )
  qformer = dict(
    hidden_size=WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    cross_attention_frequency=2,
    encoder_hidden_size=WIDTH,
    vocab_size=40,
    use_qformer_text_input=False,
    max_position_embeddings=16,
  )
  text = dict(_hf_config("llama", vocab=64, num_key_value_heads=2, pad_token_id=0).to_dict(), model_type="llama")
  config = transformers.Blip2Config(
    vision_config=vision,
    qformer_config=qformer,
    text_config=text,
    num_query_tokens=BLIP2_QUERIES,
    image_token_index=IMAGE_TOKEN,
  )
  torch.manual_seed(0)
  hf = randomise(transformers.Blip2ForConditionalGeneration(config), 0)
  path = tmp_path_factory.mktemp("blip2_llama")
  hf.save_pretrained(path)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return hf, Blip2.from_pretrained(path, mesh=mesh)


def _blip2_inputs(left_pad: bool):
  x = np.random.default_rng(0).normal(size=(3, BLIP2_IMAGE, BLIP2_IMAGE, 3)).astype(np.float32)
  lengths = np.array([7, 5, 2])[:, None]
  pos = np.arange(7)[None]
  mask = ((pos >= 7 - lengths) if left_pad else (pos < lengths)).astype(np.int64)
  ids = np.random.default_rng(1).integers(3, 60, size=(3, 7)) * mask
  return x, ids, mask


def _hf_blip2_logits(hf, x, ids, mask, left_pad: bool):
  """HF's logits over [queries; text] for our inputs: <image> placeholders in front of the text. With left padding
  (the padding between the queries and the text) HF's forward is given generate's position ids."""
  hf_ids = np.concatenate([np.full((len(ids), BLIP2_QUERIES), IMAGE_TOKEN), ids], axis=1)
  hf_mask = np.concatenate([np.ones((len(ids), BLIP2_QUERIES), np.int64), mask], axis=1)
  extra = dict(position_ids=_generate_positions(hf_mask)) if left_pad else {}
  with torch.no_grad():
    return hf(
      pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      input_ids=torch.from_numpy(hf_ids),
      attention_mask=torch.from_numpy(hf_mask),
      **extra,
    ).logits, hf_mask.astype(bool)


@pytest.mark.parametrize("left_pad", [False, True])
def test_blip2_llama_logits_match_hf(blip2_llama, left_pad):
  """Right padding (training texts: HF's own positions) and left padding (generation prompts)."""
  hf, ours = blip2_llama
  assert ours.kind == "llama" and ours.cfg.llm.num_key_value_heads == 2
  x, ids, mask = _blip2_inputs(left_pad)
  theirs, real = _hf_blip2_logits(hf, x, ids, mask, left_pad)
  assert rel_error(ours.lm_logits(x, ids, mask), theirs, real) < TOL


def test_blip2_llama_export_reloads_in_transformers_with_the_same_logits(blip2_llama, tmp_path):
  hf, ours = blip2_llama
  ours.save_pretrained(tmp_path / "out")
  again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  assert not again.config.text_config.tie_word_embeddings
  x, ids, mask = _blip2_inputs(left_pad=False)
  theirs, real = _hf_blip2_logits(hf, x, ids, mask, left_pad=False)
  reloaded, _ = _hf_blip2_logits(again, x, ids, mask, left_pad=False)
  assert rel_error(reloaded, theirs, real) < TOL


# Greedy, and beam search with a length penalty (no repetition penalty: see tests/test_qformer_question.py).
BLIP2_SEARCHES = {"greedy": dict(num_beams=1), "beam": dict(num_beams=3, length_penalty=0.6)}


@pytest.mark.parametrize("search", sorted(BLIP2_SEARCHES))
def test_blip2_llama_generation_matches_hf(blip2_llama, search):
  """`Blip2.generate` (prompts "<s>" + prompt, left-padded behind the queries; EOS "</s>") gives HF's
  Blip2ForConditionalGeneration.generate tokens, token for token (each word of the tokenizer is one token). The
  tokenizer has no pad token, as LLaMA's: the prompts' padding and the finished rows' filler are EOS, as HF's."""
  hf, ours = blip2_llama
  ours.tokenizer = word_tokenizer("llama", 64, pad=False)
  x = _blip2_inputs(left_pad=True)[0][:2]
  prompts = ["w7 w9 w30", "w12"]
  texts = ours.generate(x, prompts, max_new_tokens=6, **BLIP2_SEARCHES[search])
  want = []
  for i, prompt in enumerate(prompts):  # one row at a time: no padding on HF's side
    ids = ours.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
      out = hf.generate(
        pixel_values=torch.from_numpy(x[i : i + 1].transpose(0, 3, 1, 2).copy()),
        input_ids=torch.tensor([[IMAGE_TOKEN] * BLIP2_QUERIES + ids]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=ours.tokenizer.eos_token_id,
        pad_token_id=ours.tokenizer.eos_token_id,
        **BLIP2_SEARCHES[search],
      )
    want.append(ours.tokenizer.decode(out[0, BLIP2_QUERIES + len(ids) :], skip_special_tokens=True).strip())
  assert all(want) and texts == want


def test_lora_adapters_merge_into_the_same_function():
  """LoRA on an attention and an MLP projection (PEFT names): nonzero adapters change the logits, and
  lora.merged folds them into the kernels of the plain model with the same logits."""
  _, cfg, params = _loaded("qwen2")
  adapted_cfg = ml_collections.ConfigDict(
    dict(cfg.to_dict(), lora=dict(rank=2, alpha=4.0, targets=("k_proj", "up_proj")))
  )
  model = llama.LlamaForCausalLM(adapted_cfg)
  x = jnp.asarray(0.5 * np.random.default_rng(5).normal(size=MASK.shape + (WIDTH,)), jnp.float32)
  init = model.init(jax.random.PRNGKey(0), x, jnp.asarray(MASK))["params"]
  flat = traverse_util.flatten_dict(nn.unbox(init), sep="/")
  assert {p for p in flat if "lora" in p} == {
    f"layers/{m}/lora_{ab}" for m in ("self_attn/k_proj", "up_proj") for ab in "ab"
  }
  rng = np.random.default_rng(6)
  adapters = {p: 0.3 * rng.normal(size=v.shape).astype(np.float32) for p, v in flat.items() if "lora" in p}
  adapted = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params, sep="/"), **adapters}, sep="/")
  ours = model.apply({"params": adapted}, x, jnp.asarray(MASK))[0]
  plain = llama.LlamaForCausalLM(cfg).apply({"params": params}, x, jnp.asarray(MASK))[0]
  merged = llama.LlamaForCausalLM(cfg).apply({"params": lora.merged(adapted, adapted_cfg)}, x, jnp.asarray(MASK))[0]
  assert rel_error(plain, ours, MASK.astype(bool)) > 1e-3
  assert rel_error(merged, ours, MASK.astype(bool)) < TOL


# --- the real tokenizers' gaps: LLaMA has no pad token, Qwen2 no BOS -------------------------------------------


def test_prompts_of_a_tokenizer_without_pad_are_padded_with_its_eos():
  """LLaMA's tokenizers ship without a pad token (HF users set pad = eos or unk): the left padding of a batch of
  prompts, which the mask hides, is then EOS."""
  tok = word_tokenizer("llama", 64, pad=False)
  assert tok.pad_token_id is None
  ids, mask = tasks.tokenize_prompts(tok, ["w7 w9 w30", "w12"], llms.family("llama"))
  np.testing.assert_array_equal(ids, [[2, 2, 2, 2, 1, 7, 9, 30], [2, 2, 2, 2, 2, 2, 1, 12]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize("model_type", sorted(HF))
def test_benchmark_prompt_and_options_of_configs_without_bos_or_pad(model_type):
  """The benchmark's tokenizer-free prompt and greedy options from transformers' defaults: LlamaConfig has no
  pad (then EOS, as HF's generate pads), Qwen2Config no BOS (then none in the prompt; its tokenizer adds none)
  and no EOS (then none ends a sequence: -1, no token)."""
  c = stage2_opt.get_config("tiny")
  c.init.llm_weights = ""  # config.model.llm's sizes, transformers' defaults for the special ids
  c.model.llm = llms.llm_config(_hf_config(model_type, vocab=64).to_dict())
  ids, mask = benchmark.prompt_ids(c, 2)
  bos = [1] if model_type == "llama" else []
  assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, len(bos) + benchmark.PROMPT_LENGTH - 1)
  assert list(ids[0, : len(bos)]) == bos and (ids[:, len(bos) :] >= 4).all() and (ids == ids[:1]).all()
  options = dict(benchmark.search_options(c, 3))
  eos, pad = (2, 2) if model_type == "llama" else (-1, 0)
  assert (options["eos_token_id"], options["pad_token_id"]) == (eos, pad)
