"""Instruction tuning (issue 16, InstructBLIP): the task specs and their errors, the instruction given to both the
LLM and the Q-Former, the task mixture with each task's own templates, and a tiny run that evaluates every task
(CPU, ~40 s)."""

import collections
import json
import os

import helpers
import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from blip2_jax import demo_llm
from blip2_jax import evaluators
from blip2_jax import state as state_lib
from blip2_jax import train
from blip2_jax.data import pipeline
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import llms
from configs import instruct

PROMPTS = ["Question: what colour is the object at the top left? Answer:", "a photo of"]
ANSWERS = ["red", "small red circle top left, large blue square bottom right"]


def _config(kind="opt", tiny_data_dir=None):
  config = instruct.get_config("tiny" if kind == "opt" else "t5_tiny")
  if tiny_data_dir is not None:
    config.data.data_dir = tiny_data_dir
  return config


# --- the task specs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(prompt="hello"), "unknown field(s) prompt"),
    (dict(format="retrieval"), "format='retrieval': choose one of caption, vqa"),
    (dict(dataset=""), "dataset is missing"),
    (dict(templates=()), "templates is empty"),
    (dict(templates=("Answer this:",)), "a vqa template has one {} where the question goes"),
    (dict(weight=-2.0), "weight=-2.0: use a positive weight"),
  ],
)
def test_a_bad_task_is_one_clear_error_naming_it(change, message):
  config = _config()
  config.data.tasks.vqa.update(change)
  with pytest.raises(ValueError, match="config.data.tasks.vqa") as e:
    pipeline.instruct_tasks(config.data)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_caption_template_with_a_slot_no_tasks_and_no_weights_are_errors():
  config = _config()
  config.data.tasks.caption.templates = ("describe {}",)
  with pytest.raises(ValueError, match=r"a caption template has no \{\}"):
    pipeline.instruct_tasks(config.data)
  config = _config()
  config.data.tasks = {}
  with pytest.raises(ValueError, match="needs config.data.tasks"):
    pipeline.instruct_tasks(config.data)
  config = _config()
  config.data.tasks.caption.weight = config.data.tasks.vqa.weight = 0.0
  with pytest.raises(ValueError, match="Every task of config.data.tasks has weight 0"):
    pipeline.instruct_sources(config.data)
  with pytest.raises(ValueError, match="is for stage-2"):
    pipeline.task(config.data, llms.RETRIEVAL)
  config = _config()
  config.data.tasks.vqa.eval.num_beam = 3
  with pytest.raises(ValueError, match="config.data.tasks.vqa.eval has num_beam, which config.eval lacks"):
    evaluators.InstructEvaluator(config, setup=None, tokenizer=None)


# --- the batch -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_the_instruction_goes_to_the_llm_and_the_qformer_and_the_loss_to_the_answer(kind):
  config = _config(kind)
  tok, qtok = demo_llm.make_tokenizer(kind), state_lib.load_qformer_tokenizer(config)
  batch = {"image": np.zeros((2, 48, 48, 3), np.uint8), "prompt": PROMPTS, "answer": ANSWERS}
  out = pipeline.tokenize_instruct_batch(batch, tok, qtok, config.data, kind)
  assert set(out) == {"image", "qformer_ids", "qformer_mask", *llms.family(kind).text_keys()}
  for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
    text = helpers.unpadded(out["text_ids"][i], out["text_mask"][i])
    if kind == "opt":
      assert text == tok(f"{prompt} {answer}\n").input_ids
      prompt_len = len(tok(prompt).input_ids)
      assert np.flatnonzero(out["label_mask"][i]).tolist() == list(range(prompt_len, len(text)))
    else:
      assert text == tok(prompt).input_ids
      assert helpers.unpadded(out["target_ids"][i], out["target_mask"][i]) == tok(answer).input_ids
    # The Q-Former reads the whole instruction (InstructBLIP), every word of it known to the demo vocabulary.
    qformer = helpers.unpadded(out["qformer_ids"][i], out["qformer_mask"][i])
    assert qformer == qtok(prompt).input_ids and qtok.unk_token_id not in qformer
    assert out["qformer_ids"].shape[1] == config.data.max_question_len


def test_the_demo_templates_are_in_the_demo_vocabularies():
  tok, qtok = demo_llm.make_tokenizer("opt"), state_lib.load_qformer_tokenizer(instruct.get_config("demo"))
  question = "how many red objects are there?"
  texts = list(instruct.DEMO_CAPTION_TEMPLATES) + [t.format(question) for t in instruct.DEMO_VQA_TEMPLATES]
  for text in texts:
    assert tok.unk_token_id not in tok(text).input_ids, text
    assert qtok.unk_token_id not in qtok(text).input_ids, text


def test_each_task_is_drawn_by_its_weight_under_its_own_templates(tiny_data_dir):
  config = _config("opt", tiny_data_dir)
  sources = pipeline.instruct_sources(config.data)
  sizes = {name: len(source) for name, source, _ in sources}
  assert {name: w for name, _, w in sources} == {name: np.sqrt(n) for name, n in sizes.items()}  # weight -1
  task_configs = {
    n: (s, pipeline.task_data_config(config.data, n)) for n, s in pipeline.instruct_tasks(config.data).items()
  }
  stream = pipeline._mixture(sources, seed=0)
  rng = np.random.default_rng(0)
  counts, used = collections.Counter(), collections.defaultdict(set)
  for i in range(400):
    example = stream[i]
    out = pipeline.instruct_train_preprocess(example, rng, task_configs)
    name = example["_where"][0]
    counts[name] += 1
    if name == "caption":
      assert out["prompt"] in instruct.DEMO_CAPTION_TEMPLATES and len(out["answer"].split()) >= 3
      used[name].add(out["prompt"])
    else:
      question = pipeline.clean_question(config.data, example["question"].decode())
      matches = [
        t for t in instruct.DEMO_VQA_TEMPLATES if t.format(pipeline.swap_left_right(question)) == out["prompt"]
      ]
      matches += [t for t in instruct.DEMO_VQA_TEMPLATES if t.format(question) == out["prompt"]]
      assert matches, out["prompt"]
      used[name].add(matches[0])
    assert out["image"].shape == (48, 48, 3)
  share = counts["vqa"] / 400
  want = np.sqrt(sizes["vqa"]) / (np.sqrt(sizes["vqa"]) + np.sqrt(sizes["caption"]))
  assert abs(share - want) < 0.1, (share, want)
  assert used["caption"] == set(instruct.DEMO_CAPTION_TEMPLATES) and used["vqa"] == set(instruct.DEMO_VQA_TEMPLATES)

  tok, qtok = demo_llm.make_tokenizer("opt"), state_lib.load_qformer_tokenizer(config)
  it = pipeline.make_train_iterator(config.data, tok, global_batch_size=8, seed=0, kind="opt", qformer_tokenizer=qtok)
  batch = next(it)
  assert {k: v.shape for k, v in batch.items()} == {
    "image": (8, 48, 48, 3),
    **{k: (8, config.data.max_text_len) for k in ("text_ids", "text_mask", "label_mask")},
    **{k: (8, config.data.max_question_len) for k in ("qformer_ids", "qformer_mask")},
  }


# --- a tiny run ----------------------------------------------------------------------------------------------


def _vicuna_style_llm(path) -> str:
  """A tiny random LlamaForCausalLM (grouped-query, untied head) with a word-level tokenizer over the demo's words,
  framed as LLaMA's: "<s>" in front, "</s>" its EOS, and no pad token (load_llm_tokenizer pads with its EOS)."""
  words = [
    w for w in open(tokenizer_lib.demo_vocab_path("demo_instruct"), encoding="utf-8").read().split() if "[" not in w
  ]
  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = tokenizers.normalizers.Lowercase()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  hf_tok = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )
  assert hf_tok.pad_token is None
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(**{**helpers.LLAMA_TEXT, "vocab_size": len(vocab), "pad_token_id": None})
  )
  model.save_pretrained(path)
  hf_tok.save_pretrained(path)
  return str(path)


def test_instruction_tuning_trains_and_evaluates_every_task(tiny_data_dir, tmp_path):
  """A tiny run with a LLaMA-family LLM whose tokenizer has no pad token: "<s>" + instruction + answer + "</s>" with
  the loss on the answer; both tasks scored before the first step and at the end, and again by evaluate_workdir
  with every task's predictions in eval_step_N.json. (The OPT demo LLM's tiny runs: test_finetune_vqa.py.)"""
  config = _config("opt", tiny_data_dir)
  config.model.llm.kind = "llama"
  config.init.llm_weights = _vicuna_style_llm(tmp_path / "vicuna")
  config.update(dict(total_steps=2, checkpoint_every=2, log_every=1))
  config.data.eval_max_examples = 8
  tok = state_lib.load_tokenizer(config)
  assert tok.pad_token == "</s>"
  out = pipeline.tokenize_instruct_batch(
    {"image": np.zeros((1, 48, 48, 3), np.uint8), "prompt": PROMPTS[:1], "answer": ANSWERS[:1]},
    tok,
    state_lib.load_qformer_tokenizer(config),
    config.data,
    "llama",
  )
  text = helpers.unpadded(out["text_ids"][0], out["text_mask"][0])
  assert text == tok(f"{PROMPTS[0]} {ANSWERS[0]}</s>").input_ids and text[0] == 1 and text[-1] == 2
  assert tok.decode([t for t, m in zip(out["text_ids"][0], out["label_mask"][0]) if m]) == "red </s>"

  workdir = str(tmp_path / "workdir")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f]
  evals = [m for m in metrics if "eval/vqa/vqa_accuracy" in m]
  assert [m["step"] for m in evals] == [0, 2]  # before the first step (eval_at_start) and at the end
  for m in evals:
    assert m["eval/caption/num_images"] == 8 and 0 <= m["eval/caption/cider"]
    assert m["eval/vqa/num_questions"] == 8 and 0 <= m["eval/vqa/vqa_accuracy"] <= 100
    assert "eval/vqa/vqa_accuracy_colour" in m
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  assert os.path.getsize(os.path.join(workdir, "examples.png")) > 0

  scores = evaluators.evaluate_workdir(config, workdir)
  assert scores["eval/vqa/vqa_accuracy"] == evals[-1]["eval/vqa/vqa_accuracy"]
  with open(os.path.join(workdir, "eval_step_2.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert set(report["tasks"]) == {"caption", "vqa"}
  assert len(report["tasks"]["caption"]) == 8 and len(report["tasks"]["vqa"]) == 8
  assert report["tasks"]["vqa"][0]["question"] and "prediction" in report["tasks"]["caption"][0]
