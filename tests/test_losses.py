"""Tests for blip2_jax.losses against small hand-written numpy references (CPU, a few seconds).

The references follow LAVIS `blip2_qformer.py` and torch's `cross_entropy(label_smoothing=eps)`:
    loss = (1 - eps) * NLL(target) + eps * mean_c(-log p_c),   averaged over the non-ignored rows.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import losses

# --- numpy references, written independently of the code under test ------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_cross_entropy(logits, labels, eps=0.0, ignore=None):
  """torch.nn.functional.cross_entropy(logits, labels, label_smoothing=eps, ignore_index=...) (mean)."""
  logp = np_log_softmax(logits).reshape(-1, logits.shape[-1])
  labels = np.asarray(labels).reshape(-1)
  keep = np.ones_like(labels, bool) if ignore is None else ~np.asarray(ignore).reshape(-1)
  per_row = []
  for row, label, k in zip(logp, labels, keep):
    if k:
      per_row.append((1 - eps) * -row[label] + eps * -row.mean())
  return float(np.mean(per_row))


def np_itc(image_feats, text_feats, temp, eps):
  """LAVIS: sim_q2t = image_feats @ text_feat, max over queries, / temp; CE in both directions, averaged."""
  b_img, q, _ = image_feats.shape
  sim = np.zeros((b_img, text_feats.shape[0]))
  for i in range(b_img):
    for t in range(text_feats.shape[0]):
      sim[i, t] = max(float(np.dot(image_feats[i, k], text_feats[t])) for k in range(q))
  sim = sim / temp
  labels = np.arange(b_img)
  loss = (np_cross_entropy(sim, labels, eps) + np_cross_entropy(sim.T, labels, eps)) / 2
  return loss, sim


# Jitted once per module: eager dispatch compiles every op separately and dominates the runtime on CPU.
itc_loss = jax.jit(losses.itc_loss, static_argnums=3)
sample_many = jax.jit(jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, None)))
NUM_DRAWS = 4000


def unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


# --- ITC -----------------------------------------------------------------------------------------------------


def test_itc_similarities_is_max_over_queries_of_dot_products():
  rng = np.random.default_rng(0)
  img = unit(rng.normal(size=(5, 3, 4))).astype(np.float32)
  txt = unit(rng.normal(size=(6, 4))).astype(np.float32)
  expected = np.array([[max(img[i, q] @ txt[t] for q in range(3)) for t in range(6)] for i in range(5)])
  sim = losses.itc_similarities(jnp.asarray(img), jnp.asarray(txt))
  chex.assert_shape(sim, (5, 6))
  np.testing.assert_allclose(np.asarray(sim), expected, atol=1e-6)


def test_itc_loss_matches_numpy_with_label_smoothing_and_returns_scaled_similarities():
  rng = np.random.default_rng(1)
  img = unit(rng.normal(size=(5, 3, 4))).astype(np.float32)
  txt = unit(rng.normal(size=(5, 4))).astype(np.float32)
  temp = 0.07
  loss, sim_i2t, sim_t2i = itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(temp), 0.1)
  ref_loss, ref_sim = np_itc(img, txt, temp, 0.1)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sim_i2t), ref_sim, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sim_t2i), ref_sim.T, rtol=1e-5, atol=1e-5)
  # The smoothing really is applied: eps = 0 gives a different (smaller, for confident logits) number.
  loss0, _, _ = itc_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(temp), 0.0)
  np.testing.assert_allclose(float(loss0), np_itc(img, txt, temp, 0.0)[0], rtol=1e-5)
  assert abs(float(loss0) - float(loss)) > 1e-3


def test_itc_loss_gradient_reaches_temperature_and_both_feature_sets():
  rng = np.random.default_rng(2)
  img = jnp.asarray(unit(rng.normal(size=(4, 3, 4))), jnp.float32)
  txt = jnp.asarray(unit(rng.normal(size=(4, 4))), jnp.float32)
  grads = jax.jit(jax.grad(lambda i, t, temp: losses.itc_loss(i, t, temp)[0], argnums=(0, 1, 2)))(
    img, txt, jnp.float32(0.07)
  )
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(g)).sum() > 0


# --- cross-entropy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_torch_semantics(eps):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(7, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, size=7)
  got = losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)
  np.testing.assert_allclose(float(got), np_cross_entropy(logits, labels, eps), rtol=1e-5)


def test_smoothed_cross_entropy_weights_ignore_zero_weight_rows():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(3, 5, 9)).astype(np.float32) * 2
  labels = rng.integers(0, 9, size=(3, 5))
  weights = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
  got = losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1, weights=jnp.asarray(weights))
  np.testing.assert_allclose(float(got), np_cross_entropy(logits, labels, 0.1, ignore=weights == 0), rtol=1e-5)


# --- hard negatives ------------------------------------------------------------------------------------------


def _sims(b, seed, positive_boost=0.0):
  rng = np.random.default_rng(seed)
  sim = rng.normal(size=(b, b)).astype(np.float32)
  sim[np.arange(b), np.arange(b)] += positive_boost
  return sim


def test_sample_hard_negatives_never_returns_the_positive():
  b = 6
  # The positive has by far the largest similarity (as after some training, sims are divided by temp).
  sim = jnp.asarray(_sims(b, 5, positive_boost=50.0))
  neg_text, neg_image = sample_many(jax.random.split(jax.random.key(0), NUM_DRAWS), sim, sim.T)
  chex.assert_shape([neg_text, neg_image], (NUM_DRAWS, b))
  rows = np.arange(b)[None]
  assert not np.any(np.asarray(neg_text) == rows)
  assert not np.any(np.asarray(neg_image) == rows)
  assert np.all((np.asarray(neg_text) >= 0) & (np.asarray(neg_text) < b))


def test_sample_hard_negatives_is_deterministic_given_the_rng():
  sim = jnp.asarray(_sims(6, 6))
  keys = jax.random.split(jax.random.key(3), NUM_DRAWS).at[1].set(jax.random.key(7)).at[0].set(jax.random.key(7))
  neg_text, neg_image = (np.asarray(x) for x in sample_many(keys, sim, sim.T))
  np.testing.assert_array_equal(neg_text[0], neg_text[1])
  np.testing.assert_array_equal(neg_image[0], neg_image[1])
  assert len({row.tobytes() for row in neg_text[:20]}) > 1  # and it does depend on the rng


def test_sample_hard_negatives_follow_softmax_over_off_diagonal():
  b, n = 6, NUM_DRAWS
  sim_i2t = _sims(b, 8)
  sim_t2i = _sims(b, 9)  # independent of sim_i2t, to catch a mixed-up direction

  def expected(sim):
    p = np.zeros((b, b))
    for r in range(b):
      others = [c for c in range(b) if c != r]
      p[r, others] = np_softmax(sim[r, others])
    return p

  neg_text, neg_image = sample_many(jax.random.split(jax.random.key(1), n), jnp.asarray(sim_i2t), jnp.asarray(sim_t2i))
  for draws, sim in ((np.asarray(neg_text), sim_i2t), (np.asarray(neg_image), sim_t2i)):
    freq = np.stack([np.bincount(draws[:, r], minlength=b) / n for r in range(b)])
    np.testing.assert_allclose(freq, expected(sim), atol=0.03)


# --- ITM -----------------------------------------------------------------------------------------------------


def test_itm_loss_is_plain_two_way_cross_entropy():
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(9, 2)).astype(np.float32) * 2
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
  got = losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), np_cross_entropy(logits, labels, 0.0), rtol=1e-5)


# --- ITG -----------------------------------------------------------------------------------------------------


def np_itg(lm_logits, text_ids, text_mask, eps):
  """LAVIS: labels = ids with pads -> -100; BertLMHeadModel shifts: scores[:, :-1] vs labels[:, 1:]."""
  b, t, _ = lm_logits.shape
  logits, labels, ignore = [], [], []
  for i in range(b):
    for pos in range(t - 1):
      logits.append(lm_logits[i, pos])
      labels.append(text_ids[i, pos + 1])
      ignore.append(text_mask[i, pos + 1] == 0)
  return np_cross_entropy(np.stack(logits), np.array(labels), eps, ignore=np.array(ignore))


def _itg_example():
  rng = np.random.default_rng(12)
  b, t, v = 3, 6, 13
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
  ids = rng.integers(1, v, size=(b, t))
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], np.int32)
  ids = ids * mask  # pad id 0
  return logits, ids, mask


def test_itg_loss_is_shifted_smoothed_and_ignores_pads():
  logits, ids, mask = _itg_example()
  got = losses.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), 0.1)
  np.testing.assert_allclose(float(got), np_itg(logits, ids, mask, 0.1), rtol=1e-5)
  # Not the unshifted loss.
  unshifted = np_cross_entropy(logits, ids, 0.1, ignore=mask == 0)
  assert abs(float(got) - unshifted) > 1e-3


def test_itg_loss_ignores_logits_that_predict_pads_and_the_last_position():
  logits, ids, mask = _itg_example()
  base = float(losses.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), 0.1))
  changed = logits.copy()
  changed[1, 2:] += 10 * np.random.default_rng(13).normal(size=changed[1, 2:].shape)  # targets 3.. are pads
  changed[0, -1] += 7.0  # the last position predicts nothing
  got = float(losses.itg_loss(jnp.asarray(changed), jnp.asarray(ids), jnp.asarray(mask), 0.1))
  assert got == pytest.approx(base, rel=1e-6)
  # ...while a logit that predicts a real token does matter.
  changed[1, 1, 0] += 10.0  # one class only: a constant shift per row is invisible to softmax
  got = float(losses.itg_loss(jnp.asarray(changed), jnp.asarray(ids), jnp.asarray(mask), 0.1))
  assert abs(got - base) > 1e-3
