"""Stage-1 losses of BLIP-2: image-text contrastive (ITC), matching (ITM) and image-grounded generation (ITG).

Pure functions of arrays, written to match LAVIS `blip2_qformer.py`. They run on the *global* batch inside one
jit, so "negatives from every device" is simply the whole batch axis.

A choice that differs from LAVIS, on purpose: LAVIS all-gathers the other devices' features without gradient,
so each device back-propagates only through its own rows and the summed gradient depends on the device count.
Here the contrastive loss is one function of the global batch and its gradient is the exact gradient of that
function, whatever the sharding; the same global batch gives the same update on 1 CPU or on a pod.
"""

import jax
import jax.numpy as jnp
import optax


def smoothed_cross_entropy(logits, labels, label_smoothing: float, weights=None):
  """Mean cross-entropy with torch's label smoothing (eps spread over all classes, the target included)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is None:
    return losses.mean()
  weights = weights.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def itc_similarities(image_feats, text_feats):
  """Max over queries of the cosine similarity.

  image_feats: [B_img, Q, E] and text_feats: [B_txt, E], both L2-normalised. Returns [B_img, B_txt].
  """
  return jnp.einsum("iqe,te->itq", image_feats, text_feats).max(axis=-1)


def same_image(image_ids):
  """[B, B] bool: whether rows i and j show the same image (retrieval fine-tuning: COCO has ~5 captions per image,
  and LAVIS trains on every (image, caption) pair, so one image can appear several times in a batch)."""
  return image_ids[:, None] == image_ids[None, :]


def itc_loss(image_feats, text_feats, temp, label_smoothing: float = 0.1, image_ids=None):
  """Symmetric InfoNCE over the global batch; the i-th image and i-th text are the positive pair.

  image_ids [B] (retrieval fine-tuning, LAVIS `Blip2Qformer` with `image_id`): every pair of rows that shows the same
  image is a positive, never a negative; the target spreads 1 - label_smoothing evenly over a row's positives (plus
  label_smoothing / B everywhere, torch's smoothing). With distinct ids this is exactly the one-positive loss.

  Returns (loss, sim_i2t, sim_t2i) with the similarities already divided by temp (as LAVIS)."""
  sim = itc_similarities(image_feats, text_feats) / temp
  sim_i2t, sim_t2i = sim, sim.T
  if image_ids is None:
    labels = jnp.arange(sim.shape[0])
    loss = (
      smoothed_cross_entropy(sim_i2t, labels, label_smoothing)
      + smoothed_cross_entropy(sim_t2i, labels, label_smoothing)
    ) / 2
    return loss, sim_i2t, sim_t2i
  positives = same_image(image_ids).astype(jnp.float32)
  targets = positives / positives.sum(axis=1, keepdims=True)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / sim.shape[1]
  loss = (
    optax.softmax_cross_entropy(sim_i2t.astype(jnp.float32), targets).mean()
    + optax.softmax_cross_entropy(sim_t2i.astype(jnp.float32), targets).mean()
  ) / 2
  return loss, sim_i2t, sim_t2i


def sample_hard_negatives(rng, sim_i2t, sim_t2i, image_ids=None):
  """One hard negative per row, drawn from softmax(sim) with the positive (diagonal) excluded.

  image_ids [B] (retrieval fine-tuning): every row of the same image is excluded too, as LAVIS masks them, so another
  caption of the image is never drawn as its "negative"; a row whose whole batch shows its image falls back to the
  diagonal-only exclusion (there is no true negative to draw).
  Returns (neg_text_for_image [B], neg_image_for_text [B]) as indices into the global batch. The excluded rows get
  probability exactly zero, so they are never drawn; the draw is a pure function of `rng`.
  """
  b = sim_i2t.shape[0]
  excluded = jnp.eye(b, dtype=bool)
  if image_ids is not None:
    same = same_image(image_ids)
    excluded = jnp.where(same.all(axis=1, keepdims=True), excluded, same)
  sim_i2t = jnp.where(excluded, -jnp.inf, jax.lax.stop_gradient(sim_i2t).astype(jnp.float32))
  sim_t2i = jnp.where(excluded, -jnp.inf, jax.lax.stop_gradient(sim_t2i).astype(jnp.float32))
  rng_text, rng_image = jax.random.split(rng)
  neg_text = jax.random.categorical(rng_text, sim_i2t, axis=-1)
  neg_image = jax.random.categorical(rng_image, sim_t2i, axis=-1)
  return neg_text, neg_image


def itm_loss(itm_logits, itm_labels):
  """2-way cross-entropy, no label smoothing. itm_logits: [3B, 2]; itm_labels: [3B] (1 = match)."""
  return optax.softmax_cross_entropy_with_integer_labels(itm_logits.astype(jnp.float32), itm_labels).mean()


def itg_loss(lm_logits, text_ids, text_mask, label_smoothing: float = 0.1):
  """Shifted next-token cross-entropy over the text, pads ignored (LAVIS: labels = -100 at pads).

  lm_logits: [B, T, V] at the text positions; text_ids/text_mask: [B, T]."""
  return smoothed_cross_entropy(lm_logits[:, :-1], text_ids[:, 1:], label_smoothing, weights=text_mask[:, 1:])


def lm_loss(logits, targets, weights):
  """Stage 2's language-modelling loss: cross-entropy of `targets` under `logits`, averaged over the tokens with
  weight 1 in the global batch (HF/LAVIS: labels -100 elsewhere), no label smoothing.

  logits: [B, T, V] already aligned with targets [B, T] (the caller shifts); weights: [B, T] 0/1."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)
