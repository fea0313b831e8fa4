"""The trainer: sharding invariance, frozen weights, exact resume across processes, failure modes."""

import json
import os
import shutil
import subprocess
import sys

import chex
from conftest import STAGE1_STEPS
from conftest import one_device_env
from flax import traverse_util
import jax
import numpy as np
import pytest

from blip2_jax import checkpointing
from blip2_jax import state as state_lib
from blip2_jax import train
from configs import stage1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_dir(tiny_data_dir):
  return tiny_data_dir


def tiny_config(data_dir, **overrides):
  c = stage1.get_config("tiny")
  c.data.data_dir = data_dir
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def random_batch(config, vocab, seed=0):
  rng = np.random.default_rng(seed)
  b, s, L = config.global_batch_size, config.data.image_size, config.data.max_text_len
  mask = (np.arange(L)[None] < rng.integers(4, L + 1, (b, 1))).astype(np.int32)
  return {
    "image": rng.standard_normal((b, s, s, 3)).astype(np.float32),
    "text_ids": (rng.integers(5, vocab, (b, L)) * mask).astype(np.int32),
    "text_mask": mask,
  }


def run_steps(config, devices, mesh, batches, init_state=None):
  config = config.copy_and_resolve_references()
  config.sharding.mesh = mesh
  tok = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tok, devices=devices)
  state, frozen = setup.init(jax.random.PRNGKey(0))
  if init_state is not None:  # the same starting values, placed on this mesh
    state = jax.device_put(init_state[0], setup.state_shardings)
    frozen = jax.device_put(init_state[1], setup.frozen_shardings)
  step = train.make_train_step(setup)
  losses = []
  for b in batches:
    state, metrics = step(state, frozen, state_lib.global_batch(b, setup.batch_sharding))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), jax.device_get(frozen), losses, setup


def test_mesh_data4_fsdp2_equals_one_device(data_dir):
  assert jax.device_count() == 8, "conftest.py must give 8 fake CPU devices"
  config = tiny_config(data_dir, global_batch_size=16)
  vocab = len(state_lib.load_tokenizer(config))
  batches = [random_batch(config, vocab, seed=i) for i in range(3)]
  s1, f1, l1, setup1 = run_steps(config, jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}, batches)
  init = jax.device_get(setup1.init(jax.random.PRNGKey(0)))
  s8, f8, l8, setup8 = run_steps(config, jax.devices(), {"data": 4, "fsdp": 2, "tensor": 1}, batches, init)
  # The 8-device run really is sharded: some weight is split over fsdp.
  specs = [s.spec for s in jax.tree.leaves(setup8.state_shardings["params"])]
  assert any("fsdp" in jax.tree.leaves(tuple(p)) for p in specs)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by all keys); Adam
  # scales their float round-off up to lr-sized steps whose sign depends on summation order, so they are
  # compared to the init instead: they stay within the few lr-sized steps taken.
  flat1 = traverse_util.flatten_dict(s1["params"], sep="/")
  flat8 = traverse_util.flatten_dict(s8["params"], sep="/")
  flat0 = traverse_util.flatten_dict(jax.device_get(init[0]["params"]), sep="/")
  worst = {}
  for k in flat1:
    if k.endswith("key/bias"):
      assert np.abs(flat8[k] - flat0[k]).max() <= 3 * config.optimizer.lr * 1.01
      continue
    scale = np.abs(flat1[k]).max() + 1e-12
    worst[k] = float(np.abs(flat8[k] - flat1[k]).max() / scale)
  assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
  chex.assert_trees_all_equal(f8, f1)


def test_frozen_weights_untouched_and_outside_optimizer(data_dir):
  config = tiny_config(data_dir, global_batch_size=8)
  vocab = len(state_lib.load_tokenizer(config))
  tok = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tok, devices=jax.devices()[:1])
  state, frozen = setup.init(jax.random.PRNGKey(0))
  before = jax.device_get(frozen)
  params_before = jax.device_get(state["params"])
  step = train.make_train_step(setup)
  for i in range(2):
    state, _ = step(state, frozen, state_lib.global_batch(random_batch(config, vocab, i), setup.batch_sharding))
  chex.assert_trees_all_equal(jax.device_get(frozen), before)
  assert set(before) == {"visual_encoder"}
  # Nothing of the frozen tower in the trainable tree or anywhere in the optimizer state.
  assert "visual_encoder" not in state["params"]
  opt_paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
  assert opt_paths and not any("visual_encoder" in p for p in opt_paths)
  n_frozen = sum(x.size for x in jax.tree.leaves(before))
  n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert n_opt < 2 * n_train + 16 and n_frozen > 0  # adam's mu and nu (+ counters) of trainables only
  # ...while the trainable ones did move, ln_vision included (trainable in LAVIS).
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state["params"]), params_before)
  assert moved["ln_vision"]["scale"] and moved["qformer"]["word_embeddings"]["embedding"]


def _train_cli(workdir, data_dir, *overrides):
  cmd = [
    sys.executable,
    "-m",
    "blip2_jax.train",
    "--config=configs/stage1.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *overrides,
  ]
  return subprocess.run(cmd, cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=600)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(l) for l in f]


def _restore_params(workdir, step, config):
  tok = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tok, devices=jax.devices()[:1])
  mngr = checkpointing.manager(workdir, 10)
  abstract = checkpointing.abstract_like(setup.abstract_state, setup.state_shardings)
  state, data_state = checkpointing.restore(mngr, step, abstract)
  mngr.close()
  return jax.device_get(state), data_state


def test_resume_after_process_exit_equals_straight_run(stage1_workdir, data_dir, tmp_path):
  """2N steps straight == N steps, exit, restart in the same workdir, N more (params within 1e-6)."""
  n = STAGE1_STEPS // 2
  flags = [
    f"--config.total_steps={2 * n}",
    f"--config.checkpoint_every={n}",
    f"--config.log_every={n}",
    "--config.keep_checkpoints=5",
  ]  # as the straight run, conftest's stage1_workdir, was made
  straight = str(tmp_path / "straight")
  shutil.copytree(stage1_workdir, straight)
  # A run that stopped after step N: the same workdir as it was then (checkpoint N, metrics up to N).
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(2 * n)))
  with open(os.path.join(resumed, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(m) + "\n" for m in _metrics(straight) if m["step"] <= n and "loss" in m)
  r = _train_cli(resumed, data_dir, *flags)
  assert r.returncode == 0, r.stderr[-3000:]

  config = tiny_config(data_dir)
  a, data_a = _restore_params(straight, 2 * n, config)
  b, data_b = _restore_params(resumed, 2 * n, config)
  assert int(b["step"]) == 2 * n
  chex.assert_trees_all_close(b["params"], a["params"], rtol=1e-6, atol=1e-7)
  assert data_a == data_b
  keys = ("loss", "loss_itc", "loss_itm", "loss_itg", "lr", "grad_norm")
  last_a = [m for m in _metrics(straight) if m["step"] == 2 * n and "loss" in m][0]
  last_b = [m for m in _metrics(resumed) if m["step"] == 2 * n and "loss" in m][0]
  np.testing.assert_allclose([last_b[k] for k in keys], [last_a[k] for k in keys], rtol=1e-6)
  eval_a = [m for m in _metrics(straight) if "eval/txt2img_r1" in m][-1]
  eval_b = [m for m in _metrics(resumed) if "eval/txt2img_r1" in m][-1]
  assert {k: v for k, v in eval_a.items() if k.startswith("eval/")} == {
    k: v for k, v in eval_b.items() if k.startswith("eval/")
  }

  # `python -m blip2_jax.evaluate` on the workdir alone reproduces the end-of-training evaluation.
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "blip2_jax.evaluate",
      "--config=configs/stage1.py:tiny",
      f"--workdir={straight}",
      f"--config.data.data_dir={data_dir}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=one_device_env(),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(straight, f"eval_step_{2 * n}.json"), encoding="utf-8") as f:
    report = json.load(f)
  for k, v in eval_a.items():
    if k.startswith("eval/"):
      assert report[k] == pytest.approx(v, abs=1e-6), k


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "nan")
  config = tiny_config(data_dir, total_steps=8, checkpoint_every=1, log_every=1)
  real_make_train_step = train.make_train_step

  def make_train_step_that_diverges_at_step_5(setup):
    step_fn = real_make_train_step(setup)

    def step(state, frozen, batch):
      state, metrics = step_fn(state, frozen, batch)
      if int(state["step"]) == 5:  # as if the update of step 5 had overflowed
        metrics = dict(metrics, loss=metrics["loss"] * float("nan"))
      return state, metrics

    return step

  monkeypatch.setattr(train, "make_train_step", make_train_step_that_diverges_at_step_5)
  with pytest.raises(train.TrainingError, match=r"Non-finite loss nan at step 5 "):
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [3, 4]  # keep_checkpoints=2; nothing written for step 5 or later
  state, _ = _restore_params(workdir, 4, config)
  assert int(state["step"]) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_misspelt_config_key_is_one_clear_error(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "blip2_jax.train",
      "--config=configs/stage1.py:tiny",
      f"--workdir={tmp_path}",
      "--config.optimzer.lr=1e-3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode != 0
  assert "optimzer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
  "config, expected",
  [
    ("configs/stage1.py:demoo", "--config=configs/stage1.py:demoo: Unknown variant 'demoo' of configs/stage1.py"),
    ("configs/stage9.py:demo", "--config=configs/stage9.py:demo: no config file 'configs/stage9.py'"),
  ],
)
def test_unknown_config_variant_or_file_is_one_line(tmp_path, config, expected):
  r = subprocess.run(
    [sys.executable, "-m", "blip2_jax.train", f"--config={config}", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
  assert "Traceback" not in r.stderr and not os.listdir(tmp_path)


def test_missing_vision_weights_is_one_clear_error(data_dir, tmp_path):
  r = _train_cli(str(tmp_path / "w"), data_dir, f"--config.init.vision_weights={tmp_path}/nowhere")
  assert r.returncode != 0
  assert "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_learning_rate_schedule_and_weight_decay_mask():
  from blip2_jax import optim

  c = stage1.get_config()
  sched = optim.learning_rate_schedule(c.optimizer, c.total_steps)
  assert float(sched(0)) == pytest.approx(1e-6)
  assert float(sched(2000)) == pytest.approx(1e-4)
  assert float(sched(c.total_steps)) == pytest.approx(1e-5, rel=1e-3)
  params = {
    "a": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)},
    "ln": {"scale": np.zeros(2)},
    "temp": np.zeros(()),
    "query_tokens": np.zeros((1, 2, 2)),
  }
  mask = traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
  assert mask == {"a/kernel": True, "a/bias": False, "ln/scale": False, "temp": False, "query_tokens": True}


def test_trainer_reads_frozen_vit_from_hf_blip2_checkpoint(data_dir, tmp_path):
  """config.init.vision_weights: the frozen tower (and ln_vision) come from a HF BLIP-2 safetensors dir."""
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top

  config = tiny_config(data_dir, global_batch_size=8)
  v = config.model.vit
  hf_config = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=v.width,
      intermediate_size=v.mlp_dim,
      num_hidden_layers=v.depth,
      num_attention_heads=v.num_heads,
      image_size=v.image_size,
      patch_size=v.patch_size,
      layer_norm_eps=v.layer_norm_eps,
      qkv_bias=True,
    ),
    qformer_config=dict(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=64,
      encoder_hidden_size=v.width,
      vocab_size=64,
    ),
    num_query_tokens=4,
  )
  torch.manual_seed(0)
  hf = transformers.Blip2Model(hf_config)
  with torch.no_grad():
    for p in hf.vision_model.parameters():
      p.normal_(0, 0.2)
  hf.save_pretrained(tmp_path / "hf")
  config.init.vision_weights = str(tmp_path / "hf")
  tok = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tok, devices=jax.devices()[:1])
  mngr = checkpointing.manager(str(tmp_path / "wd"), 2)
  state, frozen, _ = state_lib.restore_or_init(config, setup, mngr)
  sd = {k: t.detach().numpy() for k, t in hf.vision_model.state_dict().items()}
  np.testing.assert_array_equal(
    frozen["visual_encoder"]["blocks"]["fc1"]["kernel"][0], sd["encoder.layers.0.mlp.fc1.weight"].T
  )
  np.testing.assert_array_equal(state["params"]["ln_vision"]["scale"], sd["post_layernorm.weight"])
  before = jax.device_get(frozen)
  step = train.make_train_step(setup)
  state, _ = step(state, frozen, state_lib.global_batch(random_batch(config, len(tok)), setup.batch_sharding))
  chex.assert_trees_all_equal(jax.device_get(frozen), before)


def test_collapsed_itc_warns_once_and_training_goes_on(data_dir, tmp_path, monkeypatch, caplog):
  """After warmup, loss_itc at log(global batch) for collapse_patience logged steps: one warning, no stop.
  The same run evaluates on the split's first images every eval_every steps (eval_N/) and on all of it at the
  end (eval/), and writes examples.png."""
  workdir = str(tmp_path / "collapsed")
  config = tiny_config(
    data_dir,
    total_steps=8,
    log_every=1,
    eval_every=4,
    collapse_patience=3,
    **{"optimizer.warmup_steps": 2, "eval.during_training_images": 16},
  )
  real_make_train_step = train.make_train_step

  def make_train_step_at_chance(setup):
    step_fn = real_make_train_step(setup)

    def step(state, frozen, batch):
      state, metrics = step_fn(state, frozen, batch)
      return state, dict(metrics, loss_itc=metrics["loss_itc"] * 0 + np.log(config.global_batch_size))

    return step

  monkeypatch.setattr(train, "make_train_step", make_train_step_at_chance)
  with caplog.at_level("WARNING", logger="blip2_jax.collapse"):
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  warnings = [r.getMessage() for r in caplog.records if r.name == "blip2_jax.collapse"]
  # Steps 3, 4, 5 are the first three logged after the 2 warmup steps.
  assert len(warnings) == 1 and warnings[0].startswith("Training looks collapsed at step 5: loss_itc")
  assert "config.optimizer.lr" in warnings[0] and "init_std" in warnings[0]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f]
  assert max(m["step"] for m in lines if "loss" in m) == 8  # training went on
  assert [m["step"] for m in lines if "eval_16/txt2img_r1" in m] == [4, 8]
  assert [m["eval_16/num_images"] for m in lines if "eval_16/num_images" in m] == [16, 16]
  assert [(m["step"], m["eval/num_images"]) for m in lines if "eval/num_images" in m] == [(8, 64)]
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(os.path.join(workdir, "examples.png")) as picture:
    assert picture.mode == "RGB" and picture.width > 4 * 224
