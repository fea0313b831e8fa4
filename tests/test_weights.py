"""Weight loading: parity with the Hugging Face reference on tiny random checkpoints, and the user errors.

Every HF model here is randomised (std 0.2, LayerNorm scales around 1, q/v biases set) so a wrong transpose,
split or name cannot hide behind zeros. Parity is max |ours - theirs| / max |theirs| in float32.
"""

import functools
import logging

from flax import traverse_util
import flax.linen as nn
from helpers import hf_blip2_retrieval
from helpers import randomise
from helpers import rel_error
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from blip2_jax import weights
from blip2_jax.models import masks
from blip2_jax.models.blip2 import Blip2Qformer

VOCAB, MAX_POS, QUERIES, WIDTH, TOL = 50, 16, 8, 32, 1e-5


def _config(*, vocab=VOCAB, depth=2, mlp_dim=64, num_layers=2):
  vit = dict(
    image_size=32,
    patch_size=8,
    width=WIDTH,
    depth=depth,
    num_heads=4,
    mlp_dim=mlp_dim,
    layer_norm_eps=1e-6,
    act="gelu",
    dtype="float32",
  )
  qformer = dict(
    vocab_size=vocab,
    hidden_size=WIDTH,
    num_layers=num_layers,
    num_heads=4,
    intermediate_size=64,
    cross_attention_freq=2,
    max_position_embeddings=MAX_POS,
    layer_norm_eps=1e-12,
    dropout_rate=0.0,
    dtype="float32",
  )
  # ln_vision eps 1e-6: HF's post_layernorm takes the vision config's eps (LAVIS uses 1e-5).
  return ml_collections.ConfigDict(
    dict(
      vit=vit,
      qformer=qformer,
      num_query_tokens=QUERIES,
      embed_dim=16,
      ln_vision_eps=1e-6,
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      bos_token_id=vocab - 1,
    )
  )


def _init_args():
  return (jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32))


def _abstract(cfg):
  rngs = {"params": jax.random.PRNGKey(0), "itm": jax.random.PRNGKey(1)}
  return jax.eval_shape(lambda: Blip2Qformer(cfg).init(rngs, *_init_args(), train=False)["params"])


def _template(cfg, seed=0):
  """Stands in for model.init (which takes ~40 s eagerly on CPU here): random values of the right shapes, so a
  parameter the loader leaves alone is recognisable."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), nn.unbox(_abstract(cfg)))


def _apply(cfg, params, *args, method):
  # One compiled program per call: eager op-by-op dispatch compiles every primitive and is several times slower.
  return jax.jit(functools.partial(Blip2Qformer(cfg).apply, method=method))({"params": params}, *args)


def _merge(*trees):
  out = {}
  for t in trees:
    out.update(t)
  return out


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


# --- fixtures: one tiny random HF BLIP-2 retrieval model, saved three ways ----------------------------------


@pytest.fixture(scope="module")
def hf_blip2():
  return hf_blip2_retrieval(width=WIDTH, vocab=VOCAB, max_pos=MAX_POS, queries=QUERIES)


@pytest.fixture(scope="module")
def blip2_dirs(hf_blip2, tmp_path_factory):
  root = tmp_path_factory.mktemp("blip2")
  hf_blip2.save_pretrained(root / "single")
  hf_blip2.save_pretrained(root / "sharded", max_shard_size="20KB")
  bf16 = randomise(type(hf_blip2)(hf_blip2.config), seed=0).to(torch.bfloat16)
  bf16.save_pretrained(root / "bf16_sharded", max_shard_size="20KB")
  return {name: root / name for name in ("single", "sharded", "bf16_sharded")}


@pytest.fixture(scope="module")
def template():
  return _template(_config())


@pytest.fixture(scope="module")
def loaded(blip2_dirs, template):
  vision = weights.load_vision_from_blip2(blip2_dirs["single"], template)
  qformer, unfilled = weights.load_qformer_from_blip2(blip2_dirs["single"], template)
  return _merge(template, vision, qformer), unfilled


def _images(size, batch=3, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _texts(vocab=VOCAB, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(3, 7))
  mask = (np.arange(7)[None] < np.array([[7], [5], [2]])).astype(np.int64)
  ids = ids * mask
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), torch.from_numpy(ids), torch.from_numpy(mask))


# --- BLIP-2 parity ------------------------------------------------------------------------------------------


def test_vision_matches_hf(hf_blip2, loaded):
  params, _ = loaded
  ours_in, torch_in = _images(32)
  ours = _apply(_config(), params, ours_in, method="encode_image")
  with torch.no_grad():
    theirs = hf_blip2.vision_model(torch_in).last_hidden_state
  assert rel_error(ours, theirs) < TOL


def test_vision_interpolated_position_embeddings_match_hf(hf_blip2, loaded):
  params, _ = loaded
  ours_in, torch_in = _images(48)  # 6x6 patches from a 4x4 position table
  ours = _apply(_config(), params, ours_in, method="encode_image")
  with torch.no_grad():
    theirs = hf_blip2.vision_model(torch_in, interpolate_pos_encoding=True).last_hidden_state
  assert ours.shape == (3, 37, WIDTH)
  assert rel_error(ours, theirs) < TOL


def test_query_features_match_hf(hf_blip2, loaded):
  params, unfilled = loaded
  _, torch_in = _images(32)
  with torch.no_grad():
    image_embeds = hf_blip2.vision_model(torch_in).last_hidden_state
    theirs = hf_blip2.qformer(
      query_embeds=hf_blip2.query_tokens.expand(3, -1, -1), encoder_hidden_states=image_embeds
    ).last_hidden_state
  ours, _ = _apply(_config(), params, jnp.asarray(image_embeds.numpy()), method="query_features")
  assert rel_error(ours, theirs) < TOL
  # HF keeps neither the learnable temperature nor the Q-Former's LM head.
  assert unfilled == {
    "temp",
    "qformer/lm_transform/kernel",
    "qformer/lm_transform/bias",
    "qformer/lm_norm/scale",
    "qformer/lm_norm/bias",
    "qformer/lm_bias",
  }


def test_itm_logits_match_hf(hf_blip2, loaded):
  params, _ = loaded
  ours_img, torch_img = _images(32)
  ids, mask, tids, tmask = _texts()
  with torch.no_grad():
    theirs = hf_blip2(torch_img, tids, tmask, use_image_text_matching_head=True).logits_per_image
  ours = _apply(
    _config(), params, ours_img, ids, mask, method=lambda m, images, *text: m.itm_logits(m.encode_image(images), *text)
  )
  assert ours.shape == (3, 2)
  assert rel_error(ours, theirs) < TOL


def test_itc_similarity_matches_hf(hf_blip2, loaded):
  params, _ = loaded
  ours_img, torch_img = _images(32)
  ids, mask, tids, tmask = _texts()
  with torch.no_grad():
    theirs = hf_blip2(torch_img, tids, tmask, use_image_text_matching_head=False).logits_per_image

  def itc_similarity(m, images, text_ids, text_mask):
    image_feats = m.image_feats(m.query_features(m.encode_image(images))[0])  # [B, Q, E]
    text_feat = m.text_feat(m.text_features(text_ids, text_mask))  # [B, E]
    return jnp.einsum("iqe,te->iqt", image_feats, text_feat).max(axis=1)  # max over queries

  ours = _apply(_config(), params, ours_img, ids, mask, method=itc_similarity)
  assert ours.shape == (3, 3)
  assert rel_error(ours, theirs) < TOL


def test_sharded_checkpoint_loads_identically(blip2_dirs, template, loaded):
  params, _ = loaded
  vision = weights.load_vision_from_blip2(blip2_dirs["sharded"], template)
  qformer, _ = weights.load_qformer_from_blip2(blip2_dirs["sharded"], template)
  sharded = _flat(_merge(template, vision, qformer))
  assert len(list(blip2_dirs["sharded"].glob("*.safetensors"))) > 1
  for path, value in _flat(params).items():
    np.testing.assert_array_equal(sharded[path], value, err_msg=path)


def test_bf16_checkpoint_loads_exact_upcast_values(blip2_dirs, template, loaded):
  params, _ = loaded
  ckpt = weights.read_safetensors_dir(blip2_dirs["bf16_sharded"])
  assert ckpt["vision_model.embeddings.patch_embedding.weight"].dtype == ml_dtypes.bfloat16
  vision = weights.load_vision_from_blip2(blip2_dirs["bf16_sharded"], template)
  qformer, _ = weights.load_qformer_from_blip2(blip2_dirs["bf16_sharded"], template)
  got = _flat(_merge(vision, qformer))
  # The bf16 model is the fp32 one rounded (round-to-nearest-even in both torch and ml_dtypes); transposes and
  # the qkv-bias split commute with rounding, so the loaded tree is exactly the fp32 tree rounded.
  for path, value in _flat(params).items():
    if path.startswith(("temp", "qformer/lm_")):
      continue  # not in HF checkpoints: template values
    assert got[path].dtype == np.float32
    np.testing.assert_array_equal(got[path], value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=path)


# --- BERT initialisation ------------------------------------------------------------------------------------

BERT_VOCAB = 40


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
  config = transformers.BertConfig(
    vocab_size=BERT_VOCAB,
    hidden_size=WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=MAX_POS,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
  )
  torch.manual_seed(0)
  bert = randomise(transformers.BertForMaskedLM(config), seed=1)
  with torch.no_grad():
    bert.bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has none (LAVIS drops them)
  root = tmp_path_factory.mktemp("bert")
  bert.save_pretrained(root)
  return bert, root


@pytest.fixture(scope="module")
def bert_template():
  return _template(_config(vocab=BERT_VOCAB + 1))  # + [DEC]


def _text_hidden(m, text_ids, text_mask):
  x = m.qformer.embed(None, text_ids)
  return m.qformer.encode(x, 0, masks.padding_mask(text_mask))[0]


def _lm_logits(m, text_ids, text_mask):
  return m.qformer.lm_logits(_text_hidden(m, text_ids, text_mask))


def test_qformer_from_bert_matches_bert(hf_bert, bert_template):
  bert, root = hf_bert
  qformer = weights.load_qformer_from_bert(root, bert_template)
  params = _merge(bert_template, qformer)
  cfg = _config(vocab=BERT_VOCAB + 1)
  ids, mask, tids, tmask = _texts(BERT_VOCAB)
  with torch.no_grad():
    out = bert(input_ids=tids, attention_mask=tmask, output_hidden_states=True)
  theirs_hidden, theirs_logits = out.hidden_states[-1], out.logits

  hidden = _apply(cfg, params, ids, mask, method=_text_hidden)
  assert rel_error(hidden, theirs_hidden) < TOL
  cls = _apply(cfg, params, ids, mask, method="text_features")
  assert rel_error(cls, theirs_hidden[:, 0]) < TOL
  logits = _apply(cfg, params, ids, mask, method=_lm_logits)
  assert logits.shape[-1] == BERT_VOCAB + 1
  assert rel_error(logits[..., :BERT_VOCAB], theirs_logits) < TOL

  flat, init = _flat(params), _flat(bert_template)
  for path in flat:
    if "/ffn_query/" in path:  # the query FFN starts as a copy of BERT's FFN, as LAVIS
      np.testing.assert_array_equal(flat[path], flat[path.replace("/ffn_query/", "/ffn/")], err_msg=path)
    if "/crossattention/" in path or path.startswith(("query_tokens", "vision_proj", "text_proj", "itm_head")):
      np.testing.assert_array_equal(flat[path], init[path], err_msg=path)
  # The added [DEC] row keeps its init, as resize_token_embeddings does.
  np.testing.assert_array_equal(
    flat["qformer/word_embeddings/embedding"][BERT_VOCAB], init["qformer/word_embeddings/embedding"][BERT_VOCAB]
  )
  assert "visual_encoder" not in qformer and "ln_vision" not in qformer


def test_bert_legacy_names_load_identically(hf_bert, bert_template, tmp_path):
  """Old checkpoints spell LayerNorm weights gamma/beta, and a bare BertModel has no `bert.` prefix."""
  _, root = hf_bert
  tensors = safetensors.numpy.load_file(str(root / "model.safetensors"))
  legacy = {
    k.removeprefix("bert.")
    .replace("LayerNorm.weight", "LayerNorm.gamma")
    .replace("LayerNorm.bias", "LayerNorm.beta"): v
    for k, v in tensors.items()
  }
  assert "embeddings.LayerNorm.gamma" in legacy
  safetensors.numpy.save_file(legacy, str(tmp_path / "model.safetensors"))
  a = _flat(weights.load_qformer_from_bert(root, bert_template))
  b = _flat(weights.load_qformer_from_bert(tmp_path, bert_template))
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


# --- what a user can get wrong ------------------------------------------------------------------------------


def test_shape_mismatch_names_first_parameter_and_shapes(blip2_dirs):
  with pytest.raises(ValueError) as err:
    weights.load_vision_from_blip2(blip2_dirs["single"], _abstract(_config(mlp_dim=48)))
  msg = str(err.value)
  assert "visual_encoder/blocks/fc1/kernel" in msg
  assert "(32, 64)" in msg and "(32, 48)" in msg
  assert str(blip2_dirs["single"] / "model.safetensors") in msg


def test_missing_tensor_is_named(blip2_dirs, tmp_path):
  tensors = safetensors.numpy.load_file(str(blip2_dirs["single"] / "model.safetensors"))
  del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
    weights.load_vision_from_blip2(tmp_path, _abstract(_config()))


def test_deeper_checkpoint_keeps_first_blocks(blip2_dirs, loaded, caplog):
  params, _ = loaded
  with caplog.at_level(logging.INFO, logger="blip2_jax.weights"):
    vision = weights.load_vision_from_blip2(blip2_dirs["single"], _abstract(_config(depth=1)))
  assert "has 2 ViT blocks; using the first 1" in caplog.text
  assert set(vision["visual_encoder"]) == {"cls_token", "pos_embed", "patch_embed", "blocks"}
  assert vision["visual_encoder"]["blocks"]["fc1"]["kernel"].shape[0] == 1  # stacked by nn.scan
  np.testing.assert_array_equal(
    vision["visual_encoder"]["blocks"]["fc1"]["kernel"], params["visual_encoder"]["blocks"]["fc1"]["kernel"][:1]
  )
  with pytest.raises(ValueError, match="has 2 ViT blocks but the config asks for depth=3"):
    weights.load_vision_from_blip2(blip2_dirs["single"], _abstract(_config(depth=3)))


def test_qformer_checkpoint_larger_than_config_is_an_error(blip2_dirs):
  template = _abstract(_config(num_layers=1))
  with pytest.raises(ValueError, match=r"no place for, first `qformer\.encoder\.layer\.1\."):
    weights.load_qformer_from_blip2(blip2_dirs["single"], template)


def test_pickle_only_directory_is_refused(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match="only safetensors") as err:
    weights.read_safetensors_dir(tmp_path)
  assert "save_pretrained" in str(err.value)


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    weights.read_safetensors_dir(tmp_path / "nope")
