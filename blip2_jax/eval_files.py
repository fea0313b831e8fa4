"""Any BLIP-2 model on annotation files and an image folder: captioning, zero-shot VQA and retrieval reports.

`evaluate_captions`, `evaluate_vqa` and `evaluate_retrieval` take a loaded model (`Blip2`) and samples read by
data/annotations.py, and return a JSON-able report: the settings, the metrics, counts, the images that could not
be decoded, and every prediction. `python -m blip2_jax.evaluate --model=...` is their command line.

- caption (stage-2 model): the paper's settings (tasks.CAPTION_SETTINGS) unless overridden; BLEU-1..4 and CIDEr-D
  (metrics.caption_scores) and exact match; for NoCaps (images with a "domain") also per domain and "entire",
  each domain scored on its own (CIDEr-D's idf from that domain's references only).
- vqa (stage-2 model): the zero-shot prompt of the model's LLM family and tasks.VQA_SETTINGS; with human answers
  (VQAv2, OK-VQA), the VQA accuracy (metrics.vqa_accuracy, also per answer_type and question_type); with GQA's
  one answer, exact match (metrics.gqa_accuracy, also per structural and semantic type).
- retrieval (stage-1 model): each caption is a text, each image's captions its positives; ITC over all pairs, the
  top k_test candidates reranked by ITM (retrieval.RetrievalScorer), R@1/5/10 both ways, and each image's and
  text's rank and top candidates.
Images are decoded in threads one batch ahead, in fixed-size batches (the last one padded) so there is one
compiled program per task; one that cannot be decoded is skipped with a warning naming it and counted in the
report's `num_skipped` and `skipped_images`; if none can be decoded, that is an error.
"""

import concurrent.futures
import json
import logging
import os

import jax
import numpy as np
import tqdm

from blip2_jax import metrics
from blip2_jax import retrieval
from blip2_jax import state as state_lib
from blip2_jax import tasks
from blip2_jax.data import annotations
from blip2_jax.data import images as images_lib
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import llms

log = logging.getLogger(__name__)

MAX_TEXT_LEN = 35  # LAVIS compute_sim_matrix tokenizes the retrieval texts to 35 tokens
NUM_TOP = 10  # candidates listed per query in the retrieval report (R@10 needs the first 10)


def _image_batches(paths: list[str], size: int, batch_size: int, unit: str = "img"):
  """Yields (positions, batch) with a progress bar: the images at `paths`, `batch_size` paths at a time,
  preprocessed by data.images.load_image in threads one batch ahead; batch [batch_size, size, size, 3] holds those
  that decoded (positions: their indices in `paths`), padded with copies of the last one so that every batch
  has one shape. An image that cannot be decoded is logged, naming it, and left out; if none can be, that is an
  error. Equal paths in one batch (questions about one image) are decoded once."""

  def load(path):
    try:
      return images_lib.load_image(path, size)
    except ValueError as e:
      return e

  chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
  warned = set()
  with (
    concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
    tqdm.tqdm(total=len(paths), unit=unit) as bar,
  ):
    submit = lambda chunk: {p: pool.submit(load, p) for p in dict.fromkeys(chunk)}
    pending = submit(chunks[0]) if chunks else {}
    for c, chunk in enumerate(chunks):
      decoded = {p: future.result() for p, future in pending.items()}
      if c + 1 < len(chunks):
        pending = submit(chunks[c + 1])
      for p, x in decoded.items():
        if isinstance(x, ValueError) and p not in warned:
          warned.add(p)
          log.warning("%s; skipped.", x)
      positions = [c * batch_size + j for j, p in enumerate(chunk) if not isinstance(decoded[p], ValueError)]
      if positions:
        yield positions, images_lib.pad_rows(np.stack([decoded[paths[i]] for i in positions]), batch_size)
      bar.update(len(chunk))
  if warned and len(warned) == len(set(paths)):
    raise ValueError(f"None of the {len(warned)} images could be decoded (see the warnings).")


def check_task(task: str, kind: str, model_name: str = "this model"):
  """kind: llms.RETRIEVAL (stage 1) or a stage-2 model's LLM family."""
  if task == "retrieval" and kind != llms.RETRIEVAL:
    raise ValueError(
      f"--task=retrieval needs a stage-1 model (a Hugging Face Blip2ForImageTextRetrieval directory "
      f"or a stage-1 workdir); {model_name} is a stage-2 captioning/VQA model."
    )
  if task != "retrieval" and kind == llms.RETRIEVAL:
    raise ValueError(
      f"--task={task} needs a stage-2 model (a Hugging Face Blip2ForConditionalGeneration directory "
      f"or a stage-2 workdir); {model_name} is a stage-1 retrieval model."
    )


def peek_model_kind(path: str) -> str | None:
  """llms.RETRIEVAL or "llm" from a model's config.json alone (nothing loaded), so a model of the wrong stage is
  refused before its weights are read; None where that does not tell (Blip2.load then says what is wrong)."""
  try:
    if os.path.isdir(os.path.join(path, "checkpoints")):  # as Blip2.load tells a workdir
      kind = state_lib.kind(state_lib.load_workdir_config(path))
      return kind if kind == llms.RETRIEVAL else "llm"
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      architecture = (json.load(f).get("architectures") or [None])[0]
  except (OSError, ValueError, AttributeError):
    return None
  return {"Blip2ForImageTextRetrieval": llms.RETRIEVAL, "Blip2ForConditionalGeneration": "llm"}.get(architecture)


def _image_fields(sample: dict) -> dict:
  return {k: sample[k] for k in ("image_id", "image", "domain") if k in sample}


def _skipped(samples: list[dict], done) -> list[str]:
  """The images of the samples not in `done` (could not be decoded), once each."""
  return list(dict.fromkeys(s["image"] for i, s in enumerate(samples) if i not in done))


def evaluate_captions(
  model, samples: list[dict], *, batch_size: int = 16, prompt: str | None = None, **settings
) -> dict:
  """Captions the images of `samples` (load_captions) with model.caption, the paper's settings unless overridden
  (prompt, num_beams, max_new_tokens, min_new_tokens, ...), and scores them against their captions
  (caption_metrics; for NoCaps samples also "by_domain", see domain_metrics). -> the report: settings, metrics,
  counts, skipped images and every caption."""
  check_task("caption", model.kind)
  if prompt is not None:
    settings["prompt"] = prompt
  predictions = {}
  for positions, batch in _image_batches([s["path"] for s in samples], model.cfg.vit.image_size, batch_size):
    predictions.update(zip(positions, model.caption(batch, **settings)))
  skipped = _skipped(samples, predictions)
  references = {i: samples[i]["captions"] for i in predictions}
  if all("domain" in samples[i] for i in predictions):  # NoCaps
    by_domain = domain_metrics(predictions, references, {i: samples[i]["domain"] for i in predictions})
    scores = {**by_domain["entire"], "by_domain": by_domain}
  else:
    scores = metrics.caption_metrics(predictions, references)
  return {
    "task": "caption",
    "settings": {"prompt": tasks.CAPTION_PROMPT, **tasks.CAPTION_SETTINGS, **settings},
    "metrics": scores,
    "num_images": len(predictions),
    "num_skipped": len(skipped),
    "skipped_images": skipped,
    "predictions": [
      {**_image_fields(samples[i]), "prediction": p, "references": samples[i]["captions"]}
      for i, p in sorted(predictions.items())
    ],
  }


def domain_metrics(predictions: dict, references: dict, domains: dict) -> dict:
  """NoCaps's breakdown: caption_metrics of each domain's images alone (in-domain, near-domain, out-domain, those
  present) and of all of them ("entire"), the four columns of the nocaps evaluation server. Each domain is scored
  as a set of its own, as pycocoevalcap scores a per-domain file (BLIP's and LAVIS-style nocaps evaluations score
  nocaps_val_{domain}.json separately; the server's own script was not available to check): CIDEr-D's document
  frequencies come from that domain's references only, so "entire" is not the image-weighted mean of the three."""
  out = {}
  for domain in annotations.NOCAPS_DOMAINS:
    ids = [i for i in predictions if domains[i] == domain]
    if ids:
      out[domain] = metrics.caption_metrics({i: predictions[i] for i in ids}, {i: references[i] for i in ids})
  out["entire"] = metrics.caption_metrics(predictions, references)
  return out


def check_vqa_prompt(prompt: str | None):
  if prompt is not None and prompt.count("{}") != 1:
    raise ValueError(
      f"A VQA prompt is a template with one {{}} for the question, e.g. 'Question: {{}} Short answer:'; got {prompt!r}."
    )


def evaluate_vqa(model, questions: list[dict], *, batch_size: int = 16, prompt: str | None = None, **settings) -> dict:
  """Answers `questions` (load_vqa) zero-shot: model.answer (the paper's prompt and settings), or `prompt`, a
  template with "{}" for the question, with the same settings; either overridable (num_beams, ...). Questions
  about one image are batched together so it is decoded once. -> the report: settings, counts, skipped images,
  every answer, and where the questions have answers their score with each question's: with human answers
  (VQAv2, OK-VQA) the VQA accuracy (metrics.vqa_accuracy, in percent; also per answer_type and question_type),
  with GQA's one answer the exact match (metrics.gqa_accuracy; also per structural and semantic type). The
  report's "scoring" says which."""
  check_task("vqa", model.kind)
  check_vqa_prompt(prompt)
  order = sorted(range(len(questions)), key=lambda i: questions[i]["path"])  # stable: file order per image
  answers = {}
  for positions, batch in _image_batches(
    [questions[i]["path"] for i in order], model.cfg.vit.image_size, batch_size, unit="question"
  ):
    ids = [order[p] for p in positions]
    texts = [questions[i]["question"].strip() for i in ids]
    texts += [texts[-1]] * (batch_size - len(texts))  # the padding rows' questions
    if prompt is None:
      out = model.answer(batch, texts, **settings)
    else:
      out = model.generate(batch, [prompt.format(t) for t in texts], **{**tasks.VQA_SETTINGS, **settings})
    answers.update(zip(ids, out))
  skipped = _skipped(questions, answers)
  report = {
    "task": "vqa",
    "settings": {"prompt": prompt or llms.family(model.kind).vqa_prompt, **tasks.VQA_SETTINGS, **settings},
    "num_questions": len(answers),
    "num_skipped_questions": len(questions) - len(answers),
    "num_skipped": len(skipped),
    "skipped_images": skipped,
    "predictions": [
      {k: questions[i][k] for k in ("question_id", "image_id", "question")} | {"prediction": a}
      for i, a in sorted(answers.items())
    ],
  }
  if all("answers" in q for q in questions):  # VQAv2, OK-VQA: 10 human answers each
    report["scoring"] = "vqa_accuracy"
    scored = metrics.vqa_accuracy(
      {questions[i]["question_id"]: a for i, a in answers.items()},
      {questions[i]["question_id"]: questions[i]["answers"] for i in answers},
    )
    reference, groups = "answers", ("answer_type", "question_type")
  elif all("answer" in q for q in questions):  # GQA: one answer each
    report["scoring"] = "exact_match"
    scored = metrics.gqa_accuracy(
      {questions[i]["question_id"]: a for i, a in answers.items()},
      {questions[i]["question_id"]: questions[i]["answer"] for i in answers},
    )
    reference, groups = "answer", ("structural_type", "semantic_type")
  else:
    return report
  by_group = {group: {} for group in groups}
  for row, i in zip(report["predictions"], sorted(answers)):
    row[reference] = questions[i][reference]
    row["accuracy"] = scored["per_question"][row["question_id"]]
    for group in groups:
      if group in questions[i]:
        by_group[group].setdefault(questions[i][group], []).append(row["accuracy"])
  report["metrics"] = {"accuracy": scored["accuracy"]}
  for group, values in by_group.items():
    if values:
      report["metrics"][f"accuracy_by_{group}"] = {t: 100.0 * float(np.mean(v)) for t, v in values.items()}
  return report


def vqa_results_file(report: dict, layout: str) -> list[dict]:
  """The answers of an evaluate_vqa report in the results format of the layout's evaluation server: VQAv2's (and
  OK-VQA's) [{"question_id", "answer"}], GQA's [{"questionId", "prediction"}]."""
  keys = ("questionId", "prediction") if layout == "gqa" else ("question_id", "answer")
  return [dict(zip(keys, (p["question_id"], p["prediction"]))) for p in report["predictions"]]


def evaluate_retrieval(model, samples: list[dict], *, batch_size: int = 16, k_test: int = 128) -> dict:
  """Image-text retrieval over the images of `samples` (load_captions) and all their captions: RetrievalScorer
  with the top `k_test` ITC candidates reranked by ITM (capped at the number of candidates; the ITM pairs go
  min(k_test, N_texts) at a time, LAVIS's k per image), then retrieval_metrics. Captions are cleaned as in
  training and cut to MAX_TEXT_LEN tokens. -> the report: metrics, counts, skipped images, and for each image
  and each text its positives' best rank (0 = first) and its first NUM_TOP candidates; texts and images are
  named by their index in the report's "texts" and "images" lists."""
  check_task("retrieval", model.kind)
  if model.tokenizer is None:
    raise ValueError(
      "This retrieval model has no tokenizer: put the Q-Former's BERT tokenizer files (vocab.txt, "
      "tokenizer_config.json) beside its weights."
    )
  # Every image batch is split over all the model's devices (its parameters' mesh).
  everywhere = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec(tuple(model.mesh.axis_names)))
  scorer = retrieval.RetrievalScorer(model.module, batch_size, progress=True, sharding=everywhere)
  kept = []

  def batches():
    for positions, batch in _image_batches([s["path"] for s in samples], model.cfg.vit.image_size, batch_size):
      kept.extend(positions)
      yield batch, len(positions)

  image_embeds, image_feats = scorer.embed_images(model.params, batches())
  skipped = _skipped(samples, set(kept))
  texts, txt2img, img2txt = [], [], []
  for i, s in enumerate(samples[j] for j in kept):
    img2txt.append(list(range(len(texts), len(texts) + len(s["captions"]))))
    texts += s["captions"]
    txt2img += [i] * len(s["captions"])
  ids, mask = tokenizer_lib.tokenize(
    model.tokenizer,
    [tokenizer_lib.clean_caption(t) for t in texts],
    min(MAX_TEXT_LEN, model.cfg.qformer.max_position_embeddings),
  )
  sims, i2t, t2i = scorer.scores(
    model.params, image_embeds, image_feats, ids, mask, k_test, itm_batch_size=min(k_test, len(texts))
  )
  t2i_positives = [[j] for j in txt2img]
  i2t_ranks, t2i_ranks = retrieval.positive_ranks(i2t, img2txt), retrieval.positive_ranks(t2i, t2i_positives)
  i2t_top = np.argsort(-i2t, axis=1, kind="stable")[:, :NUM_TOP]
  t2i_top = np.argsort(-t2i, axis=1, kind="stable")[:, :NUM_TOP]
  return {
    "task": "retrieval",
    "k_test": k_test,
    "metrics": retrieval.retrieval_metrics(sims, i2t, t2i, img2txt, txt2img),
    "num_images": len(kept),
    "num_texts": len(texts),
    "num_skipped": len(skipped),
    "skipped_images": skipped,
    "images": [
      {**_image_fields(samples[j]), "texts": img2txt[i], "rank": int(i2t_ranks[i]), "top": i2t_top[i].tolist()}
      for i, j in enumerate(kept)
    ],
    "texts": [
      {"text": t, "image": txt2img[i], "rank": int(t2i_ranks[i]), "top": t2i_top[i].tolist()}
      for i, t in enumerate(texts)
    ],
  }
