r"""BLIP-2 trainer: `python -m blip2_jax.train --config=configs/stage1.py[:VARIANT] --workdir=DIR`.

One flat train_and_evaluate() in sections, big_vision style: tokenizer and input pipeline -> model, optimizer, mesh
and born-sharded state (or resume; state.py) -> update step -> loop with logging, evaluation and checkpoints. The same
program runs on one CPU, on 8 fake CPU devices, on a GPU node and on a TPU pod; only the mesh changes.
"""

import logging
import math
import os
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from blip2_jax import checkpointing
from blip2_jax import cli
from blip2_jax import collapse
from blip2_jax import evaluators
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax.data import pipeline
from blip2_jax.metric_writer import MetricWriter
from blip2_jax.models import llms

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  pass


def make_train_step(setup: state_lib.Setup):
  """The jitted update. Gradients are taken w.r.t. the trainable tree only; the state is donated."""
  model, tx, schedule = setup.model, setup.tx, setup.schedule

  def train_step(state, frozen, batch):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    itm_rng, dropout_rng = jax.random.split(step_rng)

    def loss_fn(params):
      out = model.apply(
        {"params": partitioning.merge(params, frozen)},
        batch,
        train=True,
        rngs={"itm": itm_rng, "dropout": dropout_rng},
        method="losses",
      )
      return out["loss"], out

    with setup.kernel_mesh():
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, lr=schedule(state["step"]), grad_norm=optax.global_norm(grads))
    if "temp" in state["params"]:
      metrics["temp"] = state["params"]["temp"]
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

  return jax.jit(
    train_step,
    in_shardings=(setup.state_shardings, setup.frozen_shardings, setup.batch_sharding),
    out_shardings=(setup.state_shardings, partitioning.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


def compile_train_step(config, setup: state_lib.Setup, state, frozen):
  """make_train_step for the loop. With several processes it is compiled first, and then all processes start the
  loop together: CPU collectives (gloo) give up when a process reaches the first one 30 s before another, e.g.
  one still compiling."""
  step = make_train_step(setup)
  if jax.process_count() == 1:
    return step
  shapes = jax.eval_shape(lambda: state_lib.dummy_batch(config, config.global_batch_size))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding) for k, v in shapes.items()}
  compiled = step.lower(state, frozen, batch).compile()
  checkpointing.sync_processes("blip2_jax.train: train step compiled")
  return compiled


def _skipped_samples() -> dict:
  """data/skipped_<reason>: examples the input pipelines of all processes have dropped so far, per reason."""
  counts = pipeline.skipped_counts()
  totals = np.asarray(list(counts.values()), np.int64)
  if jax.process_count() > 1:
    totals = multihost_utils.process_allgather(totals).sum(0)
  return {f"data/skipped_{reason}": int(n) for reason, n in zip(counts, totals)}


def make_image_gain_fn(setup: state_lib.Setup):
  """Stage 2's collapse check (collapse.py): the loss on a batch with its images shifted by one, minus the loss
  with the right images; about zero when the soft prompts carry nothing about the image. Run at logged steps."""
  model = setup.model

  def image_gain(params, frozen, batch):
    variables = {"params": partitioning.merge(params, frozen)}
    shifted = dict(batch, image=jnp.roll(batch["image"], 1, axis=0))
    with setup.kernel_mesh():
      loss = model.apply(variables, batch, train=False, method="losses")["loss"]
      return model.apply(variables, shifted, train=False, method="losses")["loss"] - loss

  return jax.jit(
    image_gain,
    in_shardings=(setup.state_shardings["params"], setup.frozen_shardings, setup.batch_sharding),
    out_shardings=partitioning.replicated(setup.mesh),
  )


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Runs training to config.total_steps (resuming from workdir if possible); returns the last metrics.

  devices: the devices of the mesh (default: all)."""
  os.makedirs(workdir, exist_ok=True)
  config = state_lib.resolve_demo_llm(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  # 1. Tokenizer(s) and input pipeline: each process reads only its share of the global batch. A question-conditioned
  # model's Q-Former has a tokenizer of its own (VQA fine-tuning; None otherwise).
  tokenizer = state_lib.load_tokenizer(config)
  qformer_tokenizer = state_lib.load_qformer_tokenizer(config)
  kind = state_lib.kind(config)
  if config.global_batch_size % jax.process_count():
    raise ValueError(
      f"config.global_batch_size={config.global_batch_size} is not divisible by the {jax.process_count()} processes."
    )
  train_iter = pipeline.make_train_iterator(
    config.data,
    tokenizer,
    global_batch_size=config.global_batch_size,
    seed=config.seed,
    kind=kind,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    qformer_tokenizer=qformer_tokenizer,
  )

  # 2. Model, optimizer, mesh and shardings; parameters are born sharded.
  setup = state_lib.build(config, tokenizer, devices)
  data_parallel = math.prod(setup.mesh.shape[a] for a in jax.tree.leaves(dict(setup.rules)["batch"]))
  if config.global_batch_size % data_parallel:
    raise ValueError(
      f"config.global_batch_size={config.global_batch_size} is not divisible by the "
      f"{data_parallel} devices the batch is split over (mesh {dict(setup.mesh.shape)})."
    )
  mngr = checkpointing.manager(workdir, config.keep_checkpoints)
  state, frozen, data_state = state_lib.restore_or_init(config, setup, mngr)
  if data_state is not None:
    train_iter.set_state(data_state)
  train_step = compile_train_step(config, setup, state, frozen)
  evaluator = evaluators.make_evaluator(config, setup, tokenizer)
  writer = MetricWriter(workdir)
  guard = collapse.CollapseGuard(
    global_batch_size=config.global_batch_size,
    warmup_steps=config.optimizer.warmup_steps,
    patience=config.collapse_patience,
    stage2=kind != llms.RETRIEVAL,
  )
  image_gain = make_image_gain_fn(setup) if kind != llms.RETRIEVAL and config.collapse_patience else None

  # 3. The loop. Metrics of step s are read back after step s+1 is dispatched, so the host never stalls the
  # device; a checkpoint is written only after its step's loss was seen to be finite.
  step = int(jax.device_get(state["step"]))
  if step == 0 and config.get("eval_at_start", False):
    # Fine-tuning: the starting model on the same evaluation, so the run's own log shows before and after.
    _log_eval(0, evaluator.run(partitioning.merge(state["params"], frozen)), writer, {})
  progress = _progress_bar(step, config.total_steps)
  preemption = checkpointing.Preemption()
  try:
    last = _loop(
      config,
      setup,
      state,
      frozen,
      step,
      train_iter,
      train_step,
      evaluator,
      mngr,
      writer,
      progress,
      guard,
      image_gain,
      preemption,
    )
    _write_examples(workdir, evaluator, writer, config.total_steps)
  finally:
    # Also on an error: let the checkpoints already queued finish writing, so nothing saved is lost.
    progress.close()
    preemption.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return last


def _loop(
  config,
  setup,
  state,
  frozen,
  step,
  train_iter,
  train_step,
  evaluator,
  mngr,
  writer,
  progress,
  guard,
  image_gain,
  preemption,
):
  """One batch at a time from the iterator through the update; logging, checkpoints and evaluation. On a
  preemption notice: a checkpoint of this step, then return (the same command resumes)."""
  start_step, t0, last = step, time.time(), {}
  pending = None
  while step < config.total_steps:
    batch = state_lib.global_batch(next(train_iter), setup.batch_sharding)
    state, metrics = train_step(state, frozen, batch)
    step += 1
    if pending is not None:
      last = _check_finite(*pending)
    pending = (step, metrics)

    if step % config.log_every == 0 or step == config.total_steps:
      last = _check_finite(*pending)
      pending = None
      dt = time.time() - t0
      last["samples_per_s"] = (step - start_step) * config.global_batch_size / max(dt, 1e-9)
      last.update(_skipped_samples())
      if image_gain is not None:
        last["lm_image_gain"] = float(image_gain(state["params"], frozen, batch))
      guard.update(step, last)
      start_step, t0 = step, time.time()
      writer.write(step, last)
      progress.set_postfix(loss=f"{last['loss']:.3f}", samples_per_s=f"{last['samples_per_s']:.0f}")
    progress.update(1)

    is_last = step == config.total_steps
    preempted = preemption.reached(step)
    if step % config.checkpoint_every == 0 or is_last or preempted:
      if pending is not None:
        last = _check_finite(*pending)
        pending = None
      checkpointing.save(mngr, step, state, train_iter.get_state())
    if preempted and not is_last:
      log.warning("Preempted: saved step %d; the same command resumes from it.", step)
      return last
    evaluate_now = bool(config.eval_every) and step % config.eval_every == 0
    if evaluate_now or is_last:
      params = partitioning.merge(state["params"], frozen)
      n = config.eval.during_training_images
      if evaluate_now and n:
        # A cheap look on the split's first n images, every eval_every steps, as a curve of its own (eval_N/).
        _log_eval(
          step, {k.replace("eval/", f"eval_{n}/", 1): v for k, v in evaluator.run(params, n).items()}, writer, last
        )
      if is_last or not n:
        _log_eval(step, evaluator.run(params), writer, last)
      t0 = time.time()  # evaluation time is not training throughput
  return last


def _log_eval(step: int, metrics: dict, writer, last: dict):
  writer.write(step, metrics)
  last.update(metrics)
  log.info("step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})


def _write_examples(workdir: str, evaluator, writer, step: int):
  """WORKDIR/examples.png and the same picture in TensorBoard: the last evaluation's first held-out examples."""
  if jax.process_index() != 0 or evaluator.shown is None:
    return
  picture = evaluator.picture()
  path = os.path.join(workdir, "examples.png")
  picture.save(path)
  writer.write_image(step, "examples", np.asarray(picture))
  log.info("Wrote %s.", path)


def _check_finite(step: int, metrics) -> dict:
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(metrics["loss"]):
    parts = ", ".join(f"{k[5:]}={v}" for k, v in metrics.items() if k.startswith("loss_"))
    raise TrainingError(
      f"Non-finite loss {metrics['loss']} at step {step} ({parts}); stopping without saving "
      f"it. The last checkpoint is intact: lower config.optimizer.lr or check the data."
    )
  return metrics


def _progress_bar(initial: int, total: int):
  return tqdm.tqdm(
    total=total, initial=initial, desc="train", unit="step", disable=jax.process_index() != 0, dynamic_ncols=True
  )


def _fail(message: str):
  """Exits with `message`. A process of a multi-process run exits at once: a normal exit would wait at JAX's
  shutdown barrier for the other processes, which wait for this one in their next collective, for minutes."""
  if not FLAGS.multihost:
    raise SystemExit(message)
  print(message, file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def main(argv):
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required (checkpoints, metrics.jsonl and TensorBoard files go there).")
  if FLAGS.multihost:
    cli.initialize_distributed()
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty at INFO
  logging.getLogger("blip2_jax").setLevel(logging.INFO)
  try:
    last = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (TrainingError, FileNotFoundError, ValueError) as e:
    _fail(f"error: {e}")
  except Exception:  # pylint: disable=broad-except
    if not FLAGS.multihost:
      raise
    _fail(traceback.format_exc())
  if jax.process_index() == 0:
    print({k: round(v, 4) for k, v in last.items()})


if __name__ == "__main__":
  # The trainer is also a library (diagnose and benchmark run its step; tests its loop): its flags exist only when it
  # is the program, so importing it defines none.
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go.")
  flags.DEFINE_bool(
    "multihost",
    False,
    "Join a multi-process run first (TPU pods, multi-node GPU, launch/local.sh): cli.initialize_distributed.",
  )
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
