"""`Blip2.from_pretrained` / `save_pretrained` against transformers' BLIP-2 on tiny random checkpoints.

Each HF model is built from a tiny config, randomised (std 0.2; norm scales around 1) so that a wrong transpose or
name cannot hide, saved with `save_pretrained`, loaded by us, and compared in float32: max |ours - theirs| /
max |theirs| <= 1e-5. Exports are reloaded by transformers and compared the same way.
"""

import json

from conftest import one_device_env
from helpers import OPT_TEXT
from helpers import T5_TEXT
from helpers import randomise
from helpers import rel_error
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from blip2_jax import partitioning
from blip2_jax.api import Blip2

TOL = 1e-5
WIDTH, QUERIES, VOCAB_QF, IMAGE = 32, 4, 40, 32
VISION = dict(
  hidden_size=WIDTH,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=IMAGE,
  patch_size=8,
  layer_norm_eps=1e-6,
  qkv_bias=True,
)


def _qformer(text_input: bool):
  return dict(
    hidden_size=WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    cross_attention_frequency=2,
    encoder_hidden_size=WIDTH,
    vocab_size=VOCAB_QF,
    use_qformer_text_input=text_input,
    max_position_embeddings=16,
  )


IMAGE_TOKEN = 63  # HF >= 4.47 puts num_query_tokens of these in front of the prompt ids


def _hf_model(kind: str, seed=0):
  if kind == "retrieval":
    config = transformers.Blip2Config(
      vision_config=VISION, qformer_config=_qformer(True), num_query_tokens=QUERIES, image_text_hidden_size=16
    )
    cls = transformers.Blip2ForImageTextRetrieval
  else:
    config = transformers.Blip2Config(
      vision_config=VISION,
      qformer_config=_qformer(False),
      text_config=OPT_TEXT if kind == "opt" else T5_TEXT,
      num_query_tokens=QUERIES,
      image_token_index=IMAGE_TOKEN,
    )
    cls = transformers.Blip2ForConditionalGeneration
  torch.manual_seed(seed)
  return randomise(cls(config), seed)


def _images(batch=3, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _texts(vocab, batch=3, length=7, seed=1, left_pad=False):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab - 2, size=(batch, length))
  lengths = np.array([length, length - 2, 2][:batch])[:, None]
  pos = np.arange(length)[None]
  mask = (pos >= length - lengths) if left_pad else (pos < lengths)
  mask = mask.astype(np.int64)
  return ids * mask + (1 - mask), mask


class _Lazy(dict):
  def __init__(self, make):
    super().__init__()
    self.make = make

  def __missing__(self, kind):
    self[kind] = self.make(kind)
    return self[kind]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> (HF model, its save_pretrained directory), built on first use."""
  root = tmp_path_factory.mktemp("hf")

  def make(kind):
    model = _hf_model(kind)
    model.save_pretrained(root / kind)
    return model, root / kind

  return _Lazy(make)


@pytest.fixture(scope="module")
def loaded(saved):
  # One device: compiling for conftest's 8 fake devices costs several times more; the sharded test below loads
  # onto all 8 and checks the outputs are the same.
  return _Lazy(lambda kind: Blip2.from_pretrained(saved[kind][1], mesh=_one_device_mesh()))


def _one_device_mesh():
  return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


# --- parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["retrieval", "opt", "t5"])
def test_vision_and_query_outputs_match_hf(saved, loaded, kind):
  hf, ours = saved[kind][0], loaded[kind]
  x, px = _images()
  with torch.no_grad():
    vision = hf.vision_model(pixel_values=px).last_hidden_state
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=vision)[0]
  assert rel_error(ours.vision_features(x), vision) < TOL
  assert rel_error(ours.query_output(x), queries) < TOL


def test_retrieval_itm_and_itc_match_hf(saved, loaded):
  hf, ours = saved["retrieval"][0], loaded["retrieval"]
  x, px = _images()
  ids, mask = _texts(VOCAB_QF)
  with torch.no_grad():
    itm = hf(
      pixel_values=px,
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      use_image_text_matching_head=True,
    ).logits_per_image
    itc = hf(
      pixel_values=px,
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      use_image_text_matching_head=False,
    ).logits_per_image
  assert rel_error(ours.itm_logits(x, ids, mask), itm) < TOL
  assert rel_error(ours.itc_scores(x, ids, mask), itc) < TOL


def _hf_opt_logits(hf, px, ids, mask):
  hf_ids = np.concatenate([np.full((ids.shape[0], QUERIES), IMAGE_TOKEN), ids], axis=1)
  hf_mask = np.concatenate([np.ones((ids.shape[0], QUERIES), np.int64), mask], axis=1)
  with torch.no_grad():
    return hf(pixel_values=px, input_ids=torch.from_numpy(hf_ids), attention_mask=torch.from_numpy(hf_mask)).logits


def _hf_t5_logits(hf, px, ids, mask, dec_ids):
  hf_ids = np.concatenate([np.full((ids.shape[0], QUERIES), IMAGE_TOKEN), ids], axis=1)
  hf_mask = np.concatenate([np.ones((ids.shape[0], QUERIES), np.int64), mask], axis=1)
  with torch.no_grad():
    return hf(
      pixel_values=px,
      input_ids=torch.from_numpy(hf_ids),
      attention_mask=torch.from_numpy(hf_mask),
      decoder_input_ids=torch.from_numpy(dec_ids),
    ).logits


def test_opt_llm_logits_match_hf(saved, loaded):
  hf, ours = saved["opt"][0], loaded["opt"]
  x, px = _images()
  ids, mask = _texts(OPT_TEXT["vocab_size"], left_pad=True)
  assert rel_error(ours.lm_logits(x, ids, mask), _hf_opt_logits(hf, px, ids, mask)) < TOL


def test_t5_llm_logits_match_hf(saved, loaded):
  hf, ours = saved["t5"][0], loaded["t5"]
  x, px = _images()
  ids, mask = _texts(T5_TEXT["vocab_size"])
  dec = np.random.default_rng(2).integers(2, 60, size=(3, 5))
  dec[:, 0] = 0
  assert rel_error(ours.lm_logits(x, ids, mask, dec), _hf_t5_logits(hf, px, ids, mask, dec)) < TOL


def test_sharded_and_bf16_checkpoints(saved, loaded, tmp_path):
  """Several safetensors files + index, loaded onto 8 devices (weights split over 'fsdp'), give the same outputs
  as one file on one device; a bf16 checkpoint loaded with dtype=bfloat16 keeps the
  frozen towers in bf16 and the Q-Former in float32, and stays within 2e-2 of the float32 outputs (bf16 has an
  8-bit mantissa: ~4e-3 per rounding, through two ViT blocks)."""
  hf, ours = saved["retrieval"][0], loaded["retrieval"]
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
  sharded = Blip2.from_pretrained(tmp_path / "sharded")
  x, _ = _images()
  ids, mask = _texts(VOCAB_QF)
  assert sharded.mesh.devices.size == 8
  np.testing.assert_allclose(
    np.asarray(sharded.itm_logits(x, ids, mask)), np.asarray(ours.itm_logits(x, ids, mask)), rtol=1e-6, atol=1e-6
  )

  _hf_model("retrieval").to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
  low = Blip2.from_pretrained(tmp_path / "bf16", dtype="bfloat16", mesh=_one_device_mesh())
  assert low.params["visual_encoder"]["blocks"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert low.params["qformer"]["layers_0"]["attention"]["query"]["kernel"].dtype == jnp.float32
  assert rel_error(low.itm_logits(x, ids, mask), ours.itm_logits(x, ids, mask)) < 2e-2
  assert rel_error(low.itc_scores(x, ids, mask), ours.itc_scores(x, ids, mask)) < 2e-2


@pytest.mark.parametrize("kind", ["retrieval", "opt", "t5"])
def test_export_reloads_in_transformers_with_the_same_outputs(saved, loaded, kind, tmp_path):
  hf, ours = saved[kind][0], loaded[kind]
  ours.save_pretrained(tmp_path / "out")
  cls = type(hf)
  again = cls.from_pretrained(tmp_path / "out").eval()
  x, px = _images()
  if kind == "retrieval":
    ids, mask = _texts(VOCAB_QF)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    for itm in (True, False):
      with torch.no_grad():
        a = hf(pixel_values=px, input_ids=t_ids, attention_mask=t_mask, use_image_text_matching_head=itm)
        b = again(pixel_values=px, input_ids=t_ids, attention_mask=t_mask, use_image_text_matching_head=itm)
      assert rel_error(b.logits_per_image, a.logits_per_image) < TOL
  elif kind == "opt":
    ids, mask = _texts(OPT_TEXT["vocab_size"], left_pad=True)
    assert rel_error(_hf_opt_logits(again, px, ids, mask), _hf_opt_logits(hf, px, ids, mask)) < TOL
  else:
    ids, mask = _texts(T5_TEXT["vocab_size"])
    dec = np.zeros((3, 4), np.int64)
    assert rel_error(_hf_t5_logits(again, px, ids, mask, dec), _hf_t5_logits(hf, px, ids, mask, dec)) < TOL


def test_stage1_workdir_exports_to_hf_retrieval(stage1_workdir, tmp_path):
  """A (tiny) stage-1 run's workdir -> `python -m blip2_jax.export` -> transformers' Blip2ForImageTextRetrieval
  gives our ITM logits and ITC scores."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir, out = stage1_workdir, tmp_path / "hf"
  r = subprocess.run(
    [sys.executable, "-m", "blip2_jax.export", f"--workdir={workdir}", f"--out={out}"],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=600,
    env=one_device_env(),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  ours = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  enc = tok(
    ["large red circle top left", "small blue square"], padding="max_length", max_length=12, return_tensors="np"
  )
  ids, mask = enc["input_ids"], enc["attention_mask"]
  size = ours.cfg.vit.image_size
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  px = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    itm = hf(
      pixel_values=px,
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      use_image_text_matching_head=True,
    ).logits_per_image
    itc = hf(pixel_values=px, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits_per_image
  # The stage-1 config keeps LAVIS's ln_vision eps 1e-5 beside the ViT's 1e-6; HF's config has one eps for both,
  # so the export writes 1e-6 and the ln_vision outputs differ by about 5e-6 relative.
  assert rel_error(ours.itm_logits(x, ids, mask), itm) < 1e-4
  assert rel_error(ours.itc_scores(x, ids, mask), itc) < 1e-4


# --- bad input ---------------------------------------------------------------------------------------------


def _copy_with(src, dst, edit):
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def test_missing_tensor_is_one_error_naming_it(saved, tmp_path):
  name = "language_model.model.decoder.layers.1.fc2.weight"
  bad = _copy_with(saved["opt"][1], tmp_path / "bad", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"no tensor `{name}`"):
    Blip2.from_pretrained(bad)


def test_wrong_shape_is_one_error_naming_it(saved, tmp_path):
  name = "qformer.encoder.layer.0.crossattention.attention.key.weight"
  bad = _copy_with(saved["opt"][1], tmp_path / "bad", lambda t: t.update({name: t[name][:, :8]}))
  with pytest.raises(ValueError, match=rf"Shape mismatch .*`{name}` in .*model.safetensors gives \(32, 8\)"):
    Blip2.from_pretrained(bad)


def test_unknown_tensor_is_one_error_naming_it(saved, tmp_path):
  bad = _copy_with(saved["retrieval"][1], tmp_path / "bad", lambda t: t.update({"extra.weight": np.zeros(3)}))
  with pytest.raises(ValueError, match="no place for, first `extra.weight`"):
    Blip2.from_pretrained(bad)


def test_pickle_only_directory_is_refused_without_unpickling(saved, tmp_path):
  bad = tmp_path / "bin"
  bad.mkdir()
  (bad / "config.json").write_text((saved["opt"][1] / "config.json").read_text())
  (bad / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="only PyTorch pickle weights"):
    Blip2.from_pretrained(bad)


def test_unsupported_llm_type_is_one_error(saved, tmp_path):
  bad = tmp_path / "mistral"
  bad.mkdir()
  config = json.loads((saved["opt"][1] / "config.json").read_text())
  config["text_config"]["model_type"] = "mistral"
  (bad / "config.json").write_text(json.dumps(config))
  (bad / "model.safetensors").write_bytes((saved["opt"][1] / "model.safetensors").read_bytes())
  with pytest.raises(ValueError, match="text_config.model_type='mistral' is not supported"):
    Blip2.from_pretrained(bad)
