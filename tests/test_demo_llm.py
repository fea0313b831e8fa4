"""The demo LLMs: word-level tokenizers, export that transformers loads with our logits, what pretraining teaches
(to write the caption its context describes) and the reuse of a finished directory.

One small synthetic_shapes split (256 training captions) and one short pretraining of each LLM serve every test.
"""

import json
import logging
import re

from helpers import rel_error
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from blip2_jax import demo_llm
from blip2_jax import weights
from blip2_jax.data import pipeline
from blip2_jax.data import synthetic_shapes
from blip2_jax.data import synthetic_vqa
from blip2_jax.models import opt
from blip2_jax.models import t5
from configs import stage1

# OPT: enough to read its context (it learns that after ~200). T5: enough to see it learn; reading its context
# needs the default steps, which take too long for a test.
OPT_STEPS, T5_STEPS = 300, 40
TOL = 1e-5

CLAUSE = (
  f"({'|'.join(synthetic_shapes.SIZES)}) ({'|'.join(synthetic_shapes.COLOURS)}) ({'|'.join(synthetic_shapes.SHAPES)})"
)
QUADRANT = [f"{CLAUSE} {q}" for q in synthetic_shapes.QUADRANTS]
CAPTION = ", ".join(QUADRANT)  # four objects, in the quadrants' fixed order
EXAMPLE = (
  "large red circle top left, small blue square top right, small green triangle bottom left, "
  "large white circle bottom right"
)


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
  cfg = stage1.get_config("tiny").data  # num_train 256, num_test 64
  cfg.data_dir = str(tmp_path_factory.mktemp("data"))
  return cfg


@pytest.fixture(scope="module")
def opt_dir(data_cfg, tmp_path_factory):
  return demo_llm.make_demo_llm("opt", tmp_path_factory.mktemp("llm") / "opt", data_cfg, steps=OPT_STEPS)


@pytest.fixture(scope="module")
def t5_dir(data_cfg, tmp_path_factory):
  return demo_llm.make_demo_llm("t5", tmp_path_factory.mktemp("llm") / "t5", data_cfg, steps=T5_STEPS)


def _ours(module, root):
  """Our model, its config and its parameters from a saved directory, through the weight map."""
  with open(f"{root}/config.json") as f:
    cfg = module.config_from_hf(json.load(f))
  model = module.OPTForCausalLM(cfg) if module is opt else module.T5ForConditionalGeneration(cfg)
  ids = jnp.zeros((1, 4), jnp.int32)
  width = cfg.hidden_size if module is opt else cfg.d_model
  args = (jnp.zeros((1, 4, width)), ids + 1) + (() if module is opt else (ids,))
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"])
  saved = safetensors.numpy.load_file(f"{root}/model.safetensors")
  return model, cfg, weights.tree_from_hf(saved.__getitem__, module.weight_map(cfg), template, dtype=np.float32)


# --- tokenizers --------------------------------------------------------------------------------------------------


def test_opt_tokenizer_is_word_level_with_opts_special_tokens():
  tok = demo_llm.make_tokenizer("opt")
  ids = tok(EXAMPLE + "\n").input_ids
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (1, 2, 2)
  assert ids[0] == 2 and ids[-1] == tok.convert_tokens_to_ids("\n")  # "</s>" in front, "\n" one token
  assert len(ids) == 1 + len(EXAMPLE.replace(",", " ,").split()) + 1  # a token per word and per comma
  assert tok.unk_token_id not in ids
  assert tok.decode(ids, skip_special_tokens=True) == EXAMPLE + "\n"
  assert tok.decode(tok("a photo of " + EXAMPLE).input_ids[4:]) == EXAMPLE  # a continuation decodes alone
  # Spacing and case are canonicalised; a word outside the vocabulary is <unk>.
  assert tok("Large  red circle top left ,small").input_ids == tok("large red circle top left, small").input_ids
  assert tok("large pink circle").input_ids[2] == tok.unk_token_id


def test_t5_tokenizer_appends_eos_and_has_no_newline():
  tok = demo_llm.make_tokenizer("t5")
  ids = tok(EXAMPLE).input_ids
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert ids[-1] == 1 and 1 not in ids[:-1]
  assert tok.decode(ids, skip_special_tokens=True) == EXAMPLE
  assert len(tok) == len(demo_llm.make_tokenizer("opt")) - 2  # neither <s> nor "\n"


# --- the exported directories ------------------------------------------------------------------------------------


def test_opt_directory_loads_in_transformers_with_our_logits(opt_dir):
  tok = transformers.AutoTokenizer.from_pretrained(opt_dir)
  hf = transformers.OPTForCausalLM.from_pretrained(opt_dir).eval()
  assert len(tok) == hf.config.vocab_size
  texts = ["a photo of " + EXAMPLE + "\n", "small blue square top left"]
  batch = tok(texts, padding=True, return_tensors="np")
  assert batch.input_ids.tolist() == demo_llm.make_tokenizer("opt")(texts, padding=True).input_ids
  model, _, params = _ours(opt, opt_dir)
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  forward = jax.jit(
    lambda p, ids, mask: model.apply({"params": p}, model.apply({"params": p}, ids, method="embed"), mask)[0]
  )
  ours = forward(params, ids, mask)
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask))
  assert rel_error(ours, theirs.logits, batch.attention_mask.astype(bool)) < TOL


def test_t5_directory_loads_in_transformers_as_flan_t5_with_our_logits(t5_dir):
  tok = transformers.AutoTokenizer.from_pretrained(t5_dir)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
  assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()  # Flan-T5's own lm_head
  model, cfg, params = _ours(t5, t5_dir)
  assert (cfg.is_gated_act, cfg.dense_act_fn, cfg.tie_word_embeddings) == (True, "gelu", False)
  enc = tok(["a photo of", "large red circle top left,"], padding=True, return_tensors="np")
  labels = tok([EXAMPLE, "small blue square top right"], padding=True, return_tensors="np").input_ids
  decoder_ids = np.pad(labels[:, :-1], ((0, 0), (1, 0)))  # decoder_start_token_id 0
  forward = jax.jit(
    lambda p, ids, mask, decoder_ids: model.apply(
      {"params": p}, model.apply({"params": p}, ids, method="embed"), mask, decoder_ids
    )
  )
  ours = forward(params, jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask), jnp.asarray(decoder_ids))
  with torch.no_grad():
    theirs = hf(
      input_ids=torch.from_numpy(enc.input_ids),
      attention_mask=torch.from_numpy(enc.attention_mask),
      decoder_input_ids=torch.from_numpy(decoder_ids),
    )
  assert rel_error(ours, theirs.logits, np.s_[:]) < TOL


# --- what pretraining teaches ------------------------------------------------------------------------------------


def test_pretrained_opt_writes_the_caption_its_context_describes(opt_dir, data_cfg):
  """The layout of a stage-2 example, with the words of a held-out caption where the queries go: greedy decoding
  (transformers', on the exported directory) writes that caption, and the window's filler changes nothing."""
  tok = transformers.AutoTokenizer.from_pretrained(opt_dir)
  hf = transformers.OPTForCausalLM.from_pretrained(opt_dir).eval()
  source = pipeline.get_source(data_cfg, "test")
  captions = [source[i]["caption"] for i in range(16)]
  captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
  rng = np.random.default_rng(0)
  fillers = demo_llm._word_ids(tok)
  prompt = tok(demo_llm.PROMPT, add_special_tokens=False).input_ids
  rows = [
    np.concatenate(
      [demo_llm._context_window(rng, tok(c, add_special_tokens=False).input_ids, fillers), [tok.bos_token_id], prompt]
    )
    for c in captions
  ]
  ids = torch.from_numpy(np.stack(rows).astype(np.int64))
  out = hf.generate(
    ids, do_sample=False, max_new_tokens=30, eos_token_id=tok.convert_tokens_to_ids("\n"), pad_token_id=tok.pad_token_id
  )
  written = [tok.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]
  assert np.mean([w == c + "\n" for w, c in zip(written, captions)]) >= 0.9, list(zip(written, captions))
  assert all(re.fullmatch(CAPTION + "\n", w) for w in written)  # the grammar, where a word is wrong


def test_pretrained_opt_answers_questions_in_the_vqa_format(opt_dir, data_cfg):
  """Held-out scenes' windows, then "</s>" and BLIP-2's OPT VQA prompt with a synthetic_vqa question: greedy decoding
  writes one answer of the question's kind and "\n". How often it is right needs far more pretraining than a test
  affords (docs/demo.md: after the default 1,000 steps on the demo's 20,000 captions, about half are right)."""
  tok = transformers.AutoTokenizer.from_pretrained(opt_dir)
  hf = transformers.OPTForCausalLM.from_pretrained(opt_dir).eval()
  with open(f"{opt_dir}/demo_llm.json") as f:
    assert json.load(f)["qa_fraction"] == demo_llm.QA_FRACTION["opt"] > 0
  source = pipeline.get_source(data_cfg, "test")
  captions = [source[i]["caption"] for i in range(len(source))]
  captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
  rng = np.random.default_rng(0)
  questions = demo_llm.random_questions(captions, 64, rng)
  fillers = demo_llm._word_ids(tok)
  encode = lambda text: tok(text, add_special_tokens=False).input_ids
  rows = [
    np.concatenate(
      [
        demo_llm._context_window(rng, encode(captions[i]), fillers),
        [tok.bos_token_id],
        encode(demo_llm.vqa_prompt("opt", question)),
      ]
    )
    for i, question, _ in questions
  ]
  width = max(len(row) for row in rows)
  ids = np.full((len(rows), width), tok.pad_token_id)
  mask = np.zeros((len(rows), width), np.int64)
  for r, row in enumerate(rows):  # left-padded, as BLIP-2 pads OPT prompts for generation
    ids[r, width - len(row) :], mask[r, width - len(row) :] = row, 1
  out = hf.generate(
    torch.from_numpy(ids),
    attention_mask=torch.from_numpy(mask),
    do_sample=False,
    max_new_tokens=4,
    eos_token_id=tok.convert_tokens_to_ids("\n"),
    pad_token_id=tok.pad_token_id,
  )
  written = [tok.decode(row[width:], skip_special_tokens=True) for row in out]
  kinds = {  # the answers a question of each template can have
    "what colour": synthetic_shapes.COLOURS,
    "what shape": synthetic_shapes.SHAPES,
    "what size": synthetic_shapes.SIZES,
    "where": synthetic_shapes.QUADRANTS,
    "how many": synthetic_vqa.COUNTS,
  }
  valid = [next(v for k, v in kinds.items() if q.startswith(k)) for _, q, _ in questions]
  assert np.mean([w.endswith("\n") and w[:-1] in v for w, v in zip(written, valid)]) >= 0.95, written


def test_pretraining_lowers_the_loss(opt_dir, t5_dir):
  """From log(vocab) ~ 3.1 at init; ~0.6 nats/token is the grammar alone, ~0 reading the context. T5's few dozen
  steps show that its targets are learnable, not that it reads its context (that needs the default steps)."""
  for root, bound in ((opt_dir, 0.1), (t5_dir, 1.5)):
    with open(f"{root}/demo_llm.json") as f:
      assert json.load(f)["final_loss"] < bound, root


# --- reuse and errors --------------------------------------------------------------------------------------------


def test_finished_directory_is_reused_without_training(opt_dir, data_cfg, monkeypatch, caplog):
  def no_training(*args):
    raise AssertionError("retrained")

  monkeypatch.setattr(demo_llm, "_train_opt", no_training)
  caplog.set_level(logging.INFO, logger="blip2_jax.demo_llm")
  assert demo_llm.make_demo_llm("opt", opt_dir, data_cfg) == str(opt_dir)
  assert f"Reusing the demo opt LLM in {opt_dir} ({OPT_STEPS} steps, seed 0" in caplog.text


def test_user_errors_are_one_line(opt_dir, data_cfg, tmp_path):
  with pytest.raises(ValueError, match=r"^Unknown demo LLM kind 'gpt'; choose one of opt, t5\.$"):
    demo_llm.make_demo_llm("gpt", tmp_path / "gpt", data_cfg)
  with pytest.raises(ValueError, match=r"^[^\n]* holds a demo opt LLM, not a t5 one; give another out_dir\.$"):
    demo_llm.make_demo_llm("t5", opt_dir, data_cfg)
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "config.json").write_text("{}")
  with pytest.raises(
    ValueError,
    match=r"^[^\n]*partial is not empty but not a complete demo LLM \(no "
    r"model\.safetensors, [^\n]*$",
  ):
    demo_llm.make_demo_llm("opt", tmp_path / "partial", data_cfg)
  with pytest.raises(ValueError, match=r"^make_demo_llm needs steps >= 1; got 0\.$"):
    demo_llm.make_demo_llm("opt", tmp_path / "none", data_cfg, steps=0)
