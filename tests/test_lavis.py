"""LAVIS stage-1 checkpoints: parity with the Hugging Face reference after a round trip through LAVIS's names.

LAVIS itself is not installed, so a tiny random HF `Blip2ForImageTextRetrieval` is renamed into the state dict
LAVIS's `Blip2Qformer` saves (names from lavis/models/blip2_models/{Qformer,blip2_qformer}.py and
lavis/models/eva_vit.py), with the tensors HF lacks added: `temp`, the Q-Former LM head, the position_ids buffer.
Parity is max |ours - theirs| / max |theirs| in float32, as in test_weights.py.
"""

import functools
import re
import sys

from flax import traverse_util
import flax.linen as nn
from helpers import hf_blip2_retrieval
from helpers import rel_error
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from blip2_jax import lavis
from blip2_jax import weights
from blip2_jax.models.blip2 import Blip2Qformer

VOCAB, MAX_POS, QUERIES, WIDTH, TOL = 50, 16, 8, 32, 1e-5


def _config(*, num_layers=2, intermediate_size=64):
  vit = dict(
    image_size=32,
    patch_size=8,
    width=WIDTH,
    depth=2,
    num_heads=4,
    mlp_dim=64,
    layer_norm_eps=1e-6,
    act="gelu",
    dtype="float32",
  )
  qformer = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    num_layers=num_layers,
    num_heads=4,
    intermediate_size=intermediate_size,
    cross_attention_freq=2,
    max_position_embeddings=MAX_POS,
    layer_norm_eps=1e-12,
    dropout_rate=0.0,
    dtype="float32",
  )
  # ln_vision eps 1e-6 to match HF's post_layernorm here (LAVIS's ln_vision uses 1e-5).
  return ml_collections.ConfigDict(
    dict(
      vit=vit,
      qformer=qformer,
      num_query_tokens=QUERIES,
      embed_dim=16,
      ln_vision_eps=1e-6,
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      bos_token_id=VOCAB - 1,
    )
  )


def _abstract(cfg):
  args = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  rngs = {"params": jax.random.PRNGKey(0), "itm": jax.random.PRNGKey(1)}
  return jax.eval_shape(lambda: Blip2Qformer(cfg).init(rngs, *args, train=False)["params"])


def _flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep="/")


# --- HF -> LAVIS, written from the LAVIS source ---------------------------------------------------------------

_RENAMES = [  # (HF regex, LAVIS replacement), first match wins
  (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
  (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
  (r"vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
  (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
  (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
  (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
  (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
  (r"vision_model\.post_layernorm\.", "ln_vision."),
  (r"embeddings\.", "Qformer.bert.embeddings."),
  (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
  (
    r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
    r"Qformer.bert.encoder.layer.\1.\2.self.",
  ),
  (r"qformer\.encoder\.", "Qformer.bert.encoder."),
  (r"vision_projection\.", "vision_proj."),
  (r"text_projection\.", "text_proj."),
  (r"(query_tokens|itm_head\.)", r"\1"),
]


def _lavis_name(hf_name: str) -> str:
  for pattern, replacement in _RENAMES:
    if re.match(pattern, hf_name):
      return re.sub("^" + pattern, replacement, hf_name)
  raise AssertionError(f"no LAVIS name for {hf_name}")


def _lavis_state_dict(hf_model, seed=0) -> dict:
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for name, tensor in hf_model.state_dict().items():
    m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", name)
    if m:  # HF fuses cat(q_bias, 0, v_bias); EVA keeps q_bias and v_bias apart
      q, _, v = tensor.clone().chunk(3)
      sd[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
      sd[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
    else:
      sd[_lavis_name(name)] = tensor.clone()
  word = sd["Qformer.bert.embeddings.word_embeddings.weight"]
  head = "Qformer.cls.predictions"
  sd.update(
    {
      "Qformer.bert.embeddings.position_ids": torch.arange(MAX_POS).expand((1, -1)),
      f"{head}.transform.dense.weight": 0.2 * torch.randn(WIDTH, WIDTH, generator=g),
      f"{head}.transform.dense.bias": 0.2 * torch.randn(WIDTH, generator=g),
      f"{head}.transform.LayerNorm.weight": 1 + 0.2 * torch.randn(WIDTH, generator=g),
      f"{head}.transform.LayerNorm.bias": 0.2 * torch.randn(WIDTH, generator=g),
      f"{head}.bias": 0.2 * torch.randn(VOCAB, generator=g),
      f"{head}.decoder.weight": word.clone(),  # tied to the word embeddings
      "temp": torch.tensor(0.0513),
    }
  )
  sd[f"{head}.decoder.bias"] = sd[f"{head}.bias"].clone()  # `self.decoder.bias = self.bias`
  return sd


@pytest.fixture(scope="module")
def hf_blip2():
  return hf_blip2_retrieval(width=WIDTH, vocab=VOCAB, max_pos=MAX_POS, queries=QUERIES)


@pytest.fixture(scope="module")
def lavis_sd(hf_blip2):
  return _lavis_state_dict(hf_blip2)


@pytest.fixture(scope="module")
def lavis_file(lavis_sd, tmp_path_factory):
  path = tmp_path_factory.mktemp("lavis") / "blip2_pretrained.pth"
  torch.save({"model": lavis_sd}, path)
  return path


@pytest.fixture(scope="module")
def template():
  return _abstract(_config())


@pytest.fixture(scope="module")
def loaded(lavis_file, template):
  return lavis.load_lavis_checkpoint(lavis_file, template)


def _save(tmp_path, obj, name="ckpt.pth"):
  path = tmp_path / name
  torch.save(obj, path)
  return path


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array([[7], [5], [2]])).astype(np.int64)
  ids = rng.integers(1, VOCAB, size=(3, 7)) * mask
  ours = (jnp.asarray(images), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  theirs = (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids), torch.from_numpy(mask))
  return ours, theirs


# --- parity and values ----------------------------------------------------------------------------------------


def test_fills_every_parameter(loaded, template):
  params, unfilled = loaded
  assert unfilled == set()
  assert set(_flat(params)) == set(_flat(template))
  assert all(v.dtype == np.float32 for v in _flat(params).values())


def _itm_and_itc(m, images, text_ids, text_mask):
  image_embeds = m.encode_image(images)
  image_feats = m.image_feats(m.query_features(image_embeds)[0])  # [B, Q, E]
  text_feat = m.text_feat(m.text_features(text_ids, text_mask))  # [B, E]
  itc = jnp.einsum("iqe,te->iqt", image_feats, text_feat).max(axis=1)  # max over queries
  return m.itm_logits(image_embeds, text_ids, text_mask), itc


@pytest.fixture(scope="module")
def ours_and_hf(hf_blip2, loaded):
  """Our (ITM logits, ITC scores) from one compiled program, and HF's."""
  (images, ids, mask), (timages, tids, tmask) = _inputs()
  ours = jax.jit(functools.partial(Blip2Qformer(_config()).apply, method=_itm_and_itc))(
    {"params": loaded[0]}, images, ids, mask
  )
  with torch.no_grad():
    itm = hf_blip2(timages, tids, tmask, use_image_text_matching_head=True).logits_per_image
    itc = hf_blip2(timages, tids, tmask, use_image_text_matching_head=False).logits_per_image
  return ours, (itm, itc)


def test_itm_logits_match_hf(ours_and_hf):
  (ours, _), (theirs, _) = ours_and_hf
  assert ours.shape == (3, 2)
  assert rel_error(ours, theirs) < TOL


def test_itc_scores_match_hf(ours_and_hf):
  (_, ours), (_, theirs) = ours_and_hf
  assert ours.shape == (3, 3)
  assert rel_error(ours, theirs) < TOL


def test_temp_and_lm_head_are_the_files(loaded, lavis_sd):
  flat = _flat(loaded[0])
  head = "Qformer.cls.predictions"
  assert flat["temp"].shape == () and flat["temp"] == np.float32(0.0513)
  for ours, theirs in (
    ("lm_transform/kernel", "transform.dense.weight"),
    ("lm_transform/bias", "transform.dense.bias"),
    ("lm_norm/scale", "transform.LayerNorm.weight"),
    ("lm_norm/bias", "transform.LayerNorm.bias"),
    ("lm_bias", "bias"),
  ):
    value = lavis_sd[f"{head}.{theirs}"].numpy()
    np.testing.assert_array_equal(flat[f"qformer/{ours}"], value.T if ours.endswith("kernel") else value)


def test_map_is_exact_both_ways(loaded, lavis_sd):
  """Every tensor the map names comes back bit-identical through weights.hf_tensors (the map is a bijection)."""
  back = dict(weights.hf_tensors(loaded[0], lavis.lavis_weight_map(_config(), with_vision=True)))
  assert set(back) == set(lavis_sd) - set(lavis.DROPPED)
  for name, value in back.items():
    np.testing.assert_array_equal(value, lavis_sd[name].numpy(), err_msg=name)


def test_file_without_vit_fills_the_rest(lavis_sd, loaded, template, tmp_path):
  """LAVIS's runner saves only trainable parameters: the frozen ViT is absent, and so is it from the result."""
  sd = {k: v for k, v in lavis_sd.items() if not k.startswith("visual_encoder.")}
  params, unfilled = lavis.load_lavis_checkpoint(_save(tmp_path, sd), template)  # a bare state dict
  assert "visual_encoder" not in params
  assert unfilled == {p for p in _flat(template) if p.startswith("visual_encoder/")}
  full = _flat(loaded[0])
  for path, value in _flat(params).items():
    np.testing.assert_array_equal(value, full[path], err_msg=path)


def test_half_precision_vit_loads_as_its_float32_upcast(lavis_sd, template, tmp_path):
  """LAVIS casts the frozen EVA ViT to fp16 (vit_precision); bf16 is what numpy cannot hold."""
  sd = {
    k: v.to(torch.bfloat16 if k.startswith("visual_encoder.blocks.0.") else torch.float16)
    if k.startswith("visual_encoder.")
    else v
    for k, v in lavis_sd.items()
  }
  params, _ = lavis.load_lavis_checkpoint(_save(tmp_path, {"model": sd}), template)
  flat = _flat(params)
  np.testing.assert_array_equal(
    flat["visual_encoder/blocks/attn/q_bias"][0], sd["visual_encoder.blocks.0.attn.q_bias"].float().numpy()
  )
  np.testing.assert_array_equal(
    flat["visual_encoder/blocks/fc1/kernel"][1], sd["visual_encoder.blocks.1.mlp.fc1.weight"].float().numpy().T
  )
  assert all(v.dtype == np.float32 for v in flat.values())


# --- what a user can get wrong ---------------------------------------------------------------------------------


def test_missing_tensor_is_named(lavis_sd, template, tmp_path):
  sd = dict(lavis_sd)
  del sd["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
  path = _save(tmp_path, {"model": sd})
  with pytest.raises(
    ValueError, match=r"no tensor `Qformer\.bert\.encoder\.layer\.1\.output_query\.dense\.bias`"
  ) as err:
    lavis.load_lavis_checkpoint(path, template)
  assert str(path) in str(err.value)


def test_wider_config_is_a_shape_error(lavis_file):
  with pytest.raises(ValueError, match=r"Shape mismatch at `qformer/layers_0/ffn/intermediate/kernel`") as err:
    lavis.load_lavis_checkpoint(lavis_file, _abstract(_config(intermediate_size=48)))
  assert "(32, 64)" in str(err.value) and "(32, 48)" in str(err.value)


def test_deeper_file_than_config_names_first_extra_tensor(lavis_file):
  with pytest.raises(ValueError, match=r"no place for, first `Qformer\.bert\.encoder\.layer\.1\."):
    lavis.load_lavis_checkpoint(lavis_file, _abstract(_config(num_layers=1)))


def test_unknown_tensor_is_named(lavis_sd, template, tmp_path):
  sd = {**lavis_sd, "Qformer.bert.pooler.dense.weight": torch.zeros(WIDTH, WIDTH)}
  with pytest.raises(ValueError, match=r"no place for, first `Qformer\.bert\.pooler\.dense\.weight` \(1 in all\)"):
    lavis.load_lavis_checkpoint(_save(tmp_path, {"model": sd}), template)


def test_untied_decoder_is_refused(lavis_sd, template, tmp_path):
  sd = {**lavis_sd, "Qformer.cls.predictions.decoder.weight": torch.zeros(VOCAB, WIDTH)}
  with pytest.raises(ValueError, match=r"`Qformer\.cls\.predictions\.decoder\.weight` differs"):
    lavis.load_lavis_checkpoint(_save(tmp_path, {"model": sd}), template)


def test_hf_state_dict_is_not_a_lavis_checkpoint(hf_blip2, template, tmp_path):
  with pytest.raises(ValueError, match="not a LAVIS BLIP-2 checkpoint"):
    lavis.load_lavis_checkpoint(_save(tmp_path, hf_blip2.state_dict()), template)


def test_stage2_checkpoint_is_named(lavis_sd, template, tmp_path):
  """LAVIS's OPT/FlanT5 models delete the text embeddings, text FFNs and LM head before saving."""
  sd = {k: v for k, v in lavis_sd.items() if "word_embeddings" not in k and not k.startswith("Qformer.cls.")}
  with pytest.raises(ValueError, match="stage-2 checkpoint"):
    lavis.load_lavis_checkpoint(_save(tmp_path, {"model": sd}), template)


def test_arbitrary_pickle_is_refused(template, tmp_path):
  with pytest.raises(ValueError, match="weights_only=True"):
    lavis.load_lavis_checkpoint(_save(tmp_path, {"model": ml_collections.ConfigDict()}), template)


def test_missing_file_is_named(template, tmp_path):
  with pytest.raises(FileNotFoundError, match="blip2_pretrained.pth"):
    lavis.load_lavis_checkpoint(tmp_path / "blip2_pretrained.pth", template)


def test_without_torch_says_how_to_get_it(lavis_file, template, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match="pip install torch"):
    lavis.load_lavis_checkpoint(lavis_file, template)
