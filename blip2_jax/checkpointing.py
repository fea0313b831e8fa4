"""Orbax checkpoints under WORKDIR/checkpoints: trainable params, optimizer state, step, rng and the data
iterator's position. Frozen weights are not saved: they come back from their source (config.init).

Saving is asynchronous (the next steps run while the previous state is written); a step directory appears
only once it is complete, so a crash mid-write leaves the previous checkpoint as the latest.
"""

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True),
    item_names=("state", "data"),
  )


def save(mngr: ocp.CheckpointManager, step: int, state, data_state) -> None:
  mngr.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True
  )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """abstract_state: a tree of jax.ShapeDtypeStruct carrying the target shardings."""
  out = mngr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
  )
  return out["state"], out["data"]


class Preemption:
  """Whether the run should save and stop at this step: a SIGTERM arrived (the notice TPU VMs, SLURM and
  Kubernetes give before they stop a job). With several processes JAX's preemption sync point (installed by
  jax.distributed.initialize, which catches SIGTERM) makes every process stop at the same step, whichever got
  the signal; with one, a SIGTERM handler does. `reached(step)` must be called at every step, on every process."""

  def __init__(self):
    self._signalled, self._previous = False, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True
    logging.getLogger(__name__).warning("SIGTERM: saving a checkpoint after this step, then stopping.")

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def sync_processes(name: str, timeout_s: int | None = None) -> None:
  """A barrier of all processes through JAX's coordination service (no collective: usable before the first
  one). `name` must be new each time; `timeout_s` defaults to Orbax's (300 s)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
