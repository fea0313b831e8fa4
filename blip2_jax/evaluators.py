"""Evaluators of a training run's eval split: image-text retrieval (stage 1) and captioning (stage 2).

`make_evaluator(config, setup, tokenizer)` picks one by the model's kind; `run(params, max_images=None)` returns
`eval/*` metrics over the split (or its first max_images images, the cheap look the trainer takes every
config.eval_every steps), and `picture()` draws the last run's first examples. `evaluate_workdir` evaluates a
workdir's latest checkpoint alone (`python -m blip2_jax.evaluate --config=... --workdir=...`).
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
  cleaning), BLEU-4 and CIDEr-D (pycocoevalcap's scorers, see metrics.py)."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup, self.tokenizer = config, setup, tokenizer
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


def make_evaluator(config, setup, tokenizer):
  """Retrieval for stage 1, captioning for stage 2."""
  cls = RetrievalEvaluator if state_lib.kind(config) == llms.RETRIEVAL else CaptionEvaluator
  return cls(config, setup, tokenizer)


def evaluate_workdir(config, workdir: str) -> dict:
  """The latest checkpoint of `workdir` (trained with `config`) on its eval split; writes WORKDIR/eval_step_N.json
  (stage 2: with every caption)."""
  config, tokenizer, setup, state, frozen = state_lib.restore_workdir(workdir, config)
  step = int(jax.device_get(state["step"]))
  evaluator = make_evaluator(config, setup, tokenizer)
  scores = evaluator.run(partitioning.merge(state["params"], frozen))
  if jax.process_index() == 0:
    report = {"step": step, **scores}
    if isinstance(evaluator, CaptionEvaluator):
      report["captions"] = [
        {"image": i, "prediction": p, "references": [evaluator.data["captions"][t] for t in ts]}
        for i, (p, ts) in enumerate(zip(evaluator.predictions, evaluator.data["img2txt"]))
      ]
    with open(os.path.join(workdir, f"eval_step_{step}.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return {"step": step, **scores}
