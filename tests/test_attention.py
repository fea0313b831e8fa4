"""The attention kernels (layers.ATTENTION_IMPLEMENTATIONS) against the plain XLA path, alone and in the models.

"tpu_flash" is the Pallas TPU kernel run in Pallas's TPU interpret mode on this CPU (the same kernel code, forward
and backward); "cudnn" needs an NVIDIA GPU, so here its call is checked with jax.nn.dot_product_attention's XLA
implementation in the kernel's place (the same arguments: layout, mask, grouped heads).
"""

import chex
import helpers
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import hf
from blip2_jax import state as state_lib
from blip2_jax.models import blip2
from blip2_jax.models import layers
from blip2_jax.models import llms
from configs import stage1
from configs import stage2_opt

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(autouse=True)
def one_device_kernel():
  """The tests' programs run on one device (of the 8 fake ones): the kernel runs unsplit."""
  with layers.kernel_mesh(jax.sharding.Mesh(jax.devices()[:1], ("data",))):
    yield


def _qkv(lq, lk, heads, kv_heads, dim, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, lq, heads, dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, lk, kv_heads, dim)), jnp.float32) for _ in range(2))
  mask = rng.random((batch, 1, lq, lk)) < 0.7
  mask[0, 0, 1] = False  # a query that sees no key (padding)
  return q, k, v, jnp.asarray(mask)


def _seen(mask):
  """[B, Lq, 1, 1]: the query rows that see a key. The others are padding, which nothing reads: their outputs
  are finite but differ between paths (layers.attention)."""
  return jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]


def _loss(implementation, mask):
  return lambda q, k, v: jnp.sum(
    jnp.where(_seen(mask), layers.attention(q, k, v, mask, implementation=implementation), 0) ** 2
  )


def test_xla_path_is_jax_dot_product_attention_as_the_cudnn_call_makes_it():
  # "cudnn" is jax.nn.dot_product_attention(..., implementation="cudnn") on the arguments dot_product_attention
  # builds; with its XLA implementation instead, it must be our XLA path (grouped heads, masks, an empty row).
  q, k, v, mask = _qkv(5, 7, 4, 2, 8)
  for m in (None, mask, mask[:1, :, :1]):
    chex.assert_trees_all_close(layers.dot_product_attention(q, k, v, m, "xla"), layers.attention(q, k, v, m), **TOL)
  # Grouped heads are the heads repeated per group.
  chex.assert_trees_all_close(
    layers.attention(q, k, v, mask), layers.attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), mask), **TOL
  )


def test_tpu_flash_kernel_matches_xla_forward_and_backward(monkeypatch):
  # Queries of 20 (one block) and keys of 36 (padded to a block of 128 and masked), grouped heads, a mask with an
  # empty row; then both sides padded (long sequences), without a mask.
  q, k, v, mask = _qkv(20, 36, 2, 1, 16, batch=1)
  with pltpu.force_tpu_interpret_mode():
    out = layers.attention(q, k, v, mask, implementation="tpu_flash")
  assert bool(jnp.all(jnp.isfinite(out)))  # the empty row too
  with pltpu.force_tpu_interpret_mode():
    ours = jax.jit(jax.value_and_grad(_loss("tpu_flash", mask), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(ours, jax.value_and_grad(_loss("xla", mask), argnums=(0, 1, 2))(q, k, v), **TOL)
  monkeypatch.setattr(layers, "TPU_FLASH_MAX_WHOLE", 16)
  q, k, v, _ = _qkv(130, 130, 1, 1, 16, seed=1, batch=1)
  with pltpu.force_tpu_interpret_mode():
    ours = jax.jit(lambda q, k, v: layers.attention(q, k, v, implementation="tpu_flash"))(q, k, v)
  chex.assert_trees_all_close(ours, layers.attention(q, k, v), **TOL)


def test_tpu_flash_kernel_runs_per_shard_of_batch_and_heads():
  # On a mesh (data 2 x tensor 2), declared as the trainer does, each device's kernel sees its rows and heads.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
  q, k, v, mask = _qkv(8, 8, 2, 2, 16)
  mask = mask.at[:, :, 1].set(True)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor", None))
  with pltpu.force_tpu_interpret_mode(), layers.kernel_mesh(mesh, "data", "tensor"):
    f = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, implementation="tpu_flash"), out_shardings=sharded)
    out = f(*(jax.device_put(x, sharded) for x in (q, k, v)))
  chex.assert_trees_all_close(out, layers.attention(q, k, v, mask), **TOL)


def _spy(monkeypatch) -> list:
  """(query length, implementation) of each layers.attention call traced from now on, in order."""
  calls, real = [], layers.attention

  def spy(q, *args, implementation="xla", **kwargs):
    calls.append((q.shape[1], implementation))
    return real(q, *args, implementation=implementation, **kwargs)

  monkeypatch.setattr(layers, "attention", spy)
  return calls


def test_each_place_takes_the_kernel_its_config_names(monkeypatch):
  # Traced only: which path each attention of the stage-1 forward takes (the kernel's numbers are the tests above
  # and below). The ViT always; the Q-Former (self- and cross-attention, ITC / ITM / ITG masks) where no attention
  # dropout is drawn: in evaluation, not in training at dropout_rate 0.1.
  c = stage1.get_config("tiny")  # a ViT of one block
  c.model.qformer.update(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
  c.model.qformer.dropout_rate = 0.1  # the paper's (the tiny config has none)
  c.model.update(num_query_tokens=4, embed_dim=16, bos_token_id=3)
  c.model.vit.attention = c.model.qformer.attention = "tpu_flash"
  model, size = blip2.Blip2Qformer(c.model), c.data.image_size
  images = jnp.zeros((2, size, size, 3), jnp.uint8)
  ids = jnp.asarray([[3, 5, 6, 7, 8, 9], [3, 10, 11, 12, 0, 0]], jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "itm": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
  params = jax.eval_shape(lambda: model.init(rngs, images, ids, ids > 0, train=False))["params"]
  calls = _spy(monkeypatch)
  vit_tokens = (size // c.model.vit.patch_size) ** 2 + 1
  for train in (False, True):
    calls.clear()
    jax.make_jaxpr(lambda p, t=train: model.apply({"params": p}, images, ids, ids > 0, train=t, rngs=rngs))(params)
    vit = {impl for length, impl in calls if length == vit_tokens}
    qformer = [impl for length, impl in calls if length != vit_tokens]
    assert vit == {"tpu_flash"} and len(qformer) > 10 and set(qformer) == {"xla" if train else "tpu_flash"}, calls
  # OPT: its training forward and the prompt's prefill take model.llm.attention; a decoding step reads the cache
  # with XLA's einsums.
  family = llms.family("opt")
  opt = family.module(llms.llm_config(dict(helpers.OPT_TEXT), attention="tpu_flash"))
  embeds, mask = jnp.zeros((2, 6, helpers.OPT_TEXT["hidden_size"])), jnp.ones((2, 6), jnp.int32)
  params = jax.eval_shape(lambda: opt.init(jax.random.PRNGKey(0), embeds, mask))["params"]

  def prefill_and_step(p):
    decoder = family.decoder.create(opt, p)
    _, state = decoder.prefill(embeds, mask, max_new_tokens=3)
    return decoder.step(jnp.zeros((2,), jnp.int32), state)

  calls.clear()
  jax.make_jaxpr(lambda p: opt.apply({"params": p}, embeds, mask))(params)
  assert {impl for _, impl in calls} == {"tpu_flash"}, calls
  calls.clear()
  jax.make_jaxpr(prefill_and_step)(params)
  assert {impl for length, impl in calls if length == 6} == {"tpu_flash"}, calls  # the prefill
  assert {impl for length, impl in calls if length == 1} == {"xla"}, calls  # a decoding step


def test_tpu_flash_in_llama_gives_the_logits_gradients_and_prefill_of_xla():
  # The kernel inside an LLM with grouped-query heads and left padding: the training forward and its gradient,
  # and the prompt's prefill into the KV cache.
  text = dict(helpers.LLAMA_TEXT, num_hidden_layers=1)
  family = llms.family("llama")
  models = {a: family.module(llms.llm_config(text, attention=a)) for a in ("xla", "tpu_flash")}
  rng = np.random.default_rng(0)
  embeds = jnp.asarray(rng.normal(size=(2, 6, text["hidden_size"])), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], jnp.int32)  # left padding
  params = models["xla"].init(jax.random.PRNGKey(0), embeds, mask)["params"]

  def run(model):
    logits = lambda e: model.apply({"params": params}, e, mask)[0]
    value, grad = jax.value_and_grad(lambda e: jnp.sum(jnp.where(mask[..., None], logits(e), 0.0) ** 2))(embeds)
    first, state = family.decoder.create(model, params).prefill(embeds, mask, max_new_tokens=3)
    return jnp.where(mask[..., None], logits(embeds), 0.0), value, grad, first, state["cache"]

  with pltpu.force_tpu_interpret_mode():
    ours = jax.jit(lambda: run(models["tpu_flash"]))()
  chex.assert_trees_all_close(ours, jax.jit(lambda: run(models["xla"]))(), rtol=1e-4, atol=1e-5)


def test_kernel_choices_that_cannot_run_are_one_sentence_errors():
  q, k, v, mask = _qkv(4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="'flash' is not one of"):
    layers.attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="has no attention dropout"):
    layers.attention(q, k, v, dropout_rate=0.1, deterministic=False, implementation="tpu_flash")
  with pytest.raises(ValueError, match=r"model.qformer.attention='fast' is not one of"):
    layers.check_attention("fast", jnp.float32, "model.qformer.attention")
  with pytest.raises(ValueError, match=r"model.vit.attention='cudnn' needs an NVIDIA GPU .* backend 'cpu'"):
    layers.check_attention("cudnn", jnp.bfloat16, "model.vit.attention", "cpu")
  # The trainer checks every part against its mesh's devices.
  c = stage1.get_config("tiny")
  c.model.qformer.attention = "tpu_flash"
  with pytest.raises(ValueError, match=r"model.qformer.attention='tpu_flash' is a Pallas kernel for TPUs; .* 'cpu'"):
    state_lib.build(c, state_lib.load_tokenizer(c), jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config.model.llm.attention='cudnn': a t5 LLM"):
    llms.llm_config(dict(helpers.T5_TEXT), attention="cudnn")
  c = stage2_opt.get_config("tiny")
  c.model.llm.attention = "cudnn"
  c.init.llm_weights = ""
  assert "attention" not in hf.llm_hf_config(c)  # ours, not a field of the LLM's HF config
  with pytest.raises(ValueError, match=r"model.llm.attention='cudnn' needs an NVIDIA GPU"):
    state_lib.build(c, None, jax.devices()[:1])
