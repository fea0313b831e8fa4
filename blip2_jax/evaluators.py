"""Evaluators of a training run's eval split: image-text retrieval (stage 1), captioning (stage 2), VQA (stage 2
with config.data.task "vqa") and every task of an instruction-tuning run (config.data.task "instruct").

`make_evaluator(config, setup, tokenizer)` picks one by the model's kind and data.task; `run(params,
max_images=None)` returns `eval/*` metrics over the split (or its first max_images images, the cheap look the trainer
takes every config.eval_every steps), and `picture()` draws the last run's first examples. `evaluate_workdir`
evaluates a workdir's latest checkpoint alone (`python -m blip2_jax.evaluate --config=... --workdir=...`).
"""

import json
import os

import jax
import numpy as np

from blip2_jax import examples
from blip2_jax import metrics
from blip2_jax import partitioning
from blip2_jax import retrieval
from blip2_jax import state as state_lib
from blip2_jax import tasks
from blip2_jax.data import images as images_lib
from blip2_jax.data import pipeline
from blip2_jax.models import llms


class RetrievalEvaluator:
  """Embeds the eval split once per run() and computes image->text and text->image R@1/5/10, with the image
  embeddings sharded over the trainer's batch shards (retrieval.RetrievalScorer)."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup = config, setup
    self.data = pipeline.load_eval_set(config.data, tokenizer)
    self.scorer = retrieval.RetrievalScorer(setup.model, config.eval.batch_size, sharding=setup.batch_sharding)
    self.i2t, self.shown = None, None  # the last run's image->text scores and its images, for picture()

  def run(self, params, max_images: int | None = None) -> dict:
    """R@1/5/10 both ways over the split, or over its first max_images images and their texts (a cheaper
    look during training)."""
    d, k = _first_images(self.data, max_images), self.config.eval.k_test
    batches = images_lib.padded_batches(d["images"], batch_size=self.scorer.batch)
    image_embeds, image_feats = self.scorer.embed_images(params, batches)
    sims, i2t, t2i = self.scorer.scores(params, image_embeds, image_feats, d["text_ids"], d["text_mask"], k)
    scores = retrieval.retrieval_metrics(sims, i2t, t2i, d["img2txt"], d["txt2img"])
    out = {f"eval/{name}": v for name, v in scores.items()}
    out["eval/num_images"], out["eval/num_texts"] = float(sims.shape[0]), float(sims.shape[1])
    self.i2t, self.shown = i2t, d
    return out

  def picture(self, n: int = 16):
    """The last run's first n images, each with its top retrieved caption, green if right, red if wrong."""
    d = self.shown
    return examples.grid(
      examples.to_uint8(d["images"][:n]), examples.retrieval_texts(d["captions"], self.i2t, d["img2txt"], n)
    )


def _first_images(data: dict, max_images: int | None) -> dict:
  """The eval set restricted to its first max_images images and the texts that belong to them."""
  if max_images is None or max_images >= len(data["images"]):
    return data
  texts = np.flatnonzero(data["txt2img"] < max_images)
  new_index = {int(t): i for i, t in enumerate(texts)}
  return {
    "images": data["images"][:max_images],
    "text_ids": data["text_ids"][texts],
    "text_mask": data["text_mask"][texts],
    "txt2img": data["txt2img"][texts],
    "img2txt": [[new_index[t] for t in data["img2txt"][i]] for i in range(max_images)],
    "captions": [data["captions"][t] for t in texts],
  }


class CaptionEvaluator:
  """Stage 2: captions every image of the eval split (config.eval: prompt, beams, new-token limits) and scores
  the captions against the split's references: exact match (the caption equals one of them after LAVIS's
  cleaning), BLEU-4 and CIDEr-D (pycocoevalcap's scorers, see metrics.py). A question-conditioned model's Q-Former
  reads the prompt too (an instruction-tuned model's caption instruction)."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup, self.tokenizer = config, setup, tokenizer
    self.qformer_tokenizer = state_lib.load_qformer_tokenizer(config)
    self.data = pipeline.load_eval_set(config.data, tokenizer)
    self.predictions: list[str] = []
    self.shown = None  # the images (and references) of the last run, for picture()

  def run(self, params, max_images: int | None = None) -> dict:
    """Scores over the split, or over its first max_images images (a cheaper look during training)."""
    e = self.config.eval
    d = _first_images(self.data, max_images)
    preds = []
    # Fixed-size batches (one compiled program for every batch), split over the batch shards: each device (and
    # process) captions its own rows, and the captions are gathered.
    shards = partitioning.batch_shards(self.setup.batch_sharding)
    for batch, n in images_lib.padded_batches(d["images"], batch_size=-(-e.batch_size // shards) * shards):
      preds += tasks.generate_text(
        self.setup.model,
        params,
        self.tokenizer,
        batch,
        e.prompt,
        qformer_tokenizer=self.qformer_tokenizer,
        max_new_tokens=e.max_new_tokens,
        min_new_tokens=e.min_new_tokens,
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        sharding=self.setup.batch_sharding,
      )[:n]
    self.predictions, self.shown = preds, d
    refs = {i: [d["captions"][t] for t in texts] for i, texts in enumerate(d["img2txt"])}
    scores = metrics.caption_metrics(dict(enumerate(preds)), refs)
    return {
      "eval/exact_match": scores["exact_match"],
      "eval/bleu4": scores["bleu4"],
      "eval/cider": scores["cider"],
      "eval/num_images": float(len(preds)),
    }

  def picture(self, n: int = 16):
    """The last run's first n images: the generated caption (green if it is a reference) over a reference."""
    d = self.shown
    refs = [[d["captions"][t] for t in texts] for texts in d["img2txt"]]
    return examples.grid(examples.to_uint8(d["images"][:n]), examples.caption_texts(self.predictions, refs, n))

  def report(self) -> list[dict]:
    """Every image of the last run with its caption and references (for WORKDIR/eval_step_N.json)."""
    d = self.shown
    return [
      {"image": i, "prediction": p, "references": [d["captions"][t] for t in ts]}
      for i, (p, ts) in enumerate(zip(self.predictions, d["img2txt"]))
    ]


class VqaEvaluator:
  """Stage 2 with config.data.task "vqa": answers every question of the eval split and scores the answers with the
  VQAv2 accuracy (metrics.vqa_accuracy, in percent), over all questions and per question type.

  The LLM reads config.eval.prompt with the question ("" = the LLM family's VQA prompt, the paper's); a
  question-conditioned model's Q-Former reads the question alone, in its own tokenizer (config.qformer_tokenizer).
  Decoding: config.eval's num_beams, max_new_tokens, min_new_tokens, length_penalty (the paper: 5 beams, at most 10
  new tokens, at least 1, length penalty -1, as LAVIS's VQA evaluation configs). Each question is one row of a
  fixed-size batch; the rows of questions about one image read that image.

  qformer_reads: what a question-conditioned Q-Former reads, "question" (BLIP-2's VQA fine-tuning) or "instruction"
  (the prompt with the question in it, as InstructBLIP)."""

  def __init__(self, config, setup, tokenizer, qformer_reads: str = "question"):
    if qformer_reads not in ("question", "instruction"):
      raise ValueError(f"qformer_reads={qformer_reads!r}: choose 'question' or 'instruction'.")
    self.config, self.setup, self.tokenizer, self.qformer_reads = config, setup, tokenizer, qformer_reads
    kind = state_lib.kind(config)
    self.template = pipeline.vqa_template(config.eval.prompt, kind, "config.eval.prompt")
    self.qformer_tokenizer = state_lib.load_qformer_tokenizer(config)
    self.data = pipeline.load_vqa_eval_set(config.data)
    self.predictions: list[str] = []
    self.scores: list[float] = []
    self.shown = None  # the questions (and images) of the last run, for picture()

  def _questions(self, max_images: int | None) -> np.ndarray:
    """The indices of the questions about the split's first max_images images (all of them with None)."""
    q2img = self.data["q2img"]
    return np.arange(len(q2img)) if max_images is None else np.flatnonzero(q2img < max_images)

  def run(self, params, max_images: int | None = None) -> dict:
    """VQA accuracy over the split's questions, or over those about its first max_images images."""
    e, d = self.config.eval, self.data
    rows = self._questions(max_images)
    shards = partitioning.batch_shards(self.setup.batch_sharding)
    batch_size = -(-e.batch_size // shards) * shards
    conditioned = self.qformer_tokenizer is not None
    preds = []
    for batch, n in images_lib.padded_batches(rows, batch_size=batch_size):
      questions = [d["questions"][i] for i in batch]
      prompts = [self.template.format(q) for q in questions]
      preds += tasks.generate_text(
        self.setup.model,
        params,
        self.tokenizer,
        d["images"][d["q2img"][batch]],
        prompts,
        qformer_tokenizer=self.qformer_tokenizer,
        qformer_prompts=(questions if self.qformer_reads == "question" else prompts) if conditioned else None,
        max_new_tokens=e.max_new_tokens,
        min_new_tokens=e.min_new_tokens,
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        sharding=self.setup.batch_sharding,
      )[:n]
    scored = metrics.vqa_accuracy(dict(zip(rows.tolist(), preds)), {int(i): d["answers"][i] for i in rows})
    self.predictions = preds
    self.scores = [scored["per_question"][int(i)] for i in rows]
    self.shown = rows
    out = {"eval/vqa_accuracy": scored["accuracy"]}
    by_type = {}
    for i, score in zip(rows, self.scores):
      if d["question_types"][i]:
        by_type.setdefault(d["question_types"][i], []).append(score)
    for name, values in sorted(by_type.items()):
      out[f"eval/vqa_accuracy_{'_'.join(name.split())}"] = 100.0 * float(np.mean(values))
    out["eval/num_questions"] = float(len(rows))
    out["eval/num_images"] = float(len(np.unique(d["q2img"][rows])))
    return out

  def picture(self, n: int = 16):
    """The last run's first n questions: each one's image, the question, the answer given (green if it scores) and
    the most common human answer."""
    d, rows = self.data, self.shown[:n]
    return examples.grid(
      examples.to_uint8(d["images"][d["q2img"][rows]]),
      examples.vqa_texts(
        [d["questions"][i] for i in rows], self.predictions, [d["answers"][i] for i in rows], self.scores, n
      ),
    )

  def report(self) -> list[dict]:
    """Every question of the last run with its answer and score (for WORKDIR/eval_step_N.json)."""
    d = self.data
    return [
      {
        "question_id": d["question_ids"][i],
        "question": d["questions"][i],
        "question_type": d["question_types"][i],
        "prediction": p,
        "answers": d["answers"][i],
        "accuracy": score,
      }
      for i, p, score in zip(self.shown.tolist(), self.predictions, self.scores)
    ]


class InstructEvaluator:
  """Instruction tuning (config.data.task "instruct"): each task of config.data.tasks on its own eval split, under
  its first template (the caption metrics for a caption task, the VQA accuracy per question type for a VQA one),
  with config.eval overridden by the task's `eval` fields. Metrics are eval/<task>/<metric>."""

  def __init__(self, config, setup, tokenizer):
    tasks_ = pipeline.instruct_tasks(config.data)
    for name, spec in tasks_.items():
      unknown = sorted(set(spec.get("eval") or {}) - set(config.eval))
      if unknown:
        raise ValueError(
          f"config.data.tasks.{name}.eval has {', '.join(unknown)}, which config.eval lacks; it may set "
          f"{', '.join(sorted(config.eval))}."
        )
    self.evaluators = {}
    for name, spec in tasks_.items():
      sub = config.copy_and_resolve_references()
      with sub.unlocked():
        sub.data = pipeline.task_data_config(config.data, name)
        sub.eval.prompt = str(spec.templates[0])
        sub.eval.update(dict(spec.get("eval") or {}))
      if spec.format == "vqa":
        self.evaluators[name] = VqaEvaluator(sub, setup, tokenizer, qformer_reads="instruction")
      else:
        self.evaluators[name] = CaptionEvaluator(sub, setup, tokenizer)
    self.shown = None

  def run(self, params, max_images: int | None = None) -> dict:
    out = {}
    for name, evaluator in self.evaluators.items():
      out.update({k.replace("eval/", f"eval/{name}/", 1): v for k, v in evaluator.run(params, max_images).items()})
    self.shown = True
    return out

  def picture(self, n: int = 16):
    """Each task's picture (its first n examples), one above the other."""
    return examples.stack([e.picture(n) for e in self.evaluators.values()], list(self.evaluators))

  def report(self) -> dict:
    return {name: e.report() for name, e in self.evaluators.items()}


def make_evaluator(config, setup, tokenizer):
  """Retrieval for stage 1; for stage 2, by config.data.task: VQA, every instruction task, or captioning."""
  kind = state_lib.kind(config)
  if kind == llms.RETRIEVAL:
    return RetrievalEvaluator(config, setup, tokenizer)
  cls = {"vqa": VqaEvaluator, "instruct": InstructEvaluator}.get(pipeline.task(config.data, kind), CaptionEvaluator)
  return cls(config, setup, tokenizer)


def evaluate_workdir(config, workdir: str) -> dict:
  """The latest checkpoint of `workdir` (trained with `config`) on its eval split; writes WORKDIR/eval_step_N.json
  (stage 2: with every caption, or every answer)."""
  config, tokenizer, setup, state, frozen = state_lib.restore_workdir(workdir, config)
  step = int(jax.device_get(state["step"]))
  evaluator = make_evaluator(config, setup, tokenizer)
  scores = evaluator.run(partitioning.merge(state["params"], frozen))
  if jax.process_index() == 0:
    report = {"step": step, **scores}
    if isinstance(evaluator, CaptionEvaluator):
      report["captions"] = evaluator.report()
    elif isinstance(evaluator, VqaEvaluator):
      report["answers"] = evaluator.report()
    elif isinstance(evaluator, InstructEvaluator):
      report["tasks"] = evaluator.report()
    with open(os.path.join(workdir, f"eval_step_{step}.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return {"step": step, **scores}
