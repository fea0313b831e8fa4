"""Fine-tuning recipes (issue 15): same-image captions in retrieval fine-tuning's losses and data, and a fine-tune
from a stage-1 workdir with the ViT trained: exact start, exact resume, export to transformers (CPU, ~1 min)."""

import json
import os
import shutil

from flax import traverse_util
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from blip2_jax import losses
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.api import Blip2
from blip2_jax.data import pipeline
from configs import finetune_retrieval

# --- losses --------------------------------------------------------------------------------------------------


def _feats(b, q=3, e=8, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(b, q, e)).astype(np.float32)
  text = rng.normal(size=(b, e)).astype(np.float32)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.asarray(norm(image)), jnp.asarray(norm(text))


def test_itc_counts_captions_of_the_same_image_as_positives():
  image, text = _feats(4)
  temp, eps = 0.1, 0.1
  # Distinct ids: exactly the one-positive loss.
  plain = losses.itc_loss(image, text, temp, eps)[0]
  np.testing.assert_allclose(losses.itc_loss(image, text, temp, eps, jnp.asarray([7, 3, 9, 1]))[0], plain, rtol=1e-6)
  # Rows 0 and 2 show one image: each is the other's positive (target mass split evenly), never its negative.
  ids = np.asarray([5, 6, 5, 8])
  sim = np.einsum("iqe,te->itq", np.asarray(image), np.asarray(text)).max(-1) / temp
  pos = (ids[:, None] == ids[None, :]).astype(np.float64)
  target = (1 - eps) * pos / pos.sum(1, keepdims=True) + eps / 4
  log_softmax = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
  expected = (-(target * log_softmax(sim)).sum(1).mean() - (target * log_softmax(sim.T)).sum(1).mean()) / 2
  np.testing.assert_allclose(losses.itc_loss(image, text, temp, eps, jnp.asarray(ids))[0], expected, rtol=1e-5)
  # The loss then rewards, not punishes, a high similarity between image 0 and caption 2.
  grad = jax.grad(lambda s: optax.softmax_cross_entropy(s, jnp.asarray(target, jnp.float32)).mean())(
    jnp.asarray(sim, jnp.float32)
  )
  assert grad[0, 2] < 0 and grad[0, 1] > 0


def test_itm_hard_negatives_never_come_from_the_same_image():
  ids = jnp.asarray([0, 0, 1, 1, 2, 2, 2, 3])
  b = ids.shape[0]
  sim = jnp.asarray(np.random.default_rng(1).normal(size=(b, b)) * 5, jnp.float32)
  sim = sim + 50.0 * (ids[:, None] == ids[None, :])  # same-image pairs are by far the most similar
  draw = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim.T, ids))
  neg_text, neg_image = draw(jax.random.split(jax.random.PRNGKey(0), 300))
  assert not bool(jnp.any(ids[neg_text] == ids[None])) and not bool(jnp.any(ids[neg_image] == ids[None]))
  # Without ids (pre-training), only the diagonal is excluded: the same-image rows win nearly every draw.
  plain = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, sim.T))
  neg_text, _ = plain(jax.random.split(jax.random.PRNGKey(0), 300))
  assert float(jnp.mean(ids[neg_text] == ids[None])) > 0.5
  # A batch of one image has no true negative: the draw falls back to "anything but itself".
  same = jnp.zeros(4, jnp.int32)
  neg_text, neg_image = losses.sample_hard_negatives(jax.random.PRNGKey(2), sim[:4, :4], sim[:4, :4].T, same)
  assert bool(jnp.all(neg_text != jnp.arange(4))) and bool(jnp.all(neg_image != jnp.arange(4)))


# --- data ----------------------------------------------------------------------------------------------------


def test_captions_per_image_visits_every_image_that_often_with_its_id(tiny_data_dir):
  config = finetune_retrieval.get_config("tiny")
  config.data.data_dir = tiny_data_dir
  tok = state_lib.load_tokenizer(config)
  it = pipeline.make_train_iterator(config.data, tok, global_batch_size=16, seed=0)
  n = config.data.builder_kwargs["num_train"]  # one epoch: every image twice
  ids = np.concatenate([next(it)["image_id"] for _ in range(2 * n // 16)])
  counts = np.bincount(ids, minlength=n)
  assert ids.dtype == np.int32 and counts.shape == (n,) and set(counts.tolist()) == {2}


# --- a retrieval fine-tune from a stage-1 workdir ---------------------------------------------------------------


def _config(stage1_workdir, tiny_data_dir, **overrides):
  c = finetune_retrieval.get_config("tiny")
  c.init.checkpoint = stage1_workdir
  c.data.data_dir = tiny_data_dir
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _params(workdir):
  config, _, setup, state, _ = state_lib.restore_workdir(workdir, devices=jax.devices()[:1])
  del config, setup
  return traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")


def test_retrieval_finetune_starts_exactly_resumes_exactly_and_exports(stage1_workdir, tiny_data_dir, tmp_path):
  one = jax.devices()[:1]
  # 1. From the stage-1 workdir, the ViT trained: step 0 evaluates exactly the stage-1 model.
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(_config(stage1_workdir, tiny_data_dir), straight, devices=one)
  before = next(m for m in _metrics(straight) if m["step"] == 0)
  source_final = [m for m in _metrics(stage1_workdir) if "eval/r_mean" in m][-1]
  for key in ("eval/img2txt_r1", "eval/txt2img_r1", "eval/r_mean"):
    assert before[key] == source_final[key], key
  # The checkpoint holds the trained ViT (and AdamW's moments for it); it moved away from the source's.
  tuned, source = _params(straight), _params(stage1_workdir)
  vit = [p for p in tuned if p.startswith("visual_encoder/")]
  assert vit and not any(p.startswith("visual_encoder/") for p in source)  # frozen (not checkpointed) in stage 1
  source_vit = state_lib.checkpoint_params(stage1_workdir)
  assert any(not np.array_equal(tuned[p], source_vit[p]) for p in vit)

  # 2. Resumed from the middle checkpoint (step 4; the later one removed), the same command again ends with the
  # same parameters, bit for bit: the ViT and its optimizer state come back from the checkpoint.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  train.train_and_evaluate(_config(stage1_workdir, tiny_data_dir), resumed, devices=one)
  again = _params(resumed)
  assert sorted(again) == sorted(tuned)
  for p in tuned:
    np.testing.assert_array_equal(again[p], tuned[p], err_msg=p)

  # 3. Export: transformers' Blip2ForImageTextRetrieval reloads it with our ITM logits.
  ours = Blip2.from_workdir(straight, devices=one)
  ours.save_pretrained(tmp_path / "hf")
  hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  enc = tok(
    ["large red circle top left", "small blue square"], padding="max_length", max_length=12, return_tensors="np"
  )
  s = ours.cfg.vit.image_size
  x = np.random.default_rng(0).normal(size=(2, s, s, 3)).astype(np.float32)
  with torch.no_grad():
    itm = hf(
      pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      input_ids=torch.from_numpy(enc["input_ids"]),
      attention_mask=torch.from_numpy(enc["attention_mask"]),
      use_image_text_matching_head=True,
    ).logits_per_image
  # ln_vision's eps 1e-5 is written as the ViT's 1e-6 (HF has one eps for both): ~5e-6 relative.
  assert helpers.rel_error(ours.itm_logits(x, enc["input_ids"], enc["attention_mask"]), itm) < 1e-4
