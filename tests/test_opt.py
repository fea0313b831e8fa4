"""The frozen OPT decoder: parity with transformers' OPTForCausalLM, cached decoding, remat, weights, errors.

The HF model is tiny and randomised (std 0.2, LayerNorm scales around 1) so that a wrong transpose or name cannot
hide behind zeros. Parity is max |ours - theirs| / max |theirs| in float32, over the real (unpadded) tokens: the
outputs at padded positions are meaningless in both implementations.
"""

import functools
import json

from flax import traverse_util
import flax.linen as nn
from helpers import randomise
from helpers import rel_error
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import weights
from blip2_jax.models import opt

VOCAB, WIDTH, MAX_POS, TOL = 100, 32, 64, 1e-5
# Three rows: no padding, left padding (batched generation) and right padding.
MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])


def _hf_config(**overrides):
  kw = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    max_position_embeddings=MAX_POS,
    word_embed_proj_dim=WIDTH,
  )
  return transformers.OPTConfig(**{**kw, **overrides})


def _hf_model(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.OPTForCausalLM(config)
  return randomise(model, seed)


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _abstract(cfg):
  args = (jnp.zeros((1, 4, cfg.hidden_size)), jnp.ones((1, 4), jnp.int32))
  return jax.eval_shape(lambda: opt.OPTForCausalLM(cfg).init(jax.random.PRNGKey(0), *args))["params"]


def _load(cfg, state_dict):
  return weights.tree_from_hf(state_dict.__getitem__, opt.weight_map(cfg), _abstract(cfg), dtype=np.dtype(np.float32))


@functools.lru_cache(maxsize=None)
def _fns(cfg_json):
  """Jitted embed / forward / cached forward of one config (cached, so each compiles once per shape)."""
  model = opt.OPTForCausalLM(ml_collections.ConfigDict(json.loads(cfg_json)))
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


@pytest.fixture(scope="module")
def hf_opt():
  return _hf_model(_hf_config())


@pytest.fixture(scope="module")
def cfg(hf_opt):
  return opt.config_from_hf(hf_opt.config)


@pytest.fixture(scope="module")
def params(cfg, hf_opt):
  return _load(cfg, _state_dict(hf_opt))


def _ids(seed=0):
  return np.random.default_rng(seed).integers(3, VOCAB, size=MASK.shape)


# --- parity with transformers ------------------------------------------------------------------------------


def test_logits_match_hf_from_ids_with_padding(hf_opt, cfg, params):
  embed, forward, _ = _jitted(cfg)
  ids = _ids()
  ours = forward(params, embed(params, jnp.asarray(ids)), jnp.asarray(MASK))
  with torch.no_grad():
    theirs = hf_opt(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK)).logits
  assert ours.dtype == jnp.float32
  assert rel_error(ours, theirs, MASK.astype(bool)) < TOL


def test_logits_match_hf_from_embeddings(hf_opt, cfg, params):
  """HF's inputs_embeds path, the one BLIP-2 takes with its projected queries prepended."""
  _, forward, _ = _jitted(cfg)
  embeds = 0.5 * np.random.default_rng(1).normal(size=MASK.shape + (WIDTH,)).astype(np.float32)
  ours = forward(params, jnp.asarray(embeds), jnp.asarray(MASK))
  with torch.no_grad():
    theirs = hf_opt(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(MASK)).logits
  assert rel_error(ours, theirs, MASK.astype(bool)) < TOL


def test_logits_range_gives_those_positions_logits(cfg, params):
  """The stage-2 loss asks for the text positions' logits only: the same values as the full forward's there."""
  model = opt.OPTForCausalLM(cfg)
  embeds = jnp.asarray(0.5 * np.random.default_rng(2).normal(size=MASK.shape + (WIDTH,)), jnp.float32)
  full = model.apply({"params": params}, embeds, jnp.asarray(MASK))[0]
  part = model.apply({"params": params}, embeds, jnp.asarray(MASK), logits_range=(3, 7))[0]
  assert part.shape == (MASK.shape[0], 4, VOCAB)
  np.testing.assert_allclose(part, full[:, 3:7], rtol=1e-6, atol=1e-6)


def test_gelu_without_biases_matches_hf():
  hf = _hf_model(_hf_config(activation_function="gelu", enable_bias=False), seed=1)
  cfg = opt.config_from_hf(hf.config.to_dict())  # the dict form too
  state_dict = _state_dict(hf)
  params = _load(cfg, state_dict)
  assert not any("bias" in path and "norm" not in path for path in traverse_util.flatten_dict(params, sep="/"))
  embed, forward, _ = _jitted(cfg)
  ids = _ids(2)
  ours = forward(params, embed(params, jnp.asarray(ids)), jnp.asarray(MASK))
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(MASK)).logits
  assert rel_error(ours, theirs, MASK.astype(bool)) < TOL


# --- KV cache ----------------------------------------------------------------------------------------------


def test_prefill_then_token_steps_match_full_forward(cfg, params):
  """A 5-token prefill, then one token at a time through one compiled step; every real position's logits equal
  the full forward's. The cache has spare slots at the end that the key mask leaves invalid."""
  embed, forward, cached = _jitted(cfg)
  b, n = MASK.shape
  prefill, slots = 5, n + 3
  x = embed(params, jnp.asarray(_ids()))
  full = forward(params, x, jnp.asarray(MASK))
  positions = jnp.asarray(np.cumsum(MASK, axis=1) * MASK - 1, jnp.int32)
  key_mask = jnp.asarray(np.pad(MASK, ((0, 0), (0, slots - n))))
  cache = opt.init_cache(cfg, b, slots, jnp.float32)
  logits, cache = cached(params, x[:, :prefill], key_mask, positions[:, :prefill], cache, jnp.int32(0))
  steps = [logits]
  for t in range(prefill, n):
    logits, cache = cached(params, x[:, t : t + 1], key_mask, positions[:, t : t + 1], cache, jnp.int32(t))
    steps.append(logits)
  assert cached._cache_size() == 2  # the prefill and one step program for every step
  assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, opt.init_cache(cfg, b, slots, jnp.float32))
  assert rel_error(jnp.concatenate(steps, axis=1), full, MASK.astype(bool)) < TOL


def test_cache_reorders_with_one_gather_on_the_batch_axis(cfg, params):
  """Beam search: gathering every cache leaf (and the inputs) on axis 0 gives the gathered step outputs."""
  embed, _, cached = _jitted(cfg)
  b, n = MASK.shape
  slots = n + 3
  x = embed(params, jnp.asarray(_ids()))
  positions = jnp.asarray(np.cumsum(MASK, axis=1) * MASK - 1, jnp.int32)
  key_mask = jnp.asarray(np.pad(MASK, ((0, 0), (0, slots - n))))
  _, cache = cached(
    params, x[:, :5], key_mask, positions[:, :5], opt.init_cache(cfg, b, slots, jnp.float32), jnp.int32(0)
  )
  order = jnp.array([2, 0, 0])
  step = lambda c, i: cached(params, x[i, 5:6], key_mask[i], positions[i, 5:6], c, jnp.int32(5))[0]
  reordered = step(jax.tree.map(lambda a: a[order], cache), order)
  np.testing.assert_array_equal(reordered, step(cache, jnp.arange(b))[order])


# --- remat and low precision -------------------------------------------------------------------------------


def test_remat_policies_give_identical_logits_and_gradients(hf_opt, params):
  """Stage 2 backpropagates through the frozen LLM into the Q-Former: recomputation may only reorder float
  arithmetic (XLA fuses the recomputed graph differently), never change the logits or the input gradient."""
  x = jnp.asarray(0.5 * np.random.default_rng(3).normal(size=MASK.shape + (WIDTH,)), jnp.float32)
  weight = jnp.asarray(np.random.default_rng(4).normal(size=MASK.shape + (VOCAB,)), jnp.float32)
  results = {}
  for policy in ("none", *opt.REMAT_POLICIES):
    model = opt.OPTForCausalLM(opt.config_from_hf(hf_opt.config, remat_policy=policy))
    loss = lambda e, model=model: jnp.sum(weight * model.apply({"params": params}, e, jnp.asarray(MASK))[0])
    results[policy] = jax.jit(jax.value_and_grad(loss))(x)
  for policy, (value, grad) in results.items():
    assert rel_error(value, results["none"][0]) < 1e-6, policy
    assert rel_error(grad, results["none"][1]) < 1e-6, policy


def test_bfloat16_compute_returns_float32_logits(hf_opt, cfg, params):
  ids, mask = jnp.asarray(_ids()), jnp.asarray(MASK)
  embed, forward, _ = _jitted(cfg)
  reference = forward(params, embed(params, ids), mask)
  embed, forward, _ = _jitted(opt.config_from_hf(hf_opt.config, dtype="bfloat16"))
  frozen = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)  # as the caller freezes the LLM
  x = embed(frozen, ids)
  assert x.dtype == jnp.bfloat16
  ours = forward(frozen, x, mask)
  assert ours.dtype == jnp.float32
  assert rel_error(ours, reference, MASK.astype(bool)) < 0.05


# --- parameters and weights --------------------------------------------------------------------------------


def test_every_parameter_has_logical_axes(cfg):
  for path, leaf in traverse_util.flatten_dict(_abstract(cfg), sep="/").items():
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path
    assert (leaf.names[0] == "layers") == path.startswith("layers/"), path


def test_weights_round_trip_exactly(hf_opt, cfg, params):
  state_dict = _state_dict(hf_opt)
  back = dict(weights.hf_tensors(params, opt.weight_map(cfg)))
  # lm_head.weight is the embedding matrix itself (tied), stored once in checkpoints.
  assert set(back) == set(state_dict) - {"lm_head.weight"}
  np.testing.assert_array_equal(state_dict["lm_head.weight"], state_dict["model.decoder.embed_tokens.weight"])
  for name, value in back.items():
    np.testing.assert_array_equal(value, state_dict[name], err_msg=name)


def test_wrong_shape_or_missing_tensor_is_one_line_error(hf_opt, cfg):
  state_dict = _state_dict(hf_opt)
  wrong = {**state_dict, "model.decoder.layers.1.fc1.weight": np.zeros((64, 16), np.float32)}
  with pytest.raises(ValueError, match=r"^Shape mismatch at `layers/fc1/kernel`[^\n]*$"):
    _load(cfg, wrong)
  missing = {k: v for k, v in state_dict.items() if k != "model.decoder.layers.0.self_attn.k_proj.bias"}
  with pytest.raises(
    ValueError,
    match=r"^Checkpoint has no tensor `model.decoder.layers.0.self_attn.k_proj.bias`"
    r"[^\n]*$",
  ):
    _load(cfg, missing)


# --- errors a user can cause -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(word_embed_proj_dim=16), "word_embed_proj_dim=16"),
    (dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
    (dict(activation_function="silu"), "activation_function='silu'"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine=False"),
  ],
)
def test_unsupported_config_is_one_line_error(overrides, field):
  with pytest.raises(ValueError, match=r"^[^\n]*" + field + r"[^\n]*$"):
    opt.config_from_hf(_hf_config(**overrides))


def test_bad_arguments_are_one_line_errors(hf_opt, cfg, params):
  with pytest.raises(ValueError, match="remat_policy='everything'"):
    opt.config_from_hf(hf_opt.config, remat_policy="everything")
  with pytest.raises(ValueError, match="model_type='t5'"):
    opt.config_from_hf({"model_type": "t5"})
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    opt.init_cache(cfg, 1, MAX_POS + 1, jnp.float32)
  model = opt.OPTForCausalLM(cfg)
  x, mask = jnp.zeros((1, 2, WIDTH)), jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="needs both `positions`"):
    model.apply({"params": params}, x, mask, cache=opt.init_cache(cfg, 1, 8, jnp.float32), cache_index=0)
  with pytest.raises(ValueError, match=r"without a cache it must be \[batch, tokens\]"):
    model.apply({"params": params}, x, mask)
