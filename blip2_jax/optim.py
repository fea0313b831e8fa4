"""AdamW as in the reference: betas (0.9, 0.98), weight decay 0.05 except on biases, norms and 1-D params;
linear warmup then cosine decay to min_lr (step-based here, epoch-based in LAVIS)."""

from flax import traverse_util
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


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, mask=decay_mask):
  """Returns (optax transformation, schedule). The transformation only ever sees the trainable tree.

  mask: params -> a tree of bools, True where weight decay applies (default: decay_mask)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*parts), schedule
