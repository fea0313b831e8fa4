"""LoRA adapters on the frozen LLM (models/lora.py): an adapted OPT / T5 starts as its base model, folding the
adapters in (`lora.merged`) gives the plain model the same logits and generated tokens, dropout and remat in
training, unknown targets, and a tiny stage-2 run that trains only the adapters (and the Q-Former side) and
exports a checkpoint transformers reads with the same logits."""

import functools
import json
import os

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from blip2_jax import generation
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.api import Blip2
from blip2_jax.models import lora
from blip2_jax.models import opt
from blip2_jax.models import t5
from configs import stage2_opt

OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
T5_TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # a full row and a left-padded one


def _opt_cfg(**lora_cfg):
  hf = transformers.OPTConfig(
    vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2, max_position_embeddings=32
  )
  return _with_lora(opt.config_from_hf(hf), OPT_TARGETS, **lora_cfg)


def _t5_cfg(**lora_cfg):
  hf = transformers.T5Config(
    vocab_size=40,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
  )
  return _with_lora(t5.config_from_hf(hf, has_lm_head=True), T5_TARGETS, **lora_cfg)


def _with_lora(cfg, targets, rank=4, alpha=8.0, dropout=0.5):
  """cfg with adapters on `targets`; OPT's layers rematerialised (the dropout flag is static there). One config per
  family throughout, so that each compiled program serves several tests."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.remat_policy = "full" if cfg.get("ffn_dim") else "none"
  cfg.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
  return cfg


def _plain(cfg):
  """The config without adapters (what `lora.merged` parameters are for)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  del cfg["lora"]
  return cfg


def _inputs(kind, seed=0):
  rng = np.random.default_rng(seed)
  embeds = jnp.asarray(0.5 * rng.normal(size=MASK.shape + (16,)), jnp.float32)
  if kind == "opt":
    return embeds, jnp.asarray(MASK)
  return embeds, jnp.asarray(MASK), jnp.asarray(rng.integers(1, 40, (2, 4)))


def _model(kind, cfg):
  return opt.OPTForCausalLM(cfg) if kind == "opt" else t5.T5ForConditionalGeneration(cfg)


@functools.lru_cache(maxsize=None)
def _jitted_logits(kind, cfg_json, deterministic=True):
  model = _model(kind, ml_collections.ConfigDict(json.loads(cfg_json)))

  def logits(params, inputs, key):
    rngs = None if deterministic else {"dropout": key}
    out = model.apply({"params": params}, *inputs, deterministic=deterministic, rngs=rngs)
    return out[0] if kind == "opt" else out

  return jax.jit(logits)


def _logits(kind, cfg, params, inputs, deterministic=True, key=None):
  key = jax.random.PRNGKey(0) if key is None else key
  return _jitted_logits(kind, cfg.to_json(), deterministic)(params, inputs, key)


def _boxed(kind, cfg):
  """The model's boxed abstract parameters (shapes, logical axes; nothing compiled)."""
  return jax.eval_shape(lambda: _model(kind, cfg).init(jax.random.PRNGKey(0), *_inputs(kind)))["params"]


def _params(kind, cfg, seed=0, std=0.2):
  """Random parameters, as tests/helpers.randomise gives the HF models (norm scales around 1, the rest std * N(0,
  1)) so that no wrong transpose hides; lora_b = 0, as the init makes it (the stage-2 test checks the init)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(_boxed(kind, cfg)), sep="/")
  for path, x in flat.items():
    value = std * rng.normal(size=x.shape) + (1.0 if path.endswith("scale") else 0.0)
    flat[path] = jnp.asarray(0.0 * value if path.endswith("lora_b") else value, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def _adapter_paths(params):
  return [p for p in traverse_util.flatten_dict(params, sep="/") if p.rsplit("/", 1)[-1] in lora.ADAPTER_LEAVES]


def _random_adapters(params, seed=1, std=0.3):
  flat = traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(seed)
  for path in _adapter_paths(params):
    flat[path] = jnp.asarray(std * rng.normal(size=flat[path].shape), jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


CONFIGS = {"opt": _opt_cfg, "t5": _t5_cfg}


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_adapters_start_as_the_base_model_and_merge_exactly(kind):
  cfg = CONFIGS[kind]()
  boxed = _boxed(kind, cfg)
  paths = _adapter_paths(boxed)
  # Every target in every layer stack: OPT's 6 projections; T5's q, k, v, o in the encoder's self-attention and
  # the decoder's self- and cross-attention, the gated FFN's 3 in both stacks.
  assert len(paths) == 2 * (6 if kind == "opt" else 4 * 3 + 3 * 2), paths
  flat = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  for path in paths:
    base = flat[path.rsplit("/", 1)[0] + "/kernel"]
    assert flat[path].dtype == jnp.float32 and flat[path].shape[0] == base.shape[0]  # stacked on the layer axis
  # Logical axes: lora_a (kernel in-axis, None), lora_b (None, kernel out-axis), after the scan's "layers".
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed), sep="/")
  attention = "layers/self_attn/" if kind == "opt" else "encoder/layers/self_attention/"
  q, o = ("q_proj", "out_proj") if kind == "opt" else ("q", "o")
  assert tuple(specs[f"{attention}{q}/lora_a"]) == ("layers", "embed", None)
  assert tuple(specs[f"{attention}{o}/lora_b"]) == ("layers", None, "embed")

  params, inputs = _params(kind, cfg), _inputs(kind)
  plain = lora.merged(params, cfg)
  assert not _adapter_paths(plain)
  # B = 0: the adapted model is its base model, bit for bit (the merged kernels are the base kernels).
  base = _logits(kind, _plain(cfg), plain, inputs)
  np.testing.assert_array_equal(_logits(kind, cfg, params, inputs), base)

  adapted = _random_adapters(params)
  merged = lora.merged(adapted, cfg)
  ours = _logits(kind, cfg, adapted, inputs)
  assert _rel(ours, base) > 1e-2  # the adapters matter
  assert _rel(_logits(kind, _plain(cfg), merged, inputs), ours) <= 1e-5
  # The host (numpy) path of export agrees with the jax.numpy one.
  host = lora.merged(jax.tree.map(np.asarray, adapted), cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), host, merged)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_generation_with_adapters_equals_the_merged_model(kind):
  """OPTDecoder / T5Decoder decode with the layers unrolled from split parameters, adapters included."""
  cfg = CONFIGS[kind]()
  params = _params(kind, cfg)
  adapted = _random_adapters(params, std=0.5)
  embeds, mask = _inputs(kind, seed=3)[:2]
  decoder = opt.OPTDecoder if kind == "opt" else t5.T5Decoder
  special = dict(eos_token_id=2, pad_token_id=1) if kind == "opt" else dict(eos_token_id=1, pad_token_id=0)

  def tokens(c, p):
    out = generation.generate(decoder.create(_model(kind, c), p), embeds, mask, max_new_tokens=6, **special)
    return np.asarray(out.tokens)

  ours = tokens(cfg, adapted)
  np.testing.assert_array_equal(ours, tokens(_plain(cfg), lora.merged(adapted, cfg)))
  assert not np.array_equal(ours, tokens(cfg, params))  # and the adapters change what it says


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_dropout_in_training_only(kind):
  """dropout(x) @ A @ B runs with the "dropout" rng when not deterministic, a draw per layer of the nn.scan (OPT
  under remat, where the flag is static); only the adapters' input is dropped, so with B = 0 training logits
  equal evaluation ones. (Gradients through the adapters: the stage-2 test.)"""
  cfg = CONFIGS[kind]()
  params, inputs = _params(kind, cfg), _inputs(kind)
  key0, key1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  evaluation = _logits(kind, cfg, params, inputs)
  assert _rel(_logits(kind, cfg, params, inputs, False, key0), evaluation) <= 1e-5  # programs compiled apart
  adapted = _random_adapters(params)
  one = _logits(kind, cfg, adapted, inputs, False, key0)
  assert _rel(one, _logits(kind, cfg, adapted, inputs)) > 1e-3
  assert _rel(one, _logits(kind, cfg, adapted, inputs, False, key1)) > 1e-3
  np.testing.assert_array_equal(one, _logits(kind, cfg, adapted, inputs, False, key0))


def test_unknown_target_is_one_clear_error():
  for kind, valid in (("opt", "q_proj, k_proj, v_proj, out_proj, fc1, fc2"), ("t5", "q, k, v, o, wi_0, wi_1, wo")):
    cfg = CONFIGS[kind]()
    cfg.lora.targets = ("v", "query") if kind == "t5" else ("v_proj", "query")
    with pytest.raises(ValueError, match=rf"^LoRA targets \[.query.\] .* the valid names are {valid}\.\n"):
      _boxed(kind, cfg)


# --- stage 2 with adapters, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_workdir(tiny_data_dir, tmp_path_factory):
  """A tiny stage-2 OPT run (configs/stage2_opt.py:tiny) with rank-4 adapters on q_proj and v_proj."""
  config = stage2_opt.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  config.model.llm.lora.rank = 4
  config.init.demo_llm_steps = 2  # its text skills do not matter here
  config.total_steps = config.checkpoint_every = config.log_every = 3
  config.optimizer.warmup_steps = 1
  config.collapse_patience = 0
  config.data.eval_max_examples = 8
  config.eval.update(dict(batch_size=8, max_new_tokens=3, during_training_images=0))
  workdir = str(tmp_path_factory.mktemp("stage2_lora"))
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_stage2_trains_the_adapters_only_and_exports_them_merged(lora_workdir, tmp_path):
  config, _, setup, state, frozen = state_lib.restore_workdir(lora_workdir, devices=jax.devices()[:1])
  assert config.model.llm.lora.rank == 4
  trained = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  frozen = traverse_util.flatten_dict(jax.device_get(frozen), sep="/")
  in_llm = sorted(p for p in trained if p.startswith("language_model/"))
  assert in_llm == [
    f"language_model/layers/self_attn/{proj}/{leaf}" for proj in ("q_proj", "v_proj") for leaf in ("lora_a", "lora_b")
  ]
  assert not any(p.rsplit("/", 1)[-1] in lora.ADAPTER_LEAVES for p in frozen)
  opt_state = {
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(setup.abstract_state["opt_state"])[0]
  }
  assert any(p.endswith("q_proj/lora_a") for p in opt_state)
  assert not any(p.endswith("kernel") and "language_model" in p for p in opt_state)
  # The adapters moved from their init (lora_b from zero); the base weights are the demo LLM's, unchanged.
  init = traverse_util.flatten_dict(jax.device_get(setup.init(jax.random.PRNGKey(config.seed))[0]["params"]), sep="/")
  for path in in_llm:
    assert np.abs(trained[path] - init[path]).max() > 1e-4, path
    if path.endswith("lora_b"):
      assert not init[path].any()  # B = 0: training starts from the frozen LLM's function
    else:  # PEFT's kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))
      bound = init[path].shape[1] ** -0.5
      assert np.abs(init[path]).max() <= bound and np.abs(init[path]).max() > 0.5 * bound
  stored = safetensors.numpy.load_file(os.path.join(config.init.llm_weights, "model.safetensors"))
  for proj in ("q_proj", "v_proj", "k_proj"):
    for i in range(trained[in_llm[0]].shape[0]):
      kernel = frozen[f"language_model/layers/self_attn/{proj}/kernel"][i]
      np.testing.assert_array_equal(kernel, stored[f"model.decoder.layers.{i}.self_attn.{proj}.weight"].T)

  model = Blip2.from_workdir(lora_workdir, devices=jax.devices()[:1])
  out = tmp_path / "hf"
  model.save_pretrained(out)
  names = safetensors.numpy.load_file(out / "model.safetensors")
  assert names and not any("lora" in n for n in names)
  assert "lora" not in json.loads((out / "config.json").read_text())["text_config"]
  hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out).eval()
  size, q = model.cfg.vit.image_size, model.cfg.num_query_tokens
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  tok = model.tokenizer
  ids = np.asarray(tok(["a photo of", "a photo of large"], padding="max_length", max_length=6).input_ids)
  mask = (ids != tok.pad_token_id).astype(np.int64)
  hf_ids = torch.from_numpy(np.concatenate([np.full((2, q), hf.config.image_token_index), ids], axis=1))
  hf_mask = torch.from_numpy(np.concatenate([np.ones((2, q), np.int64), mask], axis=1))
  with torch.no_grad():
    theirs = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), input_ids=hf_ids, attention_mask=hf_mask)
  ours = np.asarray(model.lm_logits(x, ids, mask))
  theirs = theirs.logits.numpy()[..., : ours.shape[-1]]  # the export's extra <image> row
  keep = hf_mask.numpy().astype(bool)  # real tokens only: padding rows are meaningless in both
  assert _rel(ours[keep], theirs[keep]) < 1e-5
  # ... which an export without the adapters would not give: they matter beyond that tolerance.
  model.params = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 0 if getattr(path[-1], "key", None) == "lora_b" else x, model.params
  )
  assert _rel(np.asarray(model.lm_logits(x, ids, mask))[keep], theirs[keep]) > 1e-4
