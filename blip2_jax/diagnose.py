r"""Stage-1 training diagnostics: how input-dependent each stage of the forward pass is, step by step.

  python -m blip2_jax.diagnose --config=configs/stage1.py:demo --out=diag.jsonl --steps=200 [--config.x=...]

Trains with the trainer's own update step (no checkpoints, no evaluation) and, at steps 0, 5, ..., 95, then every
25, writes one JSON line of statistics on a fixed probe batch (the eval split's first `--probe` pairs):
- `div/<quantity>`: the share of the quantity's energy that varies across the probe's inputs, 1 - |mean_b x|^2 /
  mean_b |x|^2 over its flattened features; 0 means every input gives the same output (collapse). Quantities, in
  forward order: `vit` (frozen ViT output), `ln_vision`, `query_l<i>` (query outputs after Q-Former layer i),
  `image_feats` (normalised vision_proj), `text_cls` and `text_feat` (the text side of ITC), `itm_query` (the
  query outputs of the matching pass, on the positive pairs);
- `sim_pos`, `sim_neg`: mean ITC cosine (max over queries) of matching and of non-matching pairs;
- `grad/<loss>/<group>`: the norm of each loss's gradient (itc, itm, itg) on the current training batch, for the
  query tokens, the cross-attention layers, the whole Q-Former and ln_vision: which loss drives the Q-Former;
- the training metrics of the step (loss_itc, loss_itm, loss_itg, lr, temp, grad_norm).
The README's "Stability" section reads these to explain why a recipe learns or collapses.
"""

import json
import time

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from blip2_jax import cli
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.data import pipeline
from blip2_jax.models import llms
from blip2_jax.models import masks

FLAGS = flags.FLAGS
GRAD_GROUPS = {
  "query_tokens": "query_tokens",
  "cross": "crossattention",
  "qformer": "qformer/",
  "ln_vision": "ln_vision/",
}


def diversity(x):
  """1 - |batch mean|^2 / mean |x|^2 of x [B, ...] flattened per example: 0 = the same for every input."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  return 1.0 - jnp.sum(x.mean(0) ** 2) / jnp.maximum(jnp.mean(jnp.sum(x**2, axis=1)), 1e-20)


def probe(m, images, text_ids, text_mask) -> dict:
  """The statistics of one Blip2Qformer forward on a probe batch (bound module `m`, deterministic)."""
  out = {}
  vit = m.visual_encoder(images)
  image_embeds = m.ln_vision(vit.astype(jnp.float32))
  out["div/vit"], out["div/ln_vision"] = diversity(vit), diversity(image_embeds)
  b, q = images.shape[0], m.cfg.num_query_tokens
  queries = jnp.broadcast_to(m.query_tokens, (b,) + m.query_tokens.shape[1:])
  x = m.qformer.embed(queries)
  for i, layer in enumerate(m.qformer.layers):
    x, _ = layer(x, q, None, image_embeds)
    out[f"div/query_l{i}"] = diversity(x)
  image_feats = m.image_feats(x)
  text_cls = m.text_features(text_ids, text_mask)
  text_feat = m.text_feat(text_cls)
  out["div/image_feats"], out["div/text_cls"], out["div/text_feat"] = (
    diversity(image_feats),
    diversity(text_cls),
    diversity(text_feat),
  )
  sim = jnp.einsum("iqe,te->itq", image_feats, text_feat).max(-1)
  eye = jnp.eye(b, dtype=bool)
  out["sim_pos"] = jnp.sum(jnp.where(eye, sim, 0)) / b
  out["sim_neg"] = jnp.sum(jnp.where(eye, 0, sim)) / (b * b - b)
  x = m.qformer.embed(queries, text_ids)
  x, _ = m.qformer.encode(x, q, masks.bidirectional_mask(q, text_mask), image_embeds)
  out["div/itm_query"] = diversity(x[:, :q])
  return out


def make_stats_fn(setup, probe_batch: dict):
  model = setup.model

  def stats(params, frozen, batch, rng):
    out = model.apply(
      {"params": partitioning.merge(params, frozen)},
      probe_batch["image"],
      probe_batch["text_ids"],
      probe_batch["text_mask"],
      method=probe,
    )
    for loss in ("itc", "itm", "itg"):

      def one_loss(p, loss=loss):
        return model.apply(
          {"params": partitioning.merge(p, frozen)}, batch, train=False, rngs={"itm": rng}, method="losses"
        )[f"loss_{loss}"]

      grads = traverse_util.flatten_dict(jax.grad(one_loss)(params), sep="/")
      for group, key in GRAD_GROUPS.items():
        leaves = [g for path, g in grads.items() if key in path or path.startswith(key)]
        out[f"grad/{loss}/{group}"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
    return out

  return jax.jit(stats)


def diagnose(config, out_path: str, steps: int, probe_size: int = 64, devices=None) -> list[dict]:
  """Trains `steps` steps of a stage-1 config and writes (and returns) the statistics rows; devices: the mesh's
  devices (default: all)."""
  if state_lib.kind(config) != llms.RETRIEVAL:
    raise ValueError("blip2_jax.diagnose reads a stage-1 config (configs/stage1.py); this one is stage 2.")
  tokenizer = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tokenizer, devices)
  train_iter = pipeline.make_train_iterator(
    config.data, tokenizer, global_batch_size=config.global_batch_size, seed=config.seed
  )
  state, frozen = setup.init(jax.random.PRNGKey(config.seed))
  state, frozen = state_lib.load_pretrained(config, setup, state, frozen)
  eval_set = pipeline.load_eval_set(config.data, tokenizer)
  probe_batch = {
    "image": jnp.asarray(eval_set["images"][:probe_size]),
    "text_ids": jnp.asarray(eval_set["text_ids"][:probe_size]),
    "text_mask": jnp.asarray(eval_set["text_mask"][:probe_size]),
  }
  stats_fn = make_stats_fn(setup, probe_batch)
  train_step = train.make_train_step(setup)
  at = set(range(0, min(steps, 100), 5)) | set(range(100, steps + 1, 25)) | {steps}
  rows, metrics, t0 = [], None, time.time()
  with open(out_path, "w", encoding="utf-8") as f:
    for step in range(steps + 1):
      batch = state_lib.global_batch(next(train_iter), setup.batch_sharding)
      if step in at:
        row = {"step": step, **jax.device_get(stats_fn(state["params"], frozen, batch, jax.random.PRNGKey(step)))}
        if metrics is not None:
          row.update(jax.device_get(metrics))
        row = {k: (v if k == "step" else float(v)) for k, v in row.items()}
        rows.append(row)
        f.write(json.dumps(row) + "\n")
        f.flush()
        print(
          f"step {step:5d} ({time.time() - t0:4.0f} s): "
          + ", ".join(
            f"{k}={row[k]:.4f}"
            for k in (
              "loss_itc",
              "loss_itg",
              "div/ln_vision",
              "div/image_feats",
              "div/text_feat",
              "sim_pos",
              "sim_neg",
              "grad/itc/qformer",
              "grad/itg/qformer",
            )
            if k in row
          ),
          flush=True,
        )
      if step < steps:
        state, metrics = train_step(state, frozen, batch)
  return rows


def main(argv):
  del argv
  try:
    diagnose(FLAGS.config, FLAGS.out, FLAGS.steps, FLAGS.probe)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "A stage-1 config file.", lock_config=True)
  flags.DEFINE_string("out", "diagnose.jsonl", "Where the JSON lines of statistics go.")
  flags.DEFINE_integer("steps", 200, "Training steps.")
  flags.DEFINE_integer("probe", 64, "Probe pairs (the eval split's first).")
  flags.mark_flags_as_required(["config"])
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
