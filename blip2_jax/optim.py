"""AdamW as in the reference: betas (0.9, 0.98), weight decay 0.05 except on biases, norms and 1-D params;
linear warmup then cosine decay to min_lr (step-based here, epoch-based in LAVIS). When the image encoder trains
(fine-tuning), `optimizer.vit_layer_decay` < 1 scales its learning rate per layer (layer_decay_scales)."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=cfg.warmup_lr,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.min_lr,
  )


def decay_mask(params):
  """True where weight decay applies: weights of >= 2 dims that are neither biases nor norm parameters.

  LAVIS skips `p.ndim < 2 or 'bias' in name or 'ln'/'bn' in name`; our norms are 1-D scale/bias leaves."""
  flat = traverse_util.flatten_dict(params)
  mask = {k: (v.ndim >= 2 and k[-1] not in ("bias", "scale")) for k, v in flat.items()}
  return traverse_util.unflatten_dict(mask)


def layer_decay_scales(params, decay: float):
  """The learning-rate multiplier of every parameter under layer-wise decay (BEiT's, which EVA and LAVIS's BLIP-2
  fine-tuning use for the ViT): with `depth` blocks, block i (0-based) gets decay ** (depth - i), the patch
  embedding, [CLS] token and position embedding decay ** (depth + 1), and every parameter outside
  `visual_encoder/` (ln_vision, Q-Former, ...) 1. Leaves of the scanned blocks are stacked on a leading layer
  axis, so theirs is a [depth, 1, ...] array that broadcasts over it; the others are scalars."""
  flat = traverse_util.flatten_dict(params)
  blocks = [v for k, v in flat.items() if k[:2] == ("visual_encoder", "blocks")]
  depth = blocks[0].shape[0] if blocks else 0
  per_block = decay ** (depth - jnp.arange(depth, dtype=jnp.float32))

  def scale(path, leaf):
    if path[0] != "visual_encoder":
      return jnp.float32(1.0)
    if path[1] == "blocks":
      return per_block.reshape((depth,) + (1,) * (leaf.ndim - 1))
    return jnp.float32(decay ** (depth + 1))

  return traverse_util.unflatten_dict({k: scale(k, v) for k, v in flat.items()})


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by layer_decay_scales (after AdamW: the same as a per-layer learning rate, weight
  decay included, as torch's per-group lr does in LAVIS)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, layer_decay_scales(updates, decay)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, mask=decay_mask):
  """Returns (optax transformation, schedule). The transformation only ever sees the trainable tree.

  mask: params -> a tree of bools, True where weight decay applies (default: decay_mask). cfg.vit_layer_decay
  (default 1, off): layer-wise learning-rate decay of a trainable ViT (scale_by_layer_decay)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay, mask=mask))
  decay = cfg.get("vit_layer_decay", 1.0)
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"config.optimizer.vit_layer_decay={decay} is not in (0, 1] (1 = off).")
  if decay < 1.0:
    parts.append(scale_by_layer_decay(decay))
  return optax.chain(*parts), schedule
