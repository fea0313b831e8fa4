"""blip2_jax.benchmark on tiny stage-2 configs: training and generation throughput, FLOPs, and the transformers
comparison (HF's PyTorch BLIP-2 built at the same sizes, here on CPU)."""

import math

import jax
import jax.numpy as jnp
import pytest

from blip2_jax import benchmark
from configs import stage1
from configs import stage2_opt

TINY_OPT = dict(
  vocab_size=64,
  hidden_size=32,
  num_hidden_layers=1,
  ffn_dim=64,
  num_attention_heads=4,
  max_position_embeddings=64,
  word_embed_proj_dim=32,
)
# One device: an 8-device mesh triples the tiny programs' compile time and the trainer's tests cover sharding.
ONE_DEVICE = jax.devices()[:1]


def _tiny_stage2(batch=8):
  c = stage2_opt.get_config("tiny")
  c.init.llm_weights = ""  # random weights of config.model.llm's sizes
  c.model.llm.update(TINY_OPT)
  # bf16 frozen towers and Q-Former compute, as the paper config (transformers: fp32 weights under autocast)
  c.model.vit.dtype = c.model.qformer.dtype = c.model.llm.dtype = c.frozen_dtype = "bfloat16"
  c.global_batch_size = batch
  return c


def _check_profile(profile, log_dir):
  """--profile's result: every op's time shared among the categories, the model's attention, dense layers and
  layer norms (ViT, Q-Former and LLM have all three) among them, no collectives on one device, the table written."""
  assert profile["calls"] == benchmark.PROFILE_CALLS and profile["devices"] == 1
  assert profile["not_in_hlo_share"] == 0  # every traced op found in the program's HLO
  rows, categories = profile["top_ops"], profile["categories"]
  assert rows and all(r["ms_per_step"] > 0 and r["calls_per_step"] > 0 for r in rows)
  assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
  # Over every op, not only the top ones.
  assert sum(c["share"] for c in categories.values()) == pytest.approx(1, abs=1e-3)
  assert sum(c["ms_per_step"] for c in categories.values()) == pytest.approx(profile["ms_per_step"], rel=1e-3)
  for c in ("attention", "matmul", "layer_norm"):
    assert categories[c]["share"] > 0, c
  assert categories["collective"]["share"] == 0
  table = (log_dir / "profile.txt").read_text()
  assert table.startswith(f"{benchmark.PROFILE_CALLS} steps traced") and rows[0]["op"] in table
  assert (log_dir / "profile.json").exists()


def test_stage2_train_counts_flops_profiles_and_compares_with_transformers(tmp_path):
  c = _tiny_stage2()
  out = benchmark.benchmark(c, "train", steps=1, compare="transformers", devices=ONE_DEVICE, profile_dir=str(tmp_path))
  assert out["device"].startswith("1 x ")
  assert out["stage"] == 2 and out["samples_per_s"] > 0 and math.isfinite(out["loss"])
  fwd = out["forward_gflop_per_sample"]
  assert fwd["vit"] > 0 and fwd["qformer"] > 0 and fwd["llm"] > 0
  # ViT forward once, Q-Former + projection forward and backward, frozen LLM forward + input-gradient backward.
  assert out["model_gflop_per_sample"] == pytest.approx(fwd["vit"] + 3 * fwd["qformer"] + 2 * fwd["llm"], rel=1e-2)
  assert out["transformers_device"] == "cpu" and out["transformers_samples_per_s"] > 0
  # The image encoder's share of the step, timed alone on both sides.
  assert out["vit_forward_s"] > 0 and out["transformers_vit_forward_s"] > 0
  # Both start from a uniform-ish random LM over 64 tokens: the loss is near log(64).
  assert out["loss"] == pytest.approx(math.log(64), abs=0.5)
  assert out["transformers_loss"] == pytest.approx(math.log(64), abs=0.5)
  assert out["speedup_vs_transformers"] == pytest.approx(out["transformers_step_s"] / out["step_s"], rel=1e-2)
  # The same trainable parts (Q-Former query side, query tokens, language projection); ours also trains
  # ln_vision, which transformers keeps inside its frozen vision model.
  assert out["trainable_params"] - out["transformers_trainable_params"] == 2 * c.model.vit.width
  _check_profile(out["profile"], tmp_path)


def test_generate_makes_exactly_new_tokens_profiles_and_compares_with_transformers(tmp_path):
  out = benchmark.benchmark(
    _tiny_stage2(),
    "generate",
    steps=1,
    new_tokens=3,
    compare="transformers",
    devices=ONE_DEVICE,
    profile_dir=str(tmp_path),
  )
  assert out["new_tokens"] == 3 and out["prompt_tokens"] == benchmark.PROMPT_LENGTH
  assert out["images_per_s"] > 0 and out["transformers_images_per_s"] > 0
  assert out["tokens_per_s"] == pytest.approx(3 * out["images_per_s"], rel=1e-2)
  assert out["speedup_vs_transformers"] == pytest.approx(out["transformers_batch_s"] / out["batch_s"], rel=1e-2)
  _check_profile(out["profile"], tmp_path)


def test_flops_count_every_iteration_of_a_scan():
  # The LLMs stack their layers with nn.scan; XLA's cost analysis alone would count one layer.
  scan = jax.lax.scan
  x, ws = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)
  stack = lambda x, ws: jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]
  assert benchmark._flops(stack, x, ws) == pytest.approx(4 * 2 * 8 * 16 * 16, rel=0.01)
  assert jax.lax.scan is scan  # restored


def test_random_batch_has_the_trainers_structure():
  c = _tiny_stage2()
  batch = benchmark.random_batch(c, 4, 64)
  assert set(batch) == {"image", "text_ids", "text_mask", "label_mask"}
  assert batch["image"].shape == (4, 48, 48, 3) and batch["text_ids"].shape == (4, c.data.max_text_len)
  # Token ids stay clear of the last id (transformers' image placeholder in the comparison).
  assert batch["text_ids"].min() >= 4 and batch["text_ids"].max() < 63
  assert (batch["label_mask"][:, 0] == 0).all() and (batch["label_mask"][:, 1:] == 1).all()


def test_unsupported_requests_are_one_sentence_errors():
  with pytest.raises(ValueError, match="stage-2 config"):
    benchmark.benchmark(stage1.get_config("tiny"), "generate")
  with pytest.raises(ValueError, match="stage-2 config"):
    benchmark.benchmark(stage1.get_config("tiny"), "train", compare="transformers")
  c = _tiny_stage2()
  c.init.llm_weights = "demo"
  with pytest.raises(ValueError, match="llm_weights"):
    benchmark.benchmark(c, "train")
  with pytest.raises(ValueError, match="--profile"):
    benchmark.benchmark(stage1.get_config("tiny"), "data", profile_dir="/tmp/unused")


def test_data_mode_times_both_decode_paths_on_the_same_photos():
  c = stage1.get_config("tiny")
  c.data.image_size = 224  # the paper's crop, from 320x240 photos (small, to stay fast)
  out = benchmark.benchmark(c, mode="data", steps=2, photos=24, photo_size=(320, 240))
  assert out["source"] == "24 synthetic 320x240 JPEGs" and out["typical_image_size"] == "320x240"
  assert out["examples_timed"] == 24 and out["output_size"] == 224
  for key in ("full_decode_samples_per_s_per_core", "fast_decode_samples_per_s_per_core", "pipeline_samples_per_s"):
    assert out[key] > 0, key
  assert out["fast_over_full"] == round(
    out["fast_decode_samples_per_s_per_core"] / out["full_decode_samples_per_s_per_core"], 2
  )
