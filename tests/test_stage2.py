"""Stage 2 end to end on tiny configs: the trainer with a frozen OPT / T5 (the demo's caption-trained LLM),
frozen weights held out of the optimizer, evaluation by captioning, generation from the workdir, and export of
the workdir into transformers' Blip2ForConditionalGeneration with the same logits."""

import json
import os
import subprocess
import sys

from conftest import one_device_env
from flax import traverse_util
import jax
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax import tasks
from blip2_jax.api import Blip2
from blip2_jax.data import images as images_lib
from blip2_jax.data import pipeline
from configs import stage2_opt
from configs import stage2_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"opt": stage2_opt, "t5": stage2_t5}


@pytest.fixture(scope="module")
def workdirs(tiny_data_dir, tmp_path_factory):
  """kind -> a tiny stage-2 workdir trained by the CLI (12 steps), with its final metrics."""
  out = {}
  for kind in ("opt", "t5"):
    workdir = str(tmp_path_factory.mktemp(f"stage2_{kind}"))
    r = subprocess.run(
      [
        sys.executable,
        "-m",
        "blip2_jax.train",
        f"--config=configs/stage2_{kind}.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.eval_every=6",
        "--config.eval.during_training_images=8",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
      env=one_device_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      out[kind] = (workdir, [json.loads(line) for line in f])
  return out


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_trains_reports_captions_and_keeps_llm_frozen(workdirs, kind):
  workdir, metrics = workdirs[kind]
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert losses[-1] < losses[0]
  final = [m for m in metrics if "eval/cider" in m][-1]
  assert {"eval/exact_match", "eval/bleu4", "eval/cider"} <= set(final)
  # A cheap evaluation on the first 8 images at steps 6 and 12, the whole split at the end, and a picture.
  assert [(m["step"], m["eval_8/num_images"]) for m in metrics if "eval_8/cider" in m] == [(6, 8), (12, 8)]
  assert [(m["step"], m["eval/num_images"]) for m in metrics if "eval/cider" in m] == [(12, 32)]
  assert os.path.getsize(os.path.join(workdir, "examples.png")) > 0
  # The collapse guard's reading at every logged step: the loss with shifted images minus the loss.
  gains = [m["lm_image_gain"] for m in metrics if "loss" in m]
  assert len(gains) == 3 and all(np.isfinite(gains))
  # The frozen LLM (and ViT) are the demo LLM's / init values, and only the Q-Former side is in the optimizer.
  model = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  params = traverse_util.flatten_dict(jax.device_get(model.params), sep="/")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  stored = load_file(os.path.join(workdir, "demo_llm", "model.safetensors"))
  first = "model.decoder.layers.0.fc1.weight" if kind == "opt" else "encoder.block.0.layer.0.SelfAttention.q.weight"
  ours = (
    "language_model/layers/fc1/kernel" if kind == "opt" else "language_model/encoder/layers/self_attention/q/kernel"
  )
  np.testing.assert_array_equal(params[ours][0], stored[first].T)
  config = state_lib.resolve_demo_llm(CONFIGS[kind].get_config("tiny"), workdir)
  config.data.data_dir = os.path.dirname(workdir)
  from blip2_jax import checkpointing  # pylint: disable=g-import-not-at-top

  setup = state_lib.build(config, state_lib.load_tokenizer(config), devices=jax.devices()[:1])
  opt_state_paths = {
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(setup.abstract_state["opt_state"])[0]
  }
  assert not any("language_model" in p or "visual_encoder" in p for p in opt_state_paths)
  assert any("qformer" in p for p in opt_state_paths)
  del checkpointing


def test_captions_split_over_devices_equal_one_device(workdirs, tiny_data_dir):
  """The evaluator's captioning with the batch split over 8 devices (data 2 x fsdp 4: each device captions its
  rows, the parameters sharded) gives one device's captions, token for token."""
  workdir, _ = workdirs["opt"]
  config = state_lib.load_workdir_config(workdir)
  config.sharding.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
  config, tokenizer, setup, state, frozen = state_lib.restore_workdir(workdir, config, devices=jax.devices()[:8])
  config.data.data_dir = tiny_data_dir
  images = pipeline.load_eval_set(config.data, tokenizer)["images"][:8]
  settings = dict(num_beams=2, max_new_tokens=6, min_new_tokens=2)
  # A tiny model trained 12 steps captions every image alike: a prompt per image makes the rows differ.
  prompts = ["a photo of", "a", "large", "small", "the", "blue", "a red", "top"]
  params = partitioning.merge(state["params"], frozen)
  split = tasks.generate_text(
    setup.model, params, tokenizer, images, prompts, sharding=setup.batch_sharding, **settings
  )
  one = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  assert split == tasks.generate_text(one.module, one.params, one.tokenizer, images, prompts, **settings)
  assert len(set(split)) > 1, split
  with pytest.raises(ValueError, match="7 images do not split over the 8 batch shards"):
    tasks.generate_text(setup.model, params, tokenizer, images[:7], "a photo of", sharding=setup.batch_sharding)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_workdir_generates_and_exports_to_transformers(workdirs, kind, tmp_path):
  workdir, _ = workdirs[kind]
  model = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  size = model.cfg.vit.image_size
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  captions = model.generate(x, "a photo of", max_new_tokens=6)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

  r = subprocess.run(
    [sys.executable, "-m", "blip2_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=one_device_env(),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  hf = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  tok = model.tokenizer
  ids = np.asarray(tok(["a photo of", "a photo of large"], padding="max_length", max_length=6).input_ids)
  mask = (ids != tok.pad_token_id).astype(np.int64)
  q = model.cfg.num_query_tokens
  image_token = hf.config.image_token_index
  hf_ids = torch.from_numpy(np.concatenate([np.full((2, q), image_token), ids], axis=1))
  hf_mask = torch.from_numpy(np.concatenate([np.ones((2, q), np.int64), mask], axis=1))
  px = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    if kind == "opt":
      theirs = hf(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask).logits
      ours = model.lm_logits(x, ids, mask)
    else:
      dec = torch.zeros((2, 3), dtype=torch.long)
      theirs = hf(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, decoder_input_ids=dec).logits
      ours = model.lm_logits(x, ids, mask, dec.numpy())
  theirs = theirs.numpy()[..., : ours.shape[-1]]  # the export's extra <image> row
  if kind == "opt":  # compare where HF's positions are real tokens (padding rows are meaningless in both)
    keep = hf_mask.numpy().astype(bool)
    theirs, ours = theirs[keep], np.asarray(ours)[keep]
  assert np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max() < 1e-5


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "blip2_jax.generate", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=one_device_env(),
  )


def test_generate_cli_folder_with_mixed_sizes_and_a_corrupt_image(workdirs, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  workdir, _ = workdirs["opt"]
  folder = tmp_path / "images"
  folder.mkdir()
  Image.new("RGB", (48, 48), (255, 0, 0)).save(folder / "a.png")
  Image.new("RGB", (100, 64), (0, 0, 255)).save(folder / "b.jpg")  # another size: resized like the rest
  (folder / "c.png").write_bytes(b"not an image")
  out = tmp_path / "out.jsonl"
  r = _cli(
    f"--model={workdir}",
    f"--images={folder}",
    f"--out={out}",
    "--batch_size=2",
    "--max_new_tokens=5",
    "--num_beams=1",
    "--min_new_tokens=0",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row["image"] for row in rows] == ["a.png", "b.jpg"]
  assert "1 unreadable images skipped" in r.stdout
  assert "Cannot decode image" in r.stderr and "c.png" in r.stderr


def test_generate_bad_input_is_one_line(workdirs, tmp_path):
  """An undecodable image and an empty prompt stop the CLI with one line (before the model is read); a prompt
  longer than the LLM's context is refused before anything is compiled."""
  workdir, _ = workdirs["opt"]
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.new("RGB", (48, 48)).save(tmp_path / "x.png")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
  r = _cli(f"--model={workdir}", f"--image={tmp_path / 'bad.png'}")
  assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: Cannot decode image")
  r = _cli(f"--model={workdir}", f"--image={tmp_path / 'x.png'}", "--prompt=")
  assert r.returncode != 0 and "error: --prompt is empty" in r.stderr
  model = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  size = model.cfg.vit.image_size
  with pytest.raises(ValueError, match="Prompt too long"):
    model.generate(np.zeros((1, size, size, 3), np.float32), "large " * 200)
  with pytest.raises(ValueError, match=r"Images must be \[B, 48, 48, 3\]"):
    model.generate(np.zeros((1, 32, 32, 3), np.float32), "a photo of")

  # Images as users have them, of mixed sizes: PIL images, paths, uint8 arrays, preprocessed like the data.
  pil, pixels = Image.new("RGB", (100, 64), (0, 0, 255)), np.full((30, 20, 3), 200, np.uint8)
  batch = model.pixels([pil, tmp_path / "x.png", pixels])
  assert batch.shape == (3, size, size, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[0], images_lib.eval_preprocess(pil, size))
  np.testing.assert_array_equal(batch[2], images_lib.eval_preprocess(Image.fromarray(pixels), size))
  assert model.generate([pil, tmp_path / "x.png", pixels], "a photo of", max_new_tokens=4) == model.generate(
    batch, "a photo of", max_new_tokens=4
  )
  with pytest.raises(ValueError, match=r"^Image 1 is a float array of shape \(10, 10, 3\): float arrays must be "):
    model.pixels([pixels, np.zeros((10, 10, 3), np.float32)])
  with pytest.raises(ValueError, match=r"^Image 0 is a dict: give a PIL image, a file path or an \[H, W, 3\] array"):
    model.caption({"image": 1})
