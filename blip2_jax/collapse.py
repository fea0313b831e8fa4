"""A guard against the silent failure of BLIP-2 training: a Q-Former whose output no longer depends on the image.

Stage 1: the contrastive loss sits at log(global batch), its value when every image is as similar to every text
(the losses look "stable", and ITG still falls: the text decoder learns the captions' language alone).
Stage 2: the LM loss is no lower with the right image than with another one from the batch: the soft prompts
carry nothing about the image, and the loss is the LLM's unconditional caption loss.

The trainer feeds the guard every logged metrics dict; after warmup, when the symptom has held for
`config.collapse_patience` logged steps in a row, it logs one warning naming the symptom and the usual remedies.
Training goes on: a run can still escape, and the checkpoints are the user's to judge.
"""

import logging
import math

log = logging.getLogger(__name__)

TOLERANCE = 0.01  # relative: within 1% of chance (stage 1); an image gain below 1% of the loss (stage 2)

REMEDIES = (
  "lower config.optimizer.lr or lengthen config.optimizer.warmup_steps; clip gradients "
  "(config.optimizer.grad_clip=1.0); for a randomly initialised Q-Former narrower than BERT-base, scale "
  "config.model.qformer.init_std by sqrt(768 / hidden_size); check that the frozen image encoder's "
  "features differ between images (real weights, config.init.vision_weights)"
)


class CollapseGuard:
  """update(step, metrics) -> the warning (also logged) the first time the symptom has held long enough, else None.

  Stage 1 reads `loss_itc`; stage 2 reads `loss_lm` and `lm_image_gain` (the loss with the batch's images
  shifted by one, minus the loss)."""

  def __init__(self, *, global_batch_size: int, warmup_steps: int, patience: int, stage2: bool):
    self.chance = math.log(global_batch_size)
    self.warmup_steps, self.patience, self.stage2 = warmup_steps, patience, stage2
    self.run, self.warned = 0, False

  def symptom(self, metrics: dict) -> str | None:
    if self.stage2:
      gain, loss = metrics.get("lm_image_gain"), metrics.get("loss_lm")
      if gain is None or loss is None or gain >= TOLERANCE * loss:
        return None
      return (
        f"the stage-2 LM loss ({loss:.4f}) is no lower with the right image than with another image of the "
        f"batch (gain {gain:+.4f}): the Q-Former's soft prompts carry nothing about the image"
      )
    itc = metrics.get("loss_itc")
    if itc is None or abs(itc - self.chance) > TOLERANCE * self.chance:
      return None
    return (
      f"loss_itc ({itc:.4f}) is at chance, log(global batch {round(math.exp(self.chance))}) = "
      f"{self.chance:.4f}: every image is as similar to every text, so the Q-Former's image (or text) "
      "features no longer depend on their input"
    )

  def update(self, step: int, metrics: dict) -> str | None:
    if not self.patience or self.warned or step <= self.warmup_steps:
      return None
    symptom = self.symptom(metrics)
    self.run = self.run + 1 if symptom else 0
    if self.run < self.patience:
      return None
    self.warned = True
    message = (
      f"Training looks collapsed at step {step}: {symptom}, for the last {self.run} logged steps. Usual "
      f"remedies: {REMEDIES}. Training goes on."
    )
    log.warning(message)
    return message
