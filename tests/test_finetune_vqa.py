"""VQA fine-tuning (issue 15): the batch layout (the loss on the answer only, the question alone in the Q-Former),
flips, the answer draw, and a tiny question-conditioned fine-tune that evaluates VQA accuracy and exports to
transformers' InstructBLIP with the same logits (CPU, ~1 min)."""

import copy
import io
import json
import os

import helpers
import jax
import numpy as np
from PIL import Image
import pytest
import torch
import transformers

from blip2_jax import demo_llm
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.api import Blip2
from blip2_jax.data import pipeline
from blip2_jax.models import llms
from configs import finetune_vqa

QUESTIONS = ["what colour is the object at the top left?", "where is the large red circle?"]
ANSWERS = ["red", "bottom right"]


def _config(kind="opt", tiny_data_dir=None):
  config = finetune_vqa.get_config("tiny" if kind == "opt" else "t5_tiny")
  if tiny_data_dir is not None:
    config.data.data_dir = tiny_data_dir
  return config


# --- the batch -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_the_loss_is_on_the_answer_and_the_qformer_reads_the_question_alone(kind):
  config = _config(kind)
  tok, qtok = demo_llm.make_tokenizer(kind), state_lib.load_qformer_tokenizer(config)
  batch = {"image": np.zeros((2, 48, 48, 3), np.uint8), "question": QUESTIONS, "answer": ANSWERS}
  out = pipeline.tokenize_vqa_batch(batch, tok, qtok, config.data, kind)
  assert set(out) == {"image", "qformer_ids", "qformer_mask", *llms.family(kind).text_keys()}
  template = finetune_vqa.PROMPTS[kind]
  for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
    prompt = template.format(question)
    text = helpers.unpadded(out["text_ids"][i], out["text_mask"][i])
    if kind == "opt":
      # "</s>" + prompt + " " + answer + "\n"; the loss on the answer and "\n" only, right after the prompt.
      assert text == tok(f"{prompt} {answer}\n").input_ids
      labels = np.flatnonzero(out["label_mask"][i])
      prompt_len = len(tok(prompt).input_ids)
      assert labels.tolist() == list(range(prompt_len, len(text)))
      assert tok.decode(text[prompt_len:]) == answer + "\n"
    else:
      # The encoder reads prompt + "</s>", the decoder writes answer + "</s>".
      assert text == tok(prompt).input_ids
      assert helpers.unpadded(out["target_ids"][i], out["target_mask"][i]) == tok(answer).input_ids
    # The Q-Former: "[CLS] question [SEP]" in its own tokenizer, padded to data.max_question_len; no answer.
    assert out["qformer_ids"].shape[1] == config.data.max_question_len
    assert helpers.unpadded(out["qformer_ids"][i], out["qformer_mask"][i]) == qtok(question).input_ids


def test_the_train_iterator_gives_vqa_batches_of_fixed_shapes(tiny_data_dir):
  config = _config("opt", tiny_data_dir)
  tok, qtok = demo_llm.make_tokenizer("opt"), state_lib.load_qformer_tokenizer(config)
  it = pipeline.make_train_iterator(config.data, tok, global_batch_size=8, seed=0, kind="opt", qformer_tokenizer=qtok)
  batch = next(it)
  assert {k: v.shape for k, v in batch.items()} == {
    "image": (8, 48, 48, 3),
    **{k: (8, config.data.max_text_len) for k in ("text_ids", "text_mask", "label_mask")},
    **{k: (8, config.data.max_question_len) for k in ("qformer_ids", "qformer_mask")},
  }
  for i in range(8):  # the question in the LLM text is the Q-Former's, and something is learned after it
    question_ids = helpers.unpadded(batch["qformer_ids"][i], batch["qformer_mask"][i])
    question = qtok.decode(question_ids, skip_special_tokens=True)
    assert f"question: {question} answer:" in tok.decode(helpers.unpadded(batch["text_ids"][i], batch["text_mask"][i]))
    assert batch["label_mask"][i].sum() >= 2
  # A caption batch for a question-conditioned model (it has no question) is one clear error.
  config.data.task = "caption"
  with pytest.raises(
    ValueError, match="reads a question or an instruction: set config.data.task to 'vqa' or 'instruct'"
  ):
    pipeline.make_train_iterator(config.data, tok, global_batch_size=8, seed=0, kind="opt", qformer_tokenizer=qtok)


# --- augmentation and the answer draw -------------------------------------------------------------------------


def _example(question, answers, where=0):
  pixels = np.zeros((48, 48, 3), np.uint8)
  pixels[4:20, 4:20] = (255, 0, 0)  # something in the top left, so a flip shows
  png = io.BytesIO()
  Image.fromarray(pixels).save(png, format="PNG")
  return {"image": png.getvalue(), "question": question, "answers": answers, "_where": ("test", where)}


def test_a_flip_swaps_left_and_right_in_the_question_and_the_answer():
  data = _config().data
  example = _example("What colour is the object at the top LEFT?", ["top left"] * 10)
  plain = copy.deepcopy(data)
  plain.flip = False
  flipped = 0
  for seed in range(40):  # the same seed crops alike; then the flip is drawn
    out = pipeline.vqa_train_preprocess(example, np.random.default_rng(seed), data)
    same_crop = pipeline.vqa_train_preprocess(example, np.random.default_rng(seed), plain)
    if np.array_equal(out["image"], same_crop["image"]):
      assert (out["question"], out["answer"]) == ("what colour is the object at the top left?", "top left")
    else:
      flipped += 1
      np.testing.assert_array_equal(out["image"], same_crop["image"][:, ::-1])
      assert (out["question"], out["answer"]) == ("what colour is the object at the top right?", "top right")
  assert 10 <= flipped <= 30


def test_the_answer_is_drawn_in_proportion_to_its_count():
  data = _config().data
  data.flip = False
  example = _example("is it red?", ["yes"] * 7 + ["no"] * 3)
  rng = np.random.default_rng(0)
  drawn = [pipeline.vqa_train_preprocess(example, rng, data)["answer"] for _ in range(2000)]
  assert set(drawn) == {"yes", "no"}
  assert abs(drawn.count("yes") / len(drawn) - 0.7) < 0.035  # 3.5 standard deviations


def test_the_qformer_tokenizer_is_one_clear_error_when_missing_or_unknown():
  config = _config()
  config.qformer_tokenizer = ""
  with pytest.raises(ValueError, match="needs config.qformer_tokenizer"):
    state_lib.load_qformer_tokenizer(config)
  config.qformer_tokenizer = "demo_vqq"
  with pytest.raises(FileNotFoundError, match="config.qformer_tokenizer='demo_vqq' is neither"):
    state_lib.load_qformer_tokenizer(config)
  config.qformer_tokenizer, config.init.llm_weights = "demo_vqa", ""  # model.qformer.vocab_size 0: the tokenizer's
  assert state_lib.model_config(config, None).qformer.vocab_size == len(state_lib.load_qformer_tokenizer(config))


# --- a tiny fine-tune -----------------------------------------------------------------------------------------


def test_vqa_finetune_trains_evaluates_and_exports_to_instructblip(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "vqa")
  train.train_and_evaluate(_config("opt", tiny_data_dir), workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  evals = [m for m in metrics if "eval/vqa_accuracy" in m]
  assert [m["step"] for m in evals] == [0, 8]  # before the first step (eval_at_start) and at the end
  types = {"colour", "shape", "size", "position", "count"}
  for m in evals:
    assert m["eval/num_questions"] == 32 and 0 <= m["eval/vqa_accuracy"] <= 100
    assert {f"eval/vqa_accuracy_{t}" for t in types} <= set(m)
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  assert os.path.getsize(os.path.join(workdir, "examples.png")) > 0

  # The workdir exports to InstructBLIP (with its Q-Former tokenizer), which transformers reloads with our logits.
  ours = Blip2.from_workdir(workdir, devices=jax.devices()[:1])
  assert ours.question_conditioned and ours.qformer_tokenizer is not None
  ours.save_pretrained(tmp_path / "hf")
  assert (tmp_path / "hf" / "qformer_tokenizer" / "tokenizer_config.json").is_file()
  hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  q = ours.qformer_tokenizer(QUESTIONS, padding=True, return_tensors="np")
  prompts = [finetune_vqa.PROMPTS["opt"].format(question) for question in QUESTIONS]
  text = ours.tokenizer(prompts, padding=True, return_tensors="np")  # right-padded: compare the real positions
  s, queries = ours.cfg.vit.image_size, ours.cfg.num_query_tokens
  x = np.random.default_rng(0).normal(size=(2, s, s, 3)).astype(np.float32)
  logits = ours.lm_logits(
    x, text["input_ids"], text["attention_mask"], qformer_ids=q["input_ids"], qformer_mask=q["attention_mask"]
  )
  image_token = ours.llm_hf_config["vocab_size"]  # the export's added <image> token
  hf_ids = np.concatenate([np.full((2, queries), image_token), text["input_ids"]], axis=1)
  hf_mask = np.concatenate([np.ones((2, queries), np.int64), text["attention_mask"]], axis=1)
  with torch.no_grad():
    theirs = hf(
      pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      qformer_input_ids=torch.from_numpy(q["input_ids"]),
      qformer_attention_mask=torch.from_numpy(q["attention_mask"]),
      input_ids=torch.from_numpy(hf_ids),
      attention_mask=torch.from_numpy(hf_mask),
    ).logits[..., :image_token]
  real = np.concatenate([np.ones((2, queries), bool), text["attention_mask"] == 1], axis=1)
  assert helpers.rel_error(logits, theirs, where=real) < 1e-4
