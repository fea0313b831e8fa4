"""Frozen T5: parity with transformers' PyTorch T5ForConditionalGeneration on tiny random checkpoints, cached
decoding, remat, the weight map and the config errors.

Two checkpoints: Flan-T5 as BLIP-2 runs it (gated FFN with exact GELU, a separate lm_head, more decoder than
encoder layers) and T5 1.0 (relu FFN, lm_head tied to the shared table, scaled decoder output). Every weight is
randomised (std 0.2, norm scales around 1) so a wrong transpose or name cannot hide; heads * d_kv != d_model so a
wrong reshape cannot either, and 8 position buckets make short sequences reach the log-spaced ones. Parity is
max |ours - theirs| / max |theirs| in float32.
"""

import functools

import flax.linen as nn
from helpers import randomise
from helpers import rel_error
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from blip2_jax import weights
from blip2_jax.models import t5

VOCAB, WIDTH, ENC_LEN, DEC_LEN, TOL = 64, 32, 13, 8, 1e-5
F32 = np.dtype("float32")
# Compiling dominates this file's time and LLVM's optimisations buy nothing on models this small: level 0 halves
# the compile time of the remat gradients.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _hf_config(variant: str) -> transformers.T5Config:
  common = dict(
    vocab_size=VOCAB,
    d_model=WIDTH,
    d_kv=6,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
  )
  if variant == "flan":
    return transformers.T5Config(
      **common, num_decoder_layers=3, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False
    )
  return transformers.T5Config(**common, feed_forward_proj="relu", tie_word_embeddings=True)


def _checkpoint(variant: str, root):
  """(the HF model, the tensors its save_pretrained wrote, our config)."""
  g = torch.Generator().manual_seed(0)
  model = randomise(transformers.T5ForConditionalGeneration(_hf_config(variant)), g)
  model.save_pretrained(root / "saved")
  if variant == "flan":
    # transformers >= 5 ties a fresh model's lm_head to `shared` whatever the config says; a real Flan-T5
    # checkpoint stores its own lm_head, and loading one unties them. Build that checkpoint and load it.
    tensors = safetensors.torch.load_file(root / "saved" / "model.safetensors")
    tensors["lm_head.weight"] = 0.2 * torch.randn(VOCAB, WIDTH, generator=g)
    safetensors.torch.save_file(tensors, root / "saved" / "model.safetensors", metadata={"format": "pt"})
    model = transformers.T5ForConditionalGeneration.from_pretrained(root / "saved").eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    model.save_pretrained(root / "resaved")
    root = root / "resaved"
  else:
    root = root / "saved"
  saved = safetensors.numpy.load_file(root / "model.safetensors")
  return model, saved, t5.config_from_hf(model.config, has_lm_head="lm_head.weight" in saved)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return {variant: _checkpoint(variant, tmp_path_factory.mktemp(variant)) for variant in ("flan", "t5")}


@pytest.fixture(scope="module")
def flan(checkpoints):
  """The checkpoint BLIP-2 uses, loaded: (params, our config)."""
  _, saved, cfg = checkpoints["flan"]
  return {"params": _params(cfg, saved)}, cfg


BOTH = pytest.mark.parametrize("variant", ["flan", "t5"])


def _abstract(cfg):
  model = t5.T5ForConditionalGeneration(cfg)
  args = (jnp.zeros((1, ENC_LEN, WIDTH)), jnp.ones((1, ENC_LEN), jnp.int32), jnp.zeros((1, DEC_LEN), jnp.int32))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"])


def _params(cfg, saved):
  return weights.tree_from_hf(saved.__getitem__, t5.weight_map(cfg), _abstract(cfg), dtype=F32)


def _jit(cfg, method):
  return jit(functools.partial(t5.T5ForConditionalGeneration(cfg).apply, method=method))


def _with(cfg, **changes):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(changes)
  return cfg


def _inputs(seed=0):
  """Encoder ids with right and left padding, decoder ids with one padded key."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, size=(3, ENC_LEN))
  mask = np.ones((3, ENC_LEN), np.int64)
  mask[1, 9:] = 0
  mask[2, :4] = 0
  decoder_ids = rng.integers(2, VOCAB, size=(3, DEC_LEN))
  decoder_ids[:, 0] = 0  # decoder_start_token_id
  decoder_mask = np.ones((3, DEC_LEN), np.int64)
  decoder_mask[2, 2] = 0
  return ids * mask, mask, decoder_ids, decoder_mask


# --- parity with transformers ---------------------------------------------------------------------------------


def test_relative_position_buckets_match_hf():
  relative = np.arange(-300, 301)
  for num_buckets, max_distance in ((8, 20), (32, 128)):
    for bidirectional in (True, False):
      ours = t5.relative_position_bucket(
        jnp.asarray(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
      )
      theirs = T5Attention._relative_position_bucket(
        torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
      )
      np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_gelu_new_is_hfs_tanh_approximation():
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  theirs = transformers.activations.ACT2FN["gelu_new"](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(t5.ACTIVATIONS["gelu_new"](jnp.asarray(x))), theirs, atol=1e-6)


@BOTH
def test_logits_match_hf(checkpoints, variant):
  """From ids (our embed) and from given embeddings (HF's inputs_embeds), with padding on both sides."""
  hf, saved, cfg = checkpoints[variant]
  assert cfg.tie_word_embeddings == (variant == "t5")
  params = {"params": _params(cfg, saved)}
  forward = _jit(cfg, "__call__")
  ids, mask, decoder_ids, decoder_mask = _inputs()
  embeds = t5.T5ForConditionalGeneration(cfg).apply(params, jnp.asarray(ids), method="embed")
  ours = forward(params, embeds, mask, decoder_ids, decoder_mask)
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      decoder_input_ids=torch.from_numpy(decoder_ids),
      decoder_attention_mask=torch.from_numpy(decoder_mask),
    ).logits
  assert ours.dtype == jnp.float32
  assert rel_error(ours, theirs) < TOL

  embeds = np.random.default_rng(1).normal(size=(3, ENC_LEN, WIDTH)).astype(np.float32)
  ours = forward(params, embeds, mask, decoder_ids, decoder_mask)
  with torch.no_grad():
    theirs = hf(
      inputs_embeds=torch.from_numpy(embeds),
      attention_mask=torch.from_numpy(mask),
      decoder_input_ids=torch.from_numpy(decoder_ids),
      decoder_attention_mask=torch.from_numpy(decoder_mask),
    ).logits
  assert rel_error(ours, theirs) < TOL


# --- cached decoding ------------------------------------------------------------------------------------------


def test_cached_decoding_matches_full_forward(flan):
  """A 3-token prefill and then one token per step, through one compiled step function, give the logits of the
  full teacher-forced pass, masked decoder key included."""
  params, cfg = flan
  model = t5.T5ForConditionalGeneration(cfg)
  _, mask, decoder_ids, decoder_mask = _inputs()
  embeds = np.random.default_rng(1).normal(size=(3, ENC_LEN, WIDTH)).astype(np.float32)
  max_len = DEC_LEN + 2  # slots past the last token stay empty and must not matter

  def full_pass_and_cache(m, embeds, mask, decoder_ids, decoder_mask):
    encoder_out = m.encode(embeds, mask)
    logits, no_cache = m.decode(decoder_ids, encoder_out, mask, decoder_mask=decoder_mask)
    assert no_cache is None
    return logits, m.init_cache(encoder_out, mask, max_len)

  full, cache = _jit(cfg, full_pass_and_cache)(params, embeds, mask, decoder_ids, decoder_mask)
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(cache))  # batch first: beam search gathers axis 0
  key_mask = np.pad(decoder_mask, ((0, 0), (0, max_len - DEC_LEN)), constant_values=1)
  decode = jit(
    lambda p, tokens, c, i: model.apply(
      p, tokens, None, None, decoder_mask=key_mask, cache=c, cache_index=i, method="decode"
    )
  )
  logits, cache = decode(params, decoder_ids[:, :3], cache, jnp.int32(0))
  steps = [logits]
  for i in range(3, DEC_LEN):
    logits, cache = decode(params, decoder_ids[:, i : i + 1], cache, jnp.int32(i))
    steps.append(logits)
  assert decode._cache_size() == 2  # the prefill and one step function for every step
  assert rel_error(jnp.concatenate(steps, axis=1), full) < TOL

  with pytest.raises(ValueError, match="encoder_out=None"):
    model.apply(params, decoder_ids[:, :1], embeds, mask, cache=cache, cache_index=0, method="decode")


def test_unrolled_decode_step_matches_full_forward(flan):
  """Generation's step (`t5.decode_step`, the decoder layers unrolled on split weights and per-layer caches) after
  a scanned 3-token prefill gives the full teacher-forced pass's logits."""
  params, cfg = flan
  model = t5.T5ForConditionalGeneration(cfg)
  _, mask, decoder_ids, _ = _inputs()
  embeds = np.random.default_rng(1).normal(size=(3, ENC_LEN, WIDTH)).astype(np.float32)

  def full_pass_and_prefill(m, embeds, mask, decoder_ids):
    encoder_out = m.encode(embeds, mask)
    full, _ = m.decode(decoder_ids, encoder_out, mask)
    cache = m.init_cache(encoder_out, mask, DEC_LEN + 2)
    return full, m.decode(decoder_ids[:, :3], None, None, cache=cache, cache_index=0)

  full, (logits, cache) = _jit(cfg, full_pass_and_prefill)(params, embeds, mask, decoder_ids)
  layer_params = t5.split_layers(params["params"])
  assert len(layer_params) == cfg.num_decoder_layers
  step = jit(lambda p, lp, tokens, caches, i: t5.decode_step(model, p, lp, tokens, mask, caches, i))
  caches, steps = t5.split_cache(cache), [logits]
  for i in range(3, DEC_LEN):
    logits, caches = step(params["params"], layer_params, decoder_ids[:, i : i + 1], caches, jnp.int32(i))
    steps.append(logits)
  assert step._cache_size() == 1
  assert rel_error(jnp.concatenate(steps, axis=1), full) < TOL


# --- remat, precision, parameters -----------------------------------------------------------------------------


def test_remat_policies_give_identical_values_and_gradients(flan):
  """Stage 2 backpropagates through the frozen T5 into the soft prompts: every policy gives the same loss and the
  same gradient with respect to the encoder embeddings as no remat."""
  params, cfg = flan
  _, mask, decoder_ids, decoder_mask = _inputs()
  embeds = jnp.asarray(np.random.default_rng(1).normal(size=(3, ENC_LEN, WIDTH)), jnp.float32)
  weight = jnp.asarray(np.random.default_rng(2).normal(size=(3, DEC_LEN, VOCAB)), jnp.float32)

  def value_and_grad(policy, e):
    model = t5.T5ForConditionalGeneration(_with(cfg, remat_policy=policy))
    return jax.value_and_grad(lambda e: jnp.sum(weight * model.apply(params, e, mask, decoder_ids, decoder_mask)))(e)

  # One program for all policies: half the compile time of one each.
  results = jit(lambda e: {p: value_and_grad(p, e) for p in ("none", *t5.REMAT_POLICIES)})(embeds)
  reference = results.pop("none")
  for value, grad in results.values():
    # Recomputation may fuse and round differently, so equal up to float32 rounding.
    assert rel_error(value, reference[0]) < TOL and rel_error(grad, reference[1]) < TOL


def test_bfloat16_compute_returns_float32_logits(flan):
  params, cfg = flan
  _, mask, decoder_ids, decoder_mask = _inputs()
  embeds = np.random.default_rng(1).normal(size=(3, ENC_LEN, WIDTH)).astype(np.float32)
  reference = _jit(cfg, "__call__")(params, embeds, mask, decoder_ids, decoder_mask)
  bf16_cfg = _with(cfg, dtype="bfloat16")
  bf16_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)  # as the frozen LLM is held
  logits = _jit(bf16_cfg, "__call__")(bf16_params, embeds, mask, decoder_ids, decoder_mask)
  assert logits.dtype == jnp.float32
  assert rel_error(logits, reference) < 0.1  # 0.039 here; HF's own bfloat16 run of this checkpoint is 0.041 off


@BOTH
def test_every_parameter_has_logical_axes(checkpoints, variant):
  _, _, cfg = checkpoints[variant]
  boxed = _abstract(cfg)
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in flat:
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
    scanned = "layers" in [getattr(k, "key", None) for k in path]
    assert (leaf.names[0] == "layers") == scanned, path
  assert specs["shared"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


# --- the weight map ---------------------------------------------------------------------------------------------


@BOTH
def test_weight_map_round_trips_what_save_pretrained_wrote(checkpoints, variant):
  _, saved, cfg = checkpoints[variant]
  # Tied copies are not written: the shared table once, lm_head only when it is a separate matrix.
  assert "encoder.embed_tokens.weight" not in saved and "decoder.embed_tokens.weight" not in saved
  assert ("lm_head.weight" in saved) == (variant == "flan")
  back = dict(weights.hf_tensors(_params(cfg, saved), t5.weight_map(cfg)))
  assert sorted(back) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_weight_map_errors(checkpoints):
  _, saved, cfg = checkpoints["flan"]
  template, weight_map = _abstract(cfg), t5.weight_map(cfg)
  name = "decoder.block.1.layer.0.SelfAttention.q.weight"
  wrong = {**saved, name: saved[name][:, :-1]}
  with pytest.raises(ValueError, match=r"Shape mismatch at `decoder/layers/self_attention/q/kernel`"):
    weights.tree_from_hf(wrong.__getitem__, weight_map, template, dtype=F32)
  missing = {k: v for k, v in saved.items() if k != name}
  with pytest.raises(ValueError, match=r"no tensor `decoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight`"):
    weights.tree_from_hf(missing.__getitem__, weight_map, template, dtype=F32)


# --- configs --------------------------------------------------------------------------------------------------


def test_config_from_hf_dicts():
  # BLIP-2's Flan-T5 text_config as its config.json spells it (written before transformers 5).
  cfg = t5.config_from_hf(
    {
      "model_type": "t5",
      "feed_forward_proj": "gated-gelu",
      "dense_act_fn": "gelu",
      "tie_word_embeddings": False,
      "d_model": 2048,
      "num_layers": 24,
      "num_heads": 32,
    }
  )
  assert (cfg.is_gated_act, cfg.dense_act_fn, cfg.tie_word_embeddings) == (True, "gelu", False)
  assert (cfg.num_decoder_layers, cfg.decoder_start_token_id) == (24, 0)
  # Flan-T5's own config: the tanh GELU; T5 1.0: relu, tied and scaled.
  assert t5.config_from_hf({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}).dense_act_fn == "gelu_new"
  cfg = t5.config_from_hf({"feed_forward_proj": "relu"})
  assert (cfg.is_gated_act, cfg.dense_act_fn, cfg.tie_word_embeddings) == (False, "relu", True)
  # A config transformers >= 5 wrote: tie_word_embeddings is always true, scale_decoder_outputs carries the rest.
  # Whether the head is tied then depends on the checkpoint: a stored lm_head.weight unties it.
  written = _hf_config("flan").to_dict()
  cfg = t5.config_from_hf(written)
  assert written["tie_word_embeddings"] and (cfg.tie_word_embeddings, cfg.scale_decoder_outputs) == (True, False)
  assert not t5.config_from_hf(written, has_lm_head=True).tie_word_embeddings


def test_unsupported_configs_raise():
  with pytest.raises(ValueError, match=r"dense_act_fn='silu' is not supported"):
    t5.config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-silu"})
  with pytest.raises(ValueError, match=r"remat_policy='sometimes' is not one of"):
    t5.config_from_hf({"model_type": "t5"}, remat_policy="sometimes")
  with pytest.raises(ValueError, match=r"expects a T5 config; got model_type='opt'"):
    t5.config_from_hf({"model_type": "opt"})
  with pytest.raises(ValueError, match=r"dtype='float16' is not supported"):
    t5.config_from_hf({"model_type": "t5"}, dtype="float16")
