"""The question-conditioned Q-Former (BLIP-2's VQA fine-tuning, HF InstructBLIP): its mask, parity with
transformers' InstructBlipForConditionalGeneration (OPT, Flan-T5 and LLaMA/Vicuna LLMs), and its export.

Each HF model is tiny and randomised as in test_api.py (std 0.2; norm scales around 1), saved with
`save_pretrained`, loaded by us and compared in float32: max |ours - theirs| / max |theirs| <= 1e-5.
"""

from flax import traverse_util
import flax.linen as nn
from helpers import LLAMA_TEXT
from helpers import OPT_TEXT
from helpers import T5_TEXT
from helpers import randomise
from helpers import rel_error
from helpers import word_tokenizer
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from blip2_jax import hf as hf_lib
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax.api import Blip2
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import llms
from blip2_jax.models import masks
from blip2_jax.models.blip2 import Blip2LLM

TOL = 1e-5
WIDTH, QUERIES, VOCAB_QF, IMAGE, IMAGE_TOKEN = 32, 4, 40, 32, 63
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
QFORMER = dict(
  hidden_size=WIDTH,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  cross_attention_frequency=1,
  encoder_hidden_size=WIDTH,
  vocab_size=VOCAB_QF,
  max_position_embeddings=16,
)
TEXT = {"opt": OPT_TEXT, "t5": T5_TEXT, "llama": LLAMA_TEXT}  # llama: Vicuna's (grouped-query, untied head)


def _hf_model(kind: str, seed=0):
  config = transformers.InstructBlipConfig(
    vision_config=VISION,
    qformer_config=QFORMER,
    text_config=TEXT[kind],
    num_query_tokens=QUERIES,
    image_token_index=IMAGE_TOKEN,
  )
  torch.manual_seed(seed)
  model = randomise(transformers.InstructBlipForConditionalGeneration(config), seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, transformers.models.instructblip.modeling_instructblip.InstructBlipAttention):
        module.qkv.bias[module.embed_dim : 2 * module.embed_dim] = 0.0  # EVA's key has no bias: cat(q, 0, v)
  return model


def _images(batch=3, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _texts(vocab, batch=3, length=7, seed=1, left_pad=False):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab - 2, size=(batch, length))
  lengths = np.array([length, length - 2, 2][:batch])[:, None]
  pos = np.arange(length)[None]
  mask = ((pos >= length - lengths) if left_pad else (pos < lengths)).astype(np.int64)
  return ids * mask + (1 - mask), mask


def _question(batch=3, seed=5):
  """Q-Former ids [B, 6], right-padded: rows of 6, 4 and 1 tokens."""
  return _texts(VOCAB_QF, batch=batch, length=6, seed=seed)


class _Lazy(dict):
  def __init__(self, make):
    super().__init__()
    self.make = make

  def __missing__(self, kind):
    self[kind] = self.make(kind)
    return self[kind]


def _one_device_mesh():
  return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> (HF InstructBLIP model, its save_pretrained directory)."""
  root = tmp_path_factory.mktemp("instructblip")

  def make(kind):
    # Seed 1: seed 0's T5 amplifies float32 rounding (vs a float64 run: transformers 3.9e-6, ours 8.6e-6).
    model = _hf_model(kind, seed=1)
    model.save_pretrained(root / kind)
    return model, root / kind

  return _Lazy(make)


@pytest.fixture(scope="module")
def loaded(saved):
  return _Lazy(lambda kind: Blip2.from_pretrained(saved[kind][1], mesh=_one_device_mesh()))


def _hf_mask(mask):
  return np.concatenate([np.ones((mask.shape[0], QUERIES), np.int64), mask], axis=1)


def _hf_logits(hf, px, ids, mask, q_ids, q_mask, dec_ids=None, image_token=IMAGE_TOKEN):
  """HF's logits for our inputs: <image> placeholders in front of the LLM text. A LLaMA is given generate's
  position ids (cumsum(mask) - 1, which ours count): its forward would count the left padding."""
  b = ids.shape[0]
  hf_ids = np.concatenate([np.full((b, QUERIES), image_token), ids], axis=1)
  hf_mask = _hf_mask(mask)
  extra = {} if dec_ids is None else {"decoder_input_ids": torch.from_numpy(dec_ids)}
  if hf.config.text_config.model_type == "llama":
    extra["position_ids"] = torch.from_numpy(np.where(hf_mask == 1, np.cumsum(hf_mask, axis=1) - 1, 0))
  with torch.no_grad():
    return hf(
      pixel_values=px,
      qformer_input_ids=torch.from_numpy(q_ids),
      qformer_attention_mask=torch.from_numpy(q_mask),
      input_ids=torch.from_numpy(hf_ids),
      attention_mask=torch.from_numpy(hf_mask),
      **extra,
    ).logits


def _llm_text(kind):
  """(ids, mask, decoder ids or None, where to compare the logits or None: everywhere)."""
  if kind == "t5":
    ids, mask = _texts(T5_TEXT["vocab_size"] - 1)
    dec = np.random.default_rng(2).integers(2, 60, size=(3, 5))
    dec[:, 0] = 0
    return ids, mask, dec, None
  ids, mask = _texts(TEXT[kind]["vocab_size"] - 1, left_pad=True)
  # OPT: every position (its positions skip the padding in HF too); LLaMA: the real tokens, as tests/test_llama.py.
  return ids, mask, None, (_hf_mask(mask).astype(bool) if kind == "llama" else None)


# --- the mask --------------------------------------------------------------------------------------------------


def test_mask_queries_and_question_see_each_other_and_pads_are_hidden():
  q_mask = np.array([[1, 1, 1], [1, 0, 0]])
  m = np.asarray(masks.bidirectional_mask(2, q_mask))
  assert m.shape == (2, 1, 1, 5)  # one row for every position: queries and question tokens see the same keys
  np.testing.assert_array_equal(m[:, 0, 0], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def test_the_answer_never_reaches_the_qformer_and_the_question_does(loaded):
  """Through the training loss: the soft prompt (language_projection's output) is bitwise the same whatever the
  LLM text (prompt and answer) and the ids under Q-Former pads hold, and changes with a question token."""
  ours = loaded["opt"]
  x, _ = _images()
  ids, mask = _texts(OPT_TEXT["vocab_size"] - 1, left_pad=True)
  q_ids, q_mask = _question()
  batch = dict(
    image=x, text_ids=ids, text_mask=mask, label_mask=mask, qformer_ids=q_ids, qformer_mask=q_mask.astype(np.int32)
  )

  @jax.jit
  def soft_prompt(batch):
    _, state = ours.module.apply(
      {"params": ours.params},
      batch,
      train=False,
      method="losses",
      capture_intermediates=lambda mdl, _: mdl.name == "language_projection",
    )
    return state["intermediates"]["language_projection"]["__call__"][0]

  base = np.asarray(soft_prompt(batch))
  answer = dict(batch, text_ids=np.where(mask == 1, (ids + 7) % 60 + 3, ids))
  assert np.array_equal(np.asarray(soft_prompt(answer)), base)
  pads = dict(batch, qformer_ids=np.where(q_mask == 1, q_ids, 5))
  assert np.array_equal(np.asarray(soft_prompt(pads)), base)
  question = dict(batch, qformer_ids=q_ids.copy())
  question["qformer_ids"][2, 0] = (q_ids[2, 0] + 1) % VOCAB_QF  # the one token of row 2
  changed = np.asarray(soft_prompt(question))
  assert not np.allclose(changed[2], base[2], atol=1e-4)
  np.testing.assert_array_equal(changed[:2], base[:2])


def test_question_ids_are_required_exactly_when_the_flag_is_on(loaded):
  ours = loaded["opt"]
  x, _ = _images(batch=1)
  ids, mask = np.ones((1, 3), np.int32), np.ones((1, 3), np.int32)
  with pytest.raises(ValueError, match="qformer_ids"):
    ours.lm_logits(x, ids, mask)
  batch = dict(image=x, text_ids=ids, text_mask=mask, label_mask=mask)
  with pytest.raises(ValueError, match="'qformer_ids', 'qformer_mask'"):  # traced only: the error comes first
    jax.eval_shape(lambda: ours.module.apply({"params": ours.params}, batch, train=False, method="losses"))
  plain = ml_collections.ConfigDict(ours.cfg.to_dict())
  plain.qformer_text_input = False
  with pytest.raises(ValueError, match="no text side"):
    jax.eval_shape(lambda: Blip2LLM(plain).init(jax.random.PRNGKey(0), x, ids, mask, qformer_ids=ids))


# --- parity with transformers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["opt", "t5", "llama"])
def test_query_outputs_and_logits_match_hf_instructblip(saved, loaded, kind):
  hf, ours = saved[kind][0], loaded[kind]
  assert ours.question_conditioned
  x, px = _images()
  q_ids, q_mask = _question()
  with torch.no_grad():
    features = hf.get_image_features(
      px, qformer_input_ids=torch.from_numpy(q_ids), qformer_attention_mask=torch.from_numpy(q_mask)
    )
  assert rel_error(ours.query_output(x, q_ids, q_mask), features.qformer_outputs[0][:, :QUERIES]) < TOL
  assert rel_error(ours.image_prompt(x, q_ids, q_mask), features.pooler_output) < TOL
  ids, mask, dec, real = _llm_text(kind)
  theirs = _hf_logits(hf, px, ids, mask, q_ids, q_mask, dec)
  assert rel_error(ours.lm_logits(x, ids, mask, dec, qformer_ids=q_ids, qformer_mask=q_mask), theirs, real) < TOL


@pytest.mark.parametrize("kind", ["opt", "t5", "llama"])
def test_export_reloads_in_transformers_instructblip_with_the_same_logits(saved, loaded, kind, tmp_path):
  hf, ours = saved[kind][0], loaded[kind]
  ours.save_pretrained(tmp_path / "out")
  again = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  x, px = _images()
  q_ids, q_mask = _question()
  assert again.config.text_config.model_type == kind
  ids, mask, dec, real = _llm_text(kind)
  theirs = _hf_logits(hf, px, ids, mask, q_ids, q_mask, dec)
  assert rel_error(_hf_logits(again, px, ids, mask, q_ids, q_mask, dec), theirs, real) < TOL


# Greedy, and beam search as BLIP-2 captions (3 beams here, a length penalty): settings of `Blip2.generate`. No
# repetition penalty: HF's decoder-only generate counts the input_ids (<image> placeholders and prompt) as seen
# tokens, `Blip2.generate` only the generated ones (as LAVIS, which passes inputs_embeds alone).
SEARCHES = {"greedy": dict(num_beams=1), "beam": dict(num_beams=3, length_penalty=0.6)}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("kind", ["opt", "t5", "llama"])
def test_generation_matches_hf_instructblip(saved, loaded, kind, search):
  """`Blip2.generate` tokenizes the LLM prompt (OPT and LLaMA: BOS + prompt, left-padded; T5: prompt + "</s>",
  the encoder's input) and the Q-Former's text (its own tokenizer, as InstructBlipProcessor), and decodes as HF's
  generate does, token for token (each word of the tokenizer is one token)."""
  hf, ours = saved[kind][0], loaded[kind]
  ours.tokenizer = word_tokenizer(kind, TEXT[kind]["vocab_size"])
  ours.qformer_tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.demo_vocab_path())
  x, px = _images(batch=2)
  prompts, questions = ["w7 w9 w30", "w12"], ["large red circle", "small blue square on the left"]
  texts = ours.generate(x, prompts, qformer_prompts=questions, max_new_tokens=6, **SEARCHES[search])
  want = []
  for i, (prompt, question) in enumerate(zip(prompts, questions)):  # one row at a time: no padding on HF's side
    ids = ours.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
      out = hf.generate(
        pixel_values=px[i : i + 1],
        qformer_input_ids=torch.tensor([ours.qformer_tokenizer(question)["input_ids"]]),
        input_ids=torch.tensor([[IMAGE_TOKEN] * QUERIES + ids]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=llms.family(kind).eos_token_id(ours.tokenizer),
        pad_token_id=ours.tokenizer.pad_token_id,
        **SEARCHES[search],
      )
    # A decoder-only LLM's output repeats its input ids; T5's starts with decoder_start_token_id (a pad).
    new = out[0, 1:] if kind == "t5" else out[0, QUERIES + len(ids) :]
    want.append(ours.tokenizer.decode(new, skip_special_tokens=True).strip())
  assert all(want) and texts == want


# --- our own model, exported and read back ---------------------------------------------------------------------


# The LLM's tables with a row per token (their axis of it), to which the export adds HF's <image> row.
VOCAB_AXES = {"language_model/embed_tokens/embedding": 0, "language_model/lm_head/kernel": 1}


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_question_conditioned_params_round_trip_through_the_instructblip_layout(kind, tmp_path):
  """A question-conditioned Blip2LLM with random parameters of its own (not from HF) -> save_pretrained (with a
  Q-Former tokenizer) -> from_pretrained: every parameter and the tokenizer come back; transformers reads the
  export and gives our logits."""
  hf_config = transformers.InstructBlipConfig(
    vision_config=VISION, qformer_config=QFORMER, text_config=TEXT[kind], num_query_tokens=QUERIES
  ).to_dict()
  hf_config["architectures"] = ["InstructBlipForConditionalGeneration"]
  cfg, got_kind = hf_lib.config_from_hf(hf_config)
  assert got_kind == kind
  abstract = state_lib.abstract_params(state_lib.build_module(cfg, kind), cfg, kind)
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
  assert "qformer/word_embeddings/embedding" in flat and "qformer/layers_1/ffn/intermediate/kernel" in flat
  assert not any(p.startswith("qformer/") and "lm_" in p for p in flat)  # no Q-Former LM head
  params = traverse_util.unflatten_dict(
    {p: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32) for p, a in flat.items()}, sep="/"
  )
  qformer_tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.demo_vocab_path())
  model = Blip2(cfg, kind, params, _one_device_mesh(), llm_hf_config=TEXT[kind], qformer_tokenizer=qformer_tokenizer)
  model.save_pretrained(tmp_path / "out")
  assert (tmp_path / "out" / "qformer_tokenizer" / "tokenizer_config.json").is_file()

  again = Blip2.from_pretrained(tmp_path / "out", mesh=_one_device_mesh())
  assert again.question_conditioned and again.qformer_tokenizer.get_vocab() == qformer_tokenizer.get_vocab()
  back = traverse_util.flatten_dict(again.params, sep="/")
  assert set(back) == set(flat)
  for path, value in traverse_util.flatten_dict(params, sep="/").items():
    got = np.asarray(back[path])
    if path in VOCAB_AXES:  # plus the export's <image> row
      got = np.moveaxis(got, VOCAB_AXES[path], 0)
      value = np.moveaxis(np.asarray(value), VOCAB_AXES[path], 0)
      assert got.shape[0] == value.shape[0] + 1 and not got[-1].any()
      got = got[:-1]
    assert np.array_equal(got, np.asarray(value)), path

  x, px = _images()
  q_ids, q_mask = _question()
  vocab = TEXT[kind]["vocab_size"]
  ids, mask, _, real = _llm_text(kind)
  ours = model.lm_logits(x, ids, mask, qformer_ids=q_ids, qformer_mask=q_mask)
  hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  # image_token: the export's added <image> token
  theirs = _hf_logits(hf, px, ids, mask, q_ids, q_mask, image_token=vocab)
  assert rel_error(ours, theirs[..., :vocab], real) < TOL
