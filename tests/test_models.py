"""Tests for blip2_jax.models: shapes, the three stage-1 attention masks (as arrays and as behaviour of the
model), the frozen ViT and dropout. Tiny float32 configs on CPU; independent of the device count."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blip2_jax.models import layers
from blip2_jax.models import masks
from blip2_jax.models.blip2 import Blip2Qformer
from blip2_jax.models.vit import VisionTransformer
from blip2_jax.models.vit import _torch_bicubic_matrix
from blip2_jax.models.vit import interpolate_pos_embed

# XLA's backend optimisations buy nothing at this size and double the compile time, which is most of this
# file's runtime on CPU.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, S, T, Q = 2, 32, 8, 4
WIDTH, HIDDEN, HEADS, LAYERS, EMBED, VOCAB, BOS = 32, 32, 4, 2, 16, 40, 39
TEXT_LENGTHS = (T, 5)  # the second caption is padded


def make_cfg(dropout_rate=0.0):
  vit = dict(
    image_size=S,
    patch_size=8,
    width=WIDTH,
    depth=2,
    num_heads=4,
    mlp_dim=64,
    layer_norm_eps=1e-6,
    act="gelu",
    dtype="float32",
  )
  qformer = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_layers=LAYERS,
    num_heads=HEADS,
    intermediate_size=64,
    cross_attention_freq=2,
    max_position_embeddings=16,
    layer_norm_eps=1e-12,
    dropout_rate=dropout_rate,
    dtype="float32",
  )
  return ml_collections.ConfigDict(
    dict(
      vit=vit,
      qformer=qformer,
      num_query_tokens=Q,
      embed_dim=EMBED,
      ln_vision_eps=1e-5,
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      bos_token_id=BOS,
    )
  )


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, S, S, 3)).astype(np.float32)
  mask = np.array([[1] * n + [0] * (T - n) for n in TEXT_LENGTHS], np.int32)
  ids = rng.integers(1, BOS, size=(B, T)) * mask  # pad id 0
  return jnp.asarray(images), jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def random_params(model, images, ids, mask, seed=0):
  """Parameters far from init, so that every path through the model has a visible effect.

  At BERT's init (std 0.02) the image's influence on the ITG logits is ~1e-6, below float32 noise, so the
  mask-behaviour tests could not tell "sees the image" from "does not". Shapes come from `jax.eval_shape`
  of init (no compile: a jitted init of even this tiny model costs ~10 s of XLA time on CPU)."""
  k = jax.random.key(0)
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init({"params": k, "itm": k}, images, ids, mask, train=False)["params"])
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['temp']"):
      return jnp.float32(0.07)
    noise = rng.normal(size=leaf.shape)
    if name.endswith("['kernel']"):  # unit-scale activations: std 1/sqrt(fan_in)
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
    if leaf.ndim >= 2:  # embeddings, position embeddings, [CLS], query tokens
      return jnp.asarray(noise, leaf.dtype)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.2 * noise, leaf.dtype)
    return jnp.asarray(0.2 * noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def full_itg_pass(m, image_embeds, text_ids, text_mask):
  """ITG the long way: one pass over [queries; [DEC]-text] under the square multimodal-causal mask."""
  b = text_ids.shape[0]
  queries = jnp.broadcast_to(m.query_tokens, (b,) + m.query_tokens.shape[1:])
  dec_ids = text_ids.at[:, 0].set(m.cfg.bos_token_id)
  x = m.qformer.embed(queries, dec_ids)
  x, _ = m.qformer.encode(x, Q, masks.multimodal_causal_mask(Q, text_mask), image_embeds)
  return x[:, :Q], m.qformer.lm_logits(x[:, Q:])


def probe_all(m, images, text_ids, text_mask):
  """Every inference entry point at once: one compile serves all shape and mask-behaviour tests."""
  out = dict(vit=m.visual_encoder(images), image_embeds=m.encode_image(images))
  out["query_output"], out["query_kvs"] = m.query_features(out["image_embeds"])
  out["text_cls"] = m.text_features(text_ids, text_mask)
  out["image_feats"] = m.image_feats(out["query_output"])
  out["text_feat"] = m.text_feat(out["text_cls"])
  out["itm"] = m.itm_logits(out["image_embeds"], text_ids, text_mask)
  out["itg"] = m.itg_logits(out["query_kvs"], text_ids, text_mask)
  out["full_queries"], out["full_itg"] = full_itg_pass(m, out["image_embeds"], text_ids, text_mask)
  return out


class Model:
  """The tiny model, random parameters, and jitted entry points (each compiled once per module)."""

  def __init__(self):
    self.model = Blip2Qformer(make_cfg())
    self.images, self.ids, self.mask = make_inputs()
    self.params = random_params(self.model, self.images, self.ids, self.mask)
    self._probe = jit(lambda p, *a: self.model.apply({"params": p}, *a, method=probe_all))

  def probe(self, images=None, ids=None, mask=None):
    return self._probe(
      self.params,
      self.images if images is None else images,
      self.ids if ids is None else ids,
      self.mask if mask is None else mask,
    )

  def loss(self, params, rng, model=None, train=True, dropout_rng=None):
    rngs = {"itm": rng} if dropout_rng is None else {"itm": rng, "dropout": dropout_rng}
    return (model or self.model).apply({"params": params}, self.images, self.ids, self.mask, train=train, rngs=rngs)


ITM_RNG = jax.random.key(2)


@pytest.fixture(scope="module")
def m():
  return Model()


@pytest.fixture(scope="module")
def base(m):
  return m.probe()


@pytest.fixture(scope="module")
def loss_and_grads(m):
  fn = lambda p: (lambda out: (out["loss"], out))(m.loss(p, ITM_RNG))
  (_, out), grads = jit(jax.value_and_grad(fn, has_aux=True))(m.params)
  return out, grads


def other_images(m):
  return m.images + jnp.asarray(np.random.default_rng(1).normal(size=m.images.shape), jnp.float32)


# --- shapes --------------------------------------------------------------------------------------------------


def test_vision_transformer_shapes_and_position_interpolation(m, base):
  chex.assert_shape(base["vit"], (B, 1 + (S // 8) ** 2, WIDTH))
  # Another resolution with the same weights: the 4x4 position grid is interpolated to 6x6.
  vit = lambda mdl, x: mdl.visual_encoder(x)
  out48 = jit(lambda p, x: m.model.apply({"params": p}, x, method=vit))(m.params, jnp.ones((B, 48, 48, 3)))
  chex.assert_shape(out48, (B, 1 + 36, WIDTH))
  chex.assert_tree_all_finite(out48)
  with pytest.raises(ValueError, match="patch size"):
    jax.eval_shape(lambda p, x: m.model.apply({"params": p}, x, method=vit), m.params, jnp.ones((B, 36, 36, 3)))


def test_vit_blocks_are_one_scan_that_equals_the_blocks_applied_in_turn():
  # nn.scan stacks the blocks' parameters on a leading axis; running block i on slice i, in turn, is the same
  # function. Every remat policy gives the same value and gradients (a backward pass through the ViT).
  from blip2_jax.models.vit import Block  # pylint: disable=import-outside-toplevel

  cfg = make_cfg().vit
  images = jnp.asarray(np.random.default_rng(0).normal(size=(B, S, S, 3)), jnp.float32)
  params = VisionTransformer(cfg).init(jax.random.PRNGKey(0), images)["params"]
  blocks = nn.unbox(params["blocks"])
  assert jax.tree.leaves(blocks)[0].shape[0] == cfg.depth
  assert nn.get_partition_spec(params)["blocks"]["fc1"]["kernel"] == jax.sharding.PartitionSpec(
    "layers", "vit_embed", "mlp"
  )

  def by_hand(p, x):
    # The stem (patch embedding, [CLS], positions): one block of zeros adds nothing to the residual stream.
    one = ml_collections.ConfigDict(dict(cfg.to_dict(), depth=1))
    zero = jax.tree.map(lambda a: jnp.zeros_like(a[:1]), p["blocks"])
    x = VisionTransformer(one).apply({"params": {**p, "blocks": zero}}, x)
    for i in range(cfg.depth):
      x, _ = Block(cfg).apply({"params": jax.tree.map(lambda a, i=i: a[i], p["blocks"])}, x)
    return x

  plain = nn.unbox(params)
  np.testing.assert_allclose(
    jit(lambda p, x: VisionTransformer(cfg).apply({"params": p}, x))(plain, images),
    jit(by_hand)(plain, images),
    rtol=1e-5,
    atol=1e-5,
  )

  def value_and_grad(policy):
    c = ml_collections.ConfigDict(dict(cfg.to_dict(), remat_policy=policy))
    loss = lambda p: jnp.sum(VisionTransformer(c).apply({"params": p}, images) ** 2)
    return jax.value_and_grad(loss)(plain)

  results = jit(lambda: {p: value_and_grad(p) for p in ("none", *layers.REMAT_POLICIES)})()
  for policy in layers.REMAT_POLICIES:
    chex.assert_trees_all_close(results[policy], results["none"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"model.vit.remat_policy='some' is not one of"):
    value_and_grad("some")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off a GPU")
def test_vit_cudnn_attention_off_a_gpu_is_one_clear_error():
  cfg = make_cfg().vit
  cfg.attention = "cudnn"
  with pytest.raises(ValueError, match=r"model.vit.attention='cudnn' needs an NVIDIA GPU .* backend 'cpu'"):
    jax.eval_shape(VisionTransformer(cfg).init, jax.random.PRNGKey(0), jnp.ones((1, S, S, 3)))


def test_interpolate_pos_embed_is_identity_on_the_same_grid_and_keeps_cls():
  pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, WIDTH)), jnp.float32)
  chex.assert_trees_all_equal(interpolate_pos_embed(pos, 4), pos)
  # The resampling matrix itself is the identity when the size does not change.
  np.testing.assert_allclose(_torch_bicubic_matrix(4, 4), np.eye(4), atol=1e-12)
  up = interpolate_pos_embed(pos, 6)
  chex.assert_shape(up, (1, 37, WIDTH))
  chex.assert_trees_all_equal(up[:, 0], pos[:, 0])  # [CLS] is not part of the grid
  # Rows sum to one, so a constant embedding stays constant.
  np.testing.assert_allclose(np.asarray(interpolate_pos_embed(jnp.ones((1, 17, 3)), 6)), 1.0, rtol=1e-6)


def test_interpolate_pos_embed_matches_torch_bicubic():
  # The 364px checkpoints were fine-tuned with torch's bicubic kernel (A=-0.75), not jax.image's.
  torch = pytest.importorskip("torch")
  grid = np.random.default_rng(1).normal(size=(4, 4, 5)).astype(np.float32)
  pos = np.concatenate([np.zeros((1, 1, 5), np.float32), grid.reshape(1, 16, 5)], axis=1)
  ref = (
    torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(6, 6), mode="bicubic", align_corners=False
    )[0]
    .permute(1, 2, 0)
    .numpy()
  )
  got = np.asarray(interpolate_pos_embed(jnp.asarray(pos), 6))[0, 1:].reshape(6, 6, 5)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_encode_image_is_ln_vision_of_the_vit_output(m, base):
  emb = base["image_embeds"]
  chex.assert_shape(emb, (B, 1 + 16, WIDTH))
  chex.assert_type(emb, jnp.float32)
  x = np.asarray(base["vit"], np.float64)
  ln = m.params["ln_vision"]
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)  # eps 1e-5 (LAVIS)
  ref = ref * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  np.testing.assert_allclose(np.asarray(emb), ref, rtol=1e-4, atol=1e-4)


def test_query_text_and_head_shapes(base):
  chex.assert_shape(base["query_output"], (B, Q, HIDDEN))
  assert len(base["query_kvs"]) == LAYERS
  for k, v in base["query_kvs"]:
    chex.assert_shape([k, v], (B, Q, HEADS, HIDDEN // HEADS))
  chex.assert_shape(base["text_cls"], (B, HIDDEN))
  chex.assert_shape(base["image_feats"], (B, Q, EMBED))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(base["image_feats"]), axis=-1), 1.0, rtol=1e-5)
  chex.assert_shape(base["text_feat"], (B, EMBED))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(base["text_feat"]), axis=-1), 1.0, rtol=1e-5)
  chex.assert_shape(base["itm"], (B, 2))
  chex.assert_shape(base["itg"], (B, T, VOCAB))
  chex.assert_tree_all_finite(base)


def test_forward_returns_finite_scalar_losses_that_sum(loss_and_grads):
  out, _ = loss_and_grads
  assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
  chex.assert_shape(list(out.values()), ())
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(float(out["loss"]), float(out["loss_itc"] + out["loss_itm"] + out["loss_itg"]), rtol=1e-6)


# --- the masks as arrays -------------------------------------------------------------------------------------

MASK_Q = 2
MASK_TEXT = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)


def expected_mask(kind):
  """Hand-built [B, L, L] for L = Q + T (rows = who attends, cols = whom), from the reference table."""
  b, t = MASK_TEXT.shape
  q = MASK_Q
  out = np.zeros((b, q + t, q + t), bool)
  for i in range(b):
    for r in range(q + t):
      for c in range(q + t):
        r_query, c_query = r < q, c < q
        c_real = c_query or MASK_TEXT[i, c - q] == 1
        if kind == "itm":
          out[i, r, c] = c_real
        elif kind == "itg":
          out[i, r, c] = c_query if r_query else (c_query or (c_real and c <= r))
  return out


def test_itc_text_mask_sees_only_non_pad_text():
  got = np.asarray(masks.padding_mask(jnp.asarray(MASK_TEXT)))
  b, t = MASK_TEXT.shape
  got = np.broadcast_to(got, (b, 1, t, t))[:, 0]
  expected = np.broadcast_to(MASK_TEXT.astype(bool)[:, None, :], (b, t, t))
  np.testing.assert_array_equal(got, expected)


def test_itm_mask_is_bidirectional_over_queries_and_non_pad_text():
  got = np.asarray(masks.bidirectional_mask(MASK_Q, jnp.asarray(MASK_TEXT)))
  b, t = MASK_TEXT.shape
  got = np.broadcast_to(got, (b, 1, MASK_Q + t, MASK_Q + t))[:, 0]
  np.testing.assert_array_equal(got, expected_mask("itm"))


def test_itg_mask_is_multimodal_causal():
  got = np.asarray(masks.multimodal_causal_mask(MASK_Q, jnp.asarray(MASK_TEXT)))
  b, t = MASK_TEXT.shape
  assert got.shape == (b, 1, MASK_Q + t, MASK_Q + t)
  np.testing.assert_array_equal(got[:, 0], expected_mask("itg"))
  assert not got[:, :, :MASK_Q, MASK_Q:].any()  # queries never see text
  assert got[:, :, MASK_Q:, :MASK_Q].all()  # text sees every query
  rows = np.asarray(masks.text_rows_of_multimodal_causal_mask(MASK_Q, jnp.asarray(MASK_TEXT)))
  np.testing.assert_array_equal(rows, got[:, :, MASK_Q:])


# --- the masks as behaviour of the model ---------------------------------------------------------------------


def replace_token(ids, row, pos, new=None):
  ids = np.asarray(ids).copy()
  ids[row, pos] = new if new is not None else (ids[row, pos] % (BOS - 1)) + 1  # another non-pad, non-[DEC] id
  return jnp.asarray(ids)


def close(a, b, atol=1e-5):
  return np.allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_itc_passes_are_unimodal(m, base):
  # Text features take no image, query features take no text (by signature); here: the text pass ignores
  # pads and examples do not mix, and in a joint pass under the ITG mask the queries still see no text.
  first_pad = TEXT_LENGTHS[1]
  out = m.probe(ids=replace_token(m.ids, 1, first_pad, new=7))
  chex.assert_trees_all_close(out["text_cls"], base["text_cls"], atol=1e-5)
  out = m.probe(ids=replace_token(m.ids, 1, 2))
  assert not close(out["text_cls"][1], base["text_cls"][1])
  chex.assert_trees_all_close(out["text_cls"][0], base["text_cls"][0], atol=1e-5)
  chex.assert_trees_all_close(base["full_queries"], base["query_output"], atol=1e-5)
  out = m.probe(ids=replace_token(m.ids, 0, 3))
  chex.assert_trees_all_close(out["full_queries"], base["query_output"], atol=1e-5)


def test_itg_is_causal_over_text_and_sees_the_image(m, base):
  ref = np.asarray(base["itg"])
  for j in (1, 3, T - 1):
    logits = np.asarray(m.probe(ids=replace_token(m.ids, 0, j))["itg"])
    np.testing.assert_allclose(logits[0, :j], ref[0, :j], atol=1e-5)
    assert np.all(np.abs(logits[0, j:] - ref[0, j:]).max(-1) > 1e-3), f"positions >= {j} did not all change"
    np.testing.assert_allclose(logits[1], ref[1], atol=1e-5)
  # Position 0 is replaced by [DEC]: what the caption had there does not matter at all.
  np.testing.assert_allclose(np.asarray(m.probe(ids=replace_token(m.ids, 0, 0))["itg"]), ref, atol=1e-5)
  # A pad token is seen by nobody: the padded caption's real positions are unchanged.
  n = TEXT_LENGTHS[1]
  logits = np.asarray(m.probe(ids=replace_token(m.ids, 1, n, new=7))["itg"])
  np.testing.assert_allclose(logits[1, :n], ref[1, :n], atol=1e-5)
  # The text sees the queries: another image changes every text position.
  logits = np.asarray(m.probe(images=other_images(m))["itg"])
  assert np.all(np.abs(logits - ref).max(-1) > 1e-3)


def test_itm_queries_see_the_text_but_not_the_pads(m, base):
  ref = np.asarray(base["itm"])
  changed = np.asarray(m.probe(ids=replace_token(m.ids, 0, 2))["itm"])
  assert np.abs(changed[0] - ref[0]).max() > 1e-3
  np.testing.assert_allclose(changed[1], ref[1], atol=1e-5)
  n = TEXT_LENGTHS[1]
  np.testing.assert_allclose(np.asarray(m.probe(ids=replace_token(m.ids, 1, n, new=7))["itm"]), ref, atol=1e-5)
  changed = np.asarray(m.probe(images=other_images(m))["itm"])
  assert np.all(np.abs(changed - ref).max(-1) > 1e-3)


def test_itg_with_cached_query_kv_equals_full_multimodal_causal_pass(m, base):
  chex.assert_shape(base["full_itg"], (B, T, VOCAB))
  chex.assert_trees_all_close(base["itg"], base["full_itg"], atol=1e-5)
  out = m.probe(images=other_images(m), ids=replace_token(m.ids, 1, 3))
  chex.assert_trees_all_close(out["itg"], out["full_itg"], atol=1e-5)


# --- training behaviour --------------------------------------------------------------------------------------


def test_frozen_vit_gets_exactly_zero_gradient(loss_and_grads):
  _, grads = loss_and_grads
  vit_leaves = jax.tree.leaves(grads["visual_encoder"])
  assert vit_leaves
  for g in vit_leaves:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  for name in ("ln_vision", "qformer", "query_tokens", "vision_proj", "text_proj", "itm_head", "temp"):
    total = sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads[name]))
    assert total > 0, f"{name} got no gradient"
  chex.assert_tree_all_finite(grads)


def test_dropout_is_random_in_training_and_off_in_eval(m, loss_and_grads):
  model = Blip2Qformer(make_cfg(dropout_rate=0.1))  # dropout adds no parameters: m.params fit

  @jit
  @jax.vmap
  def losses(dropout_rng):
    train = m.loss(m.params, ITM_RNG, model=model, train=True, dropout_rng=dropout_rng)["loss"]
    evals = m.loss(m.params, ITM_RNG, model=model, train=False, dropout_rng=dropout_rng)["loss"]
    return train, evals

  # unsafe_rbg: dropout masks from threefry keys take ~4x longer to compile on CPU; the impl is not under test.
  train, evals = losses(jax.random.split(jax.random.key(4, impl="unsafe_rbg"), 2))
  assert abs(float(train[0]) - float(train[1])) > 1e-4
  assert float(evals[0]) == float(evals[1])
  # train=False is exactly the dropout-free model.
  np.testing.assert_allclose(float(evals[0]), float(loss_and_grads[0]["loss"]), rtol=1e-5)
