"""Metrics to WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard event files (tensorboardX,
so no TensorFlow), written by process 0 only."""

import json
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def write_image(self, step: int, tag: str, image) -> None:
    """An RGB uint8 [H, W, 3] image to TensorBoard."""
    if self.enabled:
      self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
