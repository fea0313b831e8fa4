"""The collapse guard (blip2_jax.collapse): which metric sequences warn, once, and which don't."""

import logging
import math

import pytest

from blip2_jax.collapse import CollapseGuard

CHANCE = math.log(64)


def guard(stage2=False, patience=3):
  return CollapseGuard(global_batch_size=64, warmup_steps=100, patience=patience, stage2=stage2)


def feed(g, values, key="loss_itc", start=125, every=25, **extra):
  return [g.update(start + i * every, {key: v, **extra}) for i, v in enumerate(values)]


def test_itc_at_chance_after_warmup_warns_once_naming_the_symptom(caplog):
  g = guard()
  with caplog.at_level(logging.WARNING, logger="blip2_jax.collapse"):
    out = feed(g, [CHANCE, CHANCE * 1.005, CHANCE * 0.995, CHANCE, CHANCE])
  assert out[:2] == [None, None] and out[3:] == [None, None]
  assert out[2].startswith(
    "Training looks collapsed at step 175: loss_itc (4.1381) is at chance, log(global batch 64) = 4.1589"
  )
  assert [r.getMessage() for r in caplog.records] == [out[2]]


def test_no_warning_during_warmup_off_chance_or_when_the_run_breaks():
  assert feed(guard(), [CHANCE] * 10, start=0, every=10) == [None] * 10  # steps 0..90: warmup
  assert feed(guard(), [CHANCE * 0.98] * 10) == [None] * 10  # 2% below chance: learning
  # Two at chance, one off, two at chance: never three in a row.
  assert feed(guard(), [CHANCE, CHANCE, 3.0, CHANCE, CHANCE]) == [None] * 5
  assert feed(guard(patience=0), [CHANCE] * 10) == [None] * 10  # off


@pytest.mark.parametrize("gain, warns", [(0.001, True), (-0.2, True), (0.05, False)])
def test_stage2_warns_when_the_right_image_does_not_lower_the_loss(gain, warns):
  out = feed(guard(stage2=True), [2.0] * 3, key="loss_lm", lm_image_gain=gain)
  assert (out[-1] is not None) == warns
  if warns:
    assert "no lower with the right image than with another image" in out[-1]
  # Stage 1's metric means nothing to the stage-2 guard, and a stage-2 run without the gain never warns.
  assert feed(guard(stage2=True), [CHANCE] * 5) == [None] * 5
