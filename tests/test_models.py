"""Tests for blip2_jax.models: shapes, the three stage-1 attention masks (as arrays and as behaviour of the
model), the frozen ViT and dropout. Tiny float32 configs on CPU; independent of the device count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import chex

from blip2_jax.models import masks
from blip2_jax.models.blip2 import Blip2Qformer
from blip2_jax.models.vit import VisionTransformer, _torch_bicubic_matrix, interpolate_pos_embed

B, S, T, Q = 2, 32, 8, 4
WIDTH, HIDDEN, HEADS, LAYERS, EMBED, VOCAB, BOS = 32, 32, 4, 2, 16, 40, 39
TEXT_LENGTHS = (T, 5)  # the second caption is padded


def make_cfg(dropout_rate=0.0):
    vit = dict(image_size=S, patch_size=8, width=WIDTH, depth=2, num_heads=4, mlp_dim=64, layer_norm_eps=1e-6,
               act="gelu", dtype="float32")
    qformer = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                   intermediate_size=64, cross_attention_freq=2, max_position_embeddings=16,
                   layer_norm_eps=1e-12, dropout_rate=dropout_rate, dtype="float32")
    return ml_collections.ConfigDict(dict(
        vit=vit, qformer=qformer, num_query_tokens=Q, embed_dim=EMBED, ln_vision_eps=1e-5,
        itc_label_smoothing=0.1, itg_label_smoothing=0.1, bos_token_id=BOS))


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, S, S, 3)).astype(np.float32)
    mask = np.array([[1] * n + [0] * (T - n) for n in TEXT_LENGTHS], np.int32)
    ids = rng.integers(1, BOS, size=(B, T)) * mask  # pad id 0
    return jnp.asarray(images), jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def init_params(model, images, ids, mask):
    # Jitted: an eager init of even this tiny model dispatches (and compiles) op by op, ~10x slower on CPU.
    k = jax.random.key(0)
    init = jax.jit(lambda *a: model.init({"params": k, "itm": k}, *a, train=False)["params"])
    return nn.unbox(init(images, ids, mask))


def full_itg_pass(m, image_embeds, text_ids, text_mask):
    """ITG the long way: one pass over [queries; [DEC]-text] under the square multimodal-causal mask."""
    b = text_ids.shape[0]
    queries = jnp.broadcast_to(m.query_tokens, (b,) + m.query_tokens.shape[1:])
    dec_ids = text_ids.at[:, 0].set(m.cfg.bos_token_id)
    x = m.qformer.embed(queries, dec_ids)
    x, _ = m.qformer.encode(x, Q, masks.multimodal_causal_mask(Q, text_mask), image_embeds)
    return x[:, :Q], m.qformer.lm_logits(x[:, Q:])


class Model:
    """The tiny model, its parameters and jitted entry points (each compiled once per module)."""

    def __init__(self):
        self.model = Blip2Qformer(make_cfg())
        self.images, self.ids, self.mask = make_inputs()
        self.params = init_params(self.model, self.images, self.ids, self.mask)
        self._jitted = {}
        self.jit_loss = jax.jit(self.loss)

    def __call__(self, method, *args, params=None):
        if method not in self._jitted:
            self._jitted[method] = jax.jit(lambda p, *a: self.model.apply({"params": p}, *a, method=method))
        return self._jitted[method](self.params if params is None else params, *args)

    def loss(self, params, images, ids, mask, rng):
        return self.model.apply({"params": params}, images, ids, mask, train=True, rngs={"itm": rng})


@pytest.fixture(scope="module")
def m():
    return Model()


@pytest.fixture(scope="module")
def image_embeds(m):
    return m("encode_image", m.images)


def other_images(m):
    return m.images + jnp.asarray(np.random.default_rng(1).normal(size=m.images.shape), jnp.float32)


# --- shapes --------------------------------------------------------------------------------------------------

def test_vision_transformer_shapes_and_position_interpolation():
    cfg = make_cfg().vit
    vit = VisionTransformer(cfg)
    x32 = jnp.zeros((B, 32, 32, 3))
    params = jax.jit(vit.init)(jax.random.key(0), x32)
    apply = jax.jit(vit.apply)
    chex.assert_shape(apply(params, x32), (B, 1 + (32 // 8) ** 2, WIDTH))
    # Another resolution with the same weights: the 4x4 position grid is interpolated to 6x6.
    out48 = apply(params, jnp.ones((B, 48, 48, 3)))
    chex.assert_shape(out48, (B, 1 + 36, WIDTH))
    chex.assert_tree_all_finite(out48)
    with pytest.raises(ValueError, match="patch size"):
        vit.apply(params, jnp.zeros((B, 36, 36, 3)))


def test_interpolate_pos_embed_is_identity_on_the_same_grid_and_keeps_cls():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, WIDTH)), jnp.float32)
    chex.assert_trees_all_equal(interpolate_pos_embed(pos, 4), pos)
    # Also the resampling matrix itself is the identity when the size does not change.
    np.testing.assert_allclose(_torch_bicubic_matrix(4, 4), np.eye(4), atol=1e-12)
    up = interpolate_pos_embed(pos, 6)
    chex.assert_shape(up, (1, 37, WIDTH))
    chex.assert_trees_all_equal(up[:, 0], pos[:, 0])  # [CLS] is not part of the grid
    # Rows sum to one, so a constant embedding stays constant.
    const = jnp.ones((1, 17, 3))
    np.testing.assert_allclose(np.asarray(interpolate_pos_embed(const, 6)), 1.0, rtol=1e-6)


def test_interpolate_pos_embed_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).normal(size=(4, 4, 5)).astype(np.float32)
    pos = np.concatenate([np.zeros((1, 1, 5), np.float32), grid.reshape(1, 16, 5)], axis=1)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(6, 6),
                                          mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    got = np.asarray(interpolate_pos_embed(jnp.asarray(pos), 6))[0, 1:].reshape(6, 6, 5)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_encode_image_shape_and_ln_vision(image_embeds):
    chex.assert_shape(image_embeds, (B, 1 + 16, WIDTH))
    chex.assert_type(image_embeds, jnp.float32)
    # ln_vision at init (scale 1, bias 0): every token normalised (eps 1e-5 shows on the low-variance [CLS]).
    np.testing.assert_allclose(np.asarray(image_embeds.mean(-1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(image_embeds.std(-1)), 1.0, atol=2e-2)


def test_query_text_and_head_shapes(m, image_embeds):
    query_output, kvs = m("query_features", image_embeds)
    chex.assert_shape(query_output, (B, Q, HIDDEN))
    assert len(kvs) == LAYERS
    for k, v in kvs:
        chex.assert_shape([k, v], (B, Q, HEADS, HIDDEN // HEADS))
    text_cls = m("text_features", m.ids, m.mask)
    chex.assert_shape(text_cls, (B, HIDDEN))

    image_feats = m("image_feats", query_output)
    chex.assert_shape(image_feats, (B, Q, EMBED))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image_feats), axis=-1), 1.0, rtol=1e-5)
    text_feat = m("text_feat", text_cls)
    chex.assert_shape(text_feat, (B, EMBED))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text_feat), axis=-1), 1.0, rtol=1e-5)

    chex.assert_shape(m("itm_logits", image_embeds, m.ids, m.mask), (B, 2))
    chex.assert_shape(m("itg_logits", kvs, m.ids, m.mask), (B, T, VOCAB))


def test_forward_returns_finite_scalar_losses_that_sum(m):
    out = m.jit_loss(m.params, m.images, m.ids, m.mask, jax.random.key(1))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    chex.assert_shape(list(out.values()), ())
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(float(out["loss"]), float(out["loss_itc"] + out["loss_itm"] + out["loss_itg"]),
                               rtol=1e-6)
    # At init the ITG loss is about log(vocab): a sanity check that it is a per-token mean, not a sum.
    assert 0.5 * np.log(VOCAB) < float(out["loss_itg"]) < 2 * np.log(VOCAB)


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


def test_unimodal_passes_itc(m, image_embeds):
    # Text features take no image; queries take no text; the text pass ignores pad tokens.
    base = m("text_features", m.ids, m.mask)
    padded_row, first_pad = 1, TEXT_LENGTHS[1]
    changed = m("text_features", replace_token(m.ids, padded_row, first_pad, new=7), m.mask)
    chex.assert_trees_all_close(changed, base, atol=1e-6)
    changed = m("text_features", replace_token(m.ids, padded_row, 2), m.mask)
    assert not np.allclose(np.asarray(changed[padded_row]), np.asarray(base[padded_row]), atol=1e-5)
    # Examples are independent: row 0 is untouched by a change in row 1.
    chex.assert_trees_all_close(changed[0], base[0], atol=1e-6)
    # Queries' outputs in a joint pass with text under the ITG mask equal the query-only pass: they see no text.
    query_only, _ = m("query_features", image_embeds)
    q_full, _ = m(full_itg_pass, image_embeds, m.ids, m.mask)
    chex.assert_trees_all_close(q_full, query_only, atol=1e-5)
    q_full2, _ = m(full_itg_pass, image_embeds, replace_token(m.ids, 0, 3), m.mask)
    chex.assert_trees_all_close(q_full2, q_full, atol=1e-6)


def test_itg_is_causal_over_text_and_sees_the_image(m, image_embeds):
    _, kvs = m("query_features", image_embeds)
    base = np.asarray(m("itg_logits", kvs, m.ids, m.mask))
    for j in (1, 3, T - 1):
        logits = np.asarray(m("itg_logits", kvs, replace_token(m.ids, 0, j), m.mask))
        np.testing.assert_allclose(logits[0, :j], base[0, :j], atol=1e-5)
        assert np.all(np.abs(logits[0, j:] - base[0, j:]).max(-1) > 1e-4), f"position >= {j} did not change"
        np.testing.assert_allclose(logits[1], base[1], atol=1e-5)
    # Position 0 is replaced by [DEC]: what the caption had there does not matter at all.
    logits = np.asarray(m("itg_logits", kvs, replace_token(m.ids, 0, 0), m.mask))
    np.testing.assert_allclose(logits, base, atol=1e-6)
    # A pad token is seen by nobody (the padded caption's real positions are unchanged).
    n = TEXT_LENGTHS[1]
    logits = np.asarray(m("itg_logits", kvs, replace_token(m.ids, 1, n, new=7), m.mask))
    np.testing.assert_allclose(logits[1, :n], base[1, :n], atol=1e-5)
    # The text sees the queries: another image changes every text position.
    _, other_kvs = m("query_features", m("encode_image", other_images(m)))
    logits = np.asarray(m("itg_logits", other_kvs, m.ids, m.mask))
    assert np.all(np.abs(logits - base).max(-1) > 1e-4)


def test_itm_queries_see_the_text_and_not_the_pads(m, image_embeds):
    base = np.asarray(m("itm_logits", image_embeds, m.ids, m.mask))
    changed = np.asarray(m("itm_logits", image_embeds, replace_token(m.ids, 0, 2), m.mask))
    assert np.abs(changed[0] - base[0]).max() > 1e-5
    np.testing.assert_allclose(changed[1], base[1], atol=1e-6)
    n = TEXT_LENGTHS[1]
    changed = np.asarray(m("itm_logits", image_embeds, replace_token(m.ids, 1, n, new=7), m.mask))
    np.testing.assert_allclose(changed, base, atol=1e-6)
    changed = np.asarray(m("itm_logits", m("encode_image", other_images(m)), m.ids, m.mask))
    assert np.all(np.abs(changed - base).max(-1) > 1e-5)


def test_itg_with_cached_query_kv_equals_full_multimodal_causal_pass(m, image_embeds):
    _, kvs = m("query_features", image_embeds)
    cached = m("itg_logits", kvs, m.ids, m.mask)
    _, full = m(full_itg_pass, image_embeds, m.ids, m.mask)
    chex.assert_shape(full, (B, T, VOCAB))
    chex.assert_trees_all_close(cached, full, atol=1e-5)


# --- training behaviour --------------------------------------------------------------------------------------

def test_frozen_vit_gets_exactly_zero_gradient(m):
    grads = jax.jit(jax.grad(lambda p: m.loss(p, m.images, m.ids, m.mask, jax.random.key(2))["loss"]))(m.params)
    vit_leaves = jax.tree.leaves(grads["visual_encoder"])
    assert vit_leaves
    for g in vit_leaves:
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    for name in ("ln_vision", "qformer", "query_tokens", "vision_proj", "text_proj", "itm_head", "temp"):
        total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name]))
        assert total > 0, f"{name} got no gradient"
    chex.assert_tree_all_finite(grads)


def test_dropout_is_random_in_training_and_off_in_eval():
    model = Blip2Qformer(make_cfg(dropout_rate=0.1))
    images, ids, mask = make_inputs()
    params = init_params(model, images, ids, mask)
    itm = jax.random.key(3)

    @jax.jit
    def losses(train_dropout_rng, eval_dropout_rng):
        rngs = lambda d: {"itm": itm, "dropout": d}
        train = [model.apply({"params": params}, images, ids, mask, train=True, rngs=rngs(k))["loss"]
                 for k in (train_dropout_rng, eval_dropout_rng)]
        evals = [model.apply({"params": params}, images, ids, mask, train=False, rngs=rngs(k))["loss"]
                 for k in (train_dropout_rng, eval_dropout_rng)]
        return train, evals

    train, evals = losses(jax.random.key(4), jax.random.key(5))
    assert abs(float(train[0]) - float(train[1])) > 1e-5
    assert float(evals[0]) == float(evals[1])
    assert abs(float(train[0]) - float(evals[0])) > 1e-5
