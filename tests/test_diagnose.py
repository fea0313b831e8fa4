"""blip2_jax.diagnose: the input-dependence statistics, and a short run on the tiny config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import diagnose
from configs import stage1
from configs import stage2_opt


def test_diversity_is_zero_for_identical_inputs_and_one_for_zero_mean_ones():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 5)), jnp.float32)
  assert float(diagnose.diversity(jnp.repeat(x, 4, axis=0))) == pytest.approx(0.0, abs=1e-6)
  assert float(diagnose.diversity(jnp.concatenate([x, -x]))) == pytest.approx(1.0, abs=1e-6)
  # A shared offset 3x the size of the varying part leaves a tenth of the energy varying.
  y = jnp.stack([jnp.array([3.0, 1.0]), jnp.array([3.0, -1.0])])
  assert float(diagnose.diversity(y)) == pytest.approx(0.1, abs=1e-6)


def test_short_run_writes_every_statistic(tiny_data_dir, tmp_path):
  c = stage1.get_config("tiny")
  c.data.data_dir = tiny_data_dir
  c.sharding.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  out = tmp_path / "diag.jsonl"
  rows = diagnose.diagnose(c, str(out), steps=5, probe_size=16, devices=jax.devices()[:1])
  assert [r["step"] for r in rows] == [0, 5]
  assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [0, 5]
  divs = {k for k in rows[0] if k.startswith("div/")}
  assert divs == {
    "div/vit",
    "div/ln_vision",
    "div/query_l0",
    "div/query_l1",
    "div/image_feats",
    "div/text_cls",
    "div/text_feat",
    "div/itm_query",
  }
  assert all(0.0 <= rows[-1][k] <= 1.0 for k in divs)
  assert rows[0]["div/vit"] > 0.01  # random images through a random ViT differ
  assert {f"grad/{l}/{g}" for l in ("itc", "itm", "itg") for g in diagnose.GRAD_GROUPS} <= set(rows[0])
  assert "loss_itc" not in rows[0] and np.isfinite(rows[-1]["loss_itc"])  # training metrics from step 1 on
  with pytest.raises(ValueError, match="stage-1 config"):
    diagnose.diagnose(stage2_opt.get_config("tiny"), str(out), steps=1)
