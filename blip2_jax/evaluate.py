r"""Evaluation: a training workdir's eval split, or any model on COCO-format annotation files and an image folder.

A training workdir (image-text retrieval for stage 1, captioning for stage 2, `CaptionEvaluator`):

  python -m blip2_jax.evaluate --config=configs/stage1.py:demo --workdir=workdirs/stage1_demo

evaluates the latest checkpoint of a workdir alone and writes WORKDIR/eval_step_N.json. During training the
same evaluator runs every config.eval_every steps and at the end.

Any model (a Hugging Face BLIP-2 directory or a workdir, `Blip2.load`) on annotation files, with a JSON report:

  python -m blip2_jax.evaluate --model=PATH --task=caption --annotations=captions_val2017.json --images=DIR \
      --out=report.json [--batch_size=16 --limit=N --num_beams=5 --max_new_tokens=30 --prompt="a photo of"]
  python -m blip2_jax.evaluate --model=PATH --task=vqa --questions=v2_OpenEnded_mscoco_val2014_questions.json \
      [--annotations=v2_mscoco_val2014_annotations.json] --images=DIR --out=report.json
  python -m blip2_jax.evaluate --model=PATH --task=retrieval --annotations=captions_val2017.json --images=DIR \
      --out=report.json [--k_test=128]

- caption (stage-2 model): COCO captions files ({"images": [{id, file_name}], "annotations": [{image_id,
  caption}]}) or Karpathy-style lists ([{"image": file, "caption": [...]}], LAVIS's coco_karpathy_test.json);
  `file_name`/`image` are relative to --images. Paper settings (tasks.CAPTION_SETTINGS) unless overridden;
  BLEU-1..4 and CIDEr-D (metrics.caption_scores) and exact match; the report lists every caption.
- vqa (stage-2 model): VQAv2 files. The image of a question is the `file_name` of its image_id in the questions
  file's own "images" list if it has one ({"id", "file_name"}, COCO style), else the file in --images whose name
  ends in the image_id's digits: COCO_val2014_000000000042.jpg (VQAv2's COCO 2014 images), 000000000042.jpg
  (COCO 2017), 42.png. Zero-shot prompt and settings of tasks.py (--prompt: another template with "{}" for the
  question). With --annotations the report has the VQA accuracy (metrics.vqa_accuracy, also per answer_type)
  and every answer; without, --out is the VQAv2 results file [{"question_id", "answer"}].
- retrieval (stage-1 model): the caption files above; each caption is a text, each image's captions its
  positives. ITC over all pairs, the top --k_test candidates (capped at the number there are) reranked by ITM
  (`RetrievalScorer`), R@1/5/10 both ways; the report gives each image's and text's rank and top candidates.

Input errors (a missing file, an annotation file of another format, a model of the wrong stage) stop the program
with one line, before the model is read where they can be seen that early. An image that cannot be decoded is
skipped with a warning naming it (its captions / questions with it) and counted in the report's `num_skipped`
and `skipped_images`; if none can be decoded, that is an error. Images are resized and normalised as in
`python -m blip2_jax.generate` (its `load_image`), decoded in threads one batch ahead, in fixed-size batches
(the last one padded) so there is one compiled program per task.

Retrieval scores (LAVIS `compute_sim_matrix`): sim = max over queries of the cosine of the projected query
outputs and the projected text [CLS] (no temperature); for each image its top-k texts (and for each text its
top-k images) get score = ITM positive logit + sim; everything outside the top-k ranks below.
"""
import concurrent.futures
import contextlib
import json
import logging
import os
import re

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from blip2_jax import cli
from blip2_jax import checkpointing
from blip2_jax import losses
from blip2_jax import partitioning
from blip2_jax.data import pipeline

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Retrieval scoring, shared by the workdir evaluator and --task=retrieval
# --------------------------------------------------------------------------------------------------------------

def positive_ranks(scores: np.ndarray, positives: list) -> np.ndarray:
  """scores: [N_query, N_candidate]; positives[i]: the correct candidate indices of query i. -> [N_query] ranks
  (0 = first), each the best rank among the query's correct candidates (COCO/Flickr protocol)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  ranks = np.empty(len(scores), np.int64)
  for i, pos in enumerate(positives):
    ranks[i] = np.where(np.isin(order[i], pos))[0].min()
  return ranks


def recall_at_k(scores: np.ndarray, positives: list, ks=(1, 5, 10)) -> dict:
  """R@k: the fraction of queries with a correct candidate among their first k (see positive_ranks)."""
  ranks = positive_ranks(scores, positives)
  return {k: float((ranks < k).mean()) for k in ks}


def retrieval_metrics(sims, i2t, t2i, img2txt: list, txt2img) -> dict:
  """R@1/5/10 both ways from the reranked scores, LAVIS's r_mean (their mean), and R@1 of ITC alone (what the
  ITM rerank adds)."""
  t2i_positives = [[int(j)] for j in txt2img]
  out = {f"img2txt_r{k}": v for k, v in recall_at_k(i2t, img2txt).items()}
  out.update({f"txt2img_r{k}": v for k, v in recall_at_k(t2i, t2i_positives).items()})
  out["r_mean"] = float(np.mean(list(out.values())))
  out["img2txt_r1_itc"] = recall_at_k(sims, img2txt, ks=(1,))[1]
  out["txt2img_r1_itc"] = recall_at_k(sims.T, t2i_positives, ks=(1,))[1]
  return out


def padded_batches(images: np.ndarray, batch_size: int):
  """(batch, number of real rows) in fixed-size batches, the last one padded with copies of its last image."""
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    yield np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)]), n


class RetrievalScorer:
  """LAVIS `compute_sim_matrix` for a Blip2Qformer module: the ITC similarity of every image with every text,
  then each query's top-k candidates reranked by ITM positive logit + similarity (-100 elsewhere).

  The image embeddings (the ViT output that ITM cross-attends to) stay on the device and the ITM program
  gathers its pairs' rows there: the rerank scores (N_img + N_txt) * k pairs, and copying each pair's
  embedding from the host (1.4 MB for ViT-g) would cost more than the ITM itself."""

  def __init__(self, module, batch_size: int, progress: bool = False):
    self.batch, self.progress = batch_size, progress

    def embed_images(params, images):
      image_embeds = module.apply({"params": params}, images, method="encode_image")
      q_out, _ = module.apply({"params": params}, image_embeds, method="query_features")
      return image_embeds, module.apply({"params": params}, q_out, method="image_feats")

    def embed_texts(params, ids, mask):
      cls = module.apply({"params": params}, ids, mask, method="text_features")
      return module.apply({"params": params}, cls, method="text_feat")

    def itm_scores(params, image_embeds, image_index, ids, mask):
      return module.apply({"params": params}, image_embeds[image_index], ids, mask, method="itm_logits")[:, 1]

    self._embed_images = jax.jit(embed_images)
    self._embed_texts = jax.jit(embed_texts)
    self._itm = jax.jit(itm_scores)

  def embed_images(self, params, batches) -> tuple[jax.Array, np.ndarray]:
    """batches: (images [batch_size, S, S, 3], number of real rows) pairs, e.g. `padded_batches`. -> the image
    embeddings of the real rows (on the device) and their ITC features [N_img, Q, D] (on the host)."""
    embeds, feats = [], []
    for images, n in batches:
      e, f = self._embed_images(params, images)
      embeds.append(e[:n])
      feats.append(np.asarray(jax.device_get(f))[:n])
    return jnp.concatenate(embeds), np.concatenate(feats)

  def _batched(self, fn, batch, *arrays, desc=None):
    """Applies fn to fixed-size chunks (one compile), padding the last one; concatenates the outputs."""
    n = len(arrays[0])
    outs = []
    starts = range(0, n, batch)
    if desc and self.progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
      chunk = [a[start:start + batch] for a in arrays]
      pad = batch - len(chunk[0])
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      out = jax.device_get(fn(*chunk))
      outs.append(jax.tree.map(lambda x: x[:len(x) - pad], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def scores(self, params, image_embeds, image_feats, text_ids, text_mask, k: int, itm_batch_size=None):
    """-> (sims [N_img, N_txt] ITC alone, i2t [N_img, N_txt] and t2i [N_txt, N_img] after the rerank). The ITM
    pairs go itm_batch_size at a time (default: the batch size)."""
    itm_batch = itm_batch_size or self.batch
    text_feats = self._batched(lambda i, m: self._embed_texts(params, i, m), self.batch, text_ids, text_mask)
    sims = np.asarray(losses.itc_similarities(jnp.asarray(image_feats), jnp.asarray(text_feats)))

    def rerank(sim_rows, k):
      """-> (query index, candidate index) pairs of each row's top-k, and a score matrix to fill."""
      k = min(k, sim_rows.shape[1])
      top = np.argsort(-sim_rows, axis=1, kind="stable")[:, :k]
      rows = np.repeat(np.arange(len(sim_rows)), k)
      return rows, top.reshape(-1), np.full(sim_rows.shape, -100.0, np.float32)

    # image -> text
    rows, cols, i2t = rerank(sims, k)
    itm = self._batched(lambda r, i, m: self._itm(params, image_embeds, r, i, m), itm_batch,
                        rows, text_ids[cols], text_mask[cols], desc="ITM image->text")
    i2t[rows, cols] = itm + sims[rows, cols]
    # text -> image
    rows, cols, t2i = rerank(sims.T, k)
    itm = self._batched(lambda c, i, m: self._itm(params, image_embeds, c, i, m), itm_batch,
                        cols, text_ids[rows], text_mask[rows], desc="ITM text->image")
    t2i[rows, cols] = itm + sims.T[rows, cols]
    return sims, i2t, t2i


class RetrievalEvaluator:
  """Embeds the eval split once per run() and computes image->text and text->image R@1/5/10."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup = config, setup
    self.data = pipeline.load_eval_set(config.data, tokenizer)
    self.scorer = RetrievalScorer(setup.model, config.eval.batch_size)
    self.i2t, self.shown = None, None  # the last run's image->text scores and its images, for picture()

  def run(self, params, max_images: int | None = None) -> dict:
    """R@1/5/10 both ways over the split, or over its first max_images images and their texts (a cheaper
    look during training)."""
    d, k = _first_images(self.data, max_images), self.config.eval.k_test
    image_embeds, image_feats = self.scorer.embed_images(params, padded_batches(d["images"], self.scorer.batch))
    sims, i2t, t2i = self.scorer.scores(params, image_embeds, image_feats, d["text_ids"], d["text_mask"], k)
    out = {f"eval/{name}": v for name, v in retrieval_metrics(sims, i2t, t2i, d["img2txt"], d["txt2img"]).items()}
    out["eval/num_images"], out["eval/num_texts"] = float(sims.shape[0]), float(sims.shape[1])
    self.i2t, self.shown = i2t, d
    return out

  def picture(self, n: int = 16):
    """The last run's first n images, each with its top retrieved caption, green if right, red if wrong."""
    from blip2_jax import examples  # pylint: disable=g-import-not-at-top
    d = self.shown
    return examples.grid(examples.to_uint8(d["images"][:n]),
                         examples.retrieval_texts(d["captions"], self.i2t, d["img2txt"], n))


def _first_images(data: dict, max_images: int | None) -> dict:
  """The eval set restricted to its first max_images images and the texts that belong to them."""
  if max_images is None or max_images >= len(data["images"]):
    return data
  texts = np.flatnonzero(data["txt2img"] < max_images)
  new_index = {int(t): i for i, t in enumerate(texts)}
  return {"images": data["images"][:max_images], "text_ids": data["text_ids"][texts],
          "text_mask": data["text_mask"][texts], "txt2img": data["txt2img"][texts],
          "img2txt": [[new_index[t] for t in data["img2txt"][i]] for i in range(max_images)],
          "captions": [data["captions"][t] for t in texts]}


def caption_metrics(predictions: dict, references: dict) -> dict:
  """Exact match (the caption equals one of its references after LAVIS's cleaning) and metrics.caption_scores
  (BLEU-1..4, CIDEr-D): image id -> caption, image id -> its reference captions."""
  from blip2_jax import metrics  # pylint: disable=g-import-not-at-top
  from blip2_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  clean = tokenizer_lib.clean_caption
  exact = np.mean([clean(p) in {clean(r) for r in references[i]} for i, p in predictions.items()])
  return {"exact_match": float(exact), **metrics.caption_scores(predictions, references)}


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
    from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
    e = self.config.eval
    d = _first_images(self.data, max_images)
    preds = []
    for batch, n in padded_batches(d["images"], e.batch_size):  # one compiled program for every batch
      preds += tasks.generate_text(self.setup.model, params, self.tokenizer, batch, e.prompt,
                                   max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
                                   num_beams=e.num_beams, length_penalty=e.length_penalty)[:n]
    self.predictions, self.shown = preds, d
    refs = {i: [d["captions"][t] for t in texts] for i, texts in enumerate(d["img2txt"])}
    scores = caption_metrics(dict(enumerate(preds)), refs)
    return {"eval/exact_match": scores["exact_match"], "eval/bleu4": scores["bleu4"], "eval/cider": scores["cider"],
            "eval/num_images": float(len(preds))}

  def picture(self, n: int = 16):
    """The last run's first n images: the generated caption (green if it is a reference) over a reference."""
    from blip2_jax import examples  # pylint: disable=g-import-not-at-top
    d = self.shown
    refs = [[d["captions"][t] for t in texts] for texts in d["img2txt"]]
    return examples.grid(examples.to_uint8(d["images"][:n]), examples.caption_texts(self.predictions, refs, n))


def make_evaluator(config, setup, tokenizer):
  """Retrieval for stage 1, captioning for stage 2."""
  from blip2_jax import train  # pylint: disable=g-import-not-at-top
  cls = CaptionEvaluator if train.is_stage2(config) else RetrievalEvaluator
  return cls(config, setup, tokenizer)


def evaluate_workdir(config, workdir: str) -> dict:
  from blip2_jax import train  # pylint: disable=g-import-not-at-top
  config = train.resolve_demo_llm(config, workdir)
  tokenizer = train.load_tokenizer(config)
  setup = train.build(config, tokenizer)
  mngr = checkpointing.manager(workdir, config.keep_checkpoints)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint under {os.path.join(workdir, 'checkpoints')}: train first with "
                            f"python -m blip2_jax.train --config=... --workdir={workdir}.")
  state, frozen, _ = train.restore_or_init(config, setup, mngr)
  step = int(jax.device_get(state["step"]))
  evaluator = make_evaluator(config, setup, tokenizer)
  metrics = evaluator.run(partitioning.merge(state["params"], frozen))
  if jax.process_index() == 0:
    report = {"step": step, **metrics}
    if isinstance(evaluator, CaptionEvaluator):
      report["captions"] = [{"image": i, "prediction": p, "references": [evaluator.data["captions"][t] for t in ts]}
                            for i, (p, ts) in enumerate(zip(evaluator.predictions, evaluator.data["img2txt"]))]
    with open(os.path.join(workdir, f"eval_step_{step}.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return {"step": step, **metrics}


# --------------------------------------------------------------------------------------------------------------
# Any model on annotation files and an image folder (--model, --task)
# --------------------------------------------------------------------------------------------------------------

TASKS = ("caption", "vqa", "retrieval")
CAPTIONS_FORMAT = ('a COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id", '
                   '"caption"}]}) or a Karpathy-style list ([{"image", "caption": [...]}])')
QUESTIONS_FORMAT = 'a VQAv2 questions file ({"questions": [{"question_id", "image_id", "question"}]})'
ANSWERS_FORMAT = 'a VQAv2 annotations file ({"annotations": [{"question_id", "answers": [{"answer"}, ...]}]})'
MAX_TEXT_LEN = 35  # LAVIS compute_sim_matrix tokenizes the retrieval texts to 35 tokens
NUM_TOP = 10  # candidates listed per query in the retrieval report (R@10 needs the first 10)


def _read_json(path: str, expected: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (expected {expected}).")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e}); expected {expected}.") from None


@contextlib.contextmanager
def _reading(path: str, expected: str):
  """What a file of another layout trips over (a missing key, a list for a dict) -> one sentence naming the file."""
  try:
    yield
  except KeyError as e:
    raise ValueError(f"{path} is not {expected}: it has no key {e} where one is expected.") from None
  except (TypeError, AttributeError) as e:
    raise ValueError(f"{path} is not {expected} ({type(e).__name__}: {e}).") from None


def _check_images_dir(images_dir: str):
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"Image folder {images_dir} does not exist.")


def _check_image_files(samples: list[dict], annotations: str):
  for s in samples:
    if not os.path.isfile(s["path"]):
      raise FileNotFoundError(f"Image {s['path']} (named in {annotations}) does not exist: check --images.")


def load_captions(path: str, images_dir: str, limit: int | None = None) -> list[dict]:
  """A COCO captions file or a Karpathy-style list -> one sample per image that has captions, in file order (the
  first `limit`): {"image": its file name as written, "path", "captions", and for COCO files "image_id"}. Each
  image file must exist (a missing one is an error: most likely --images is the wrong folder)."""
  _check_images_dir(images_dir)
  data = _read_json(path, CAPTIONS_FORMAT)
  samples = {}  # image key -> sample, in file order
  with _reading(path, CAPTIONS_FORMAT):
    if isinstance(data, dict):
      images, captions = data["images"], {}
      for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
      for image in images:
        if image["id"] in captions:
          samples[image["id"]] = {"image": image["file_name"], "image_id": image["id"],
                                  "captions": captions[image["id"]]}
      unknown = [i for i in captions if i not in samples]
      if unknown:
        raise ValueError(f"{path} has captions of image_id {unknown[0]}, which its `images` list does not have.")
    elif isinstance(data, list):
      for entry in data:  # a test file has a list of captions per image, a train file one entry per caption
        caption = entry["caption"]
        sample = samples.setdefault(entry["image"], {"image": entry["image"], "captions": []})
        sample["captions"] += [caption] if isinstance(caption, str) else list(caption)
    else:
      raise TypeError(f"its top level is a {type(data).__name__}")
    samples = list(samples.values())[:limit]
    for s in samples:
      if not all(isinstance(c, str) for c in s["captions"]):
        raise TypeError(f"a caption of {s['image']} is not a string")
      s["path"] = os.path.join(images_dir, s["image"])
  if not samples:
    raise ValueError(f"{path} has no image with a caption.")
  _check_image_files(samples, path)
  return samples


def load_vqa(questions_path: str, annotations_path: str | None, images_dir: str,
             limit: int | None = None) -> list[dict]:
  """VQAv2 files -> one sample per question, in the questions file's order (the first `limit`): {"question_id",
  "image_id", "question", "image" (file name), "path"}, plus "answers" (the human answers) and "answer_type" from
  the annotations file if given. Images: see the module docstring."""
  _check_images_dir(images_dir)
  data = _read_json(questions_path, QUESTIONS_FORMAT)
  with _reading(questions_path, QUESTIONS_FORMAT):
    questions = [{"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
                 for q in data["questions"]][:limit]
    file_names = {image["id"]: image["file_name"] for image in data.get("images", [])}
    for q in questions:
      if not isinstance(q["question"], str) or not q["question"].strip():
        raise ValueError(f"{questions_path}: question {q['question_id']} is empty or not a string.")
  if not questions:
    raise ValueError(f"{questions_path} has no questions.")
  names = file_names or _files_by_image_id(images_dir, {q["image_id"] for q in questions})
  with _reading(questions_path, QUESTIONS_FORMAT):
    for q in questions:
      if q["image_id"] not in names:
        raise ValueError(f"{questions_path}'s images list has no file_name for image_id {q['image_id']}.")
      q["image"] = names[q["image_id"]]
      q["path"] = os.path.join(images_dir, q["image"])
  _check_image_files(questions, questions_path)
  if annotations_path:
    data = _read_json(annotations_path, ANSWERS_FORMAT)
    with _reading(annotations_path, ANSWERS_FORMAT):
      by_id = {a["question_id"]: a for a in data["annotations"]}
      for q in questions:
        if q["question_id"] not in by_id:
          raise ValueError(f"{annotations_path} has no annotation for question {q['question_id']} of "
                           f"{questions_path}: are they files of the same split?")
        a = by_id[q["question_id"]]
        q["answers"] = [h["answer"] for h in a["answers"]]
        if "answer_type" in a:
          q["answer_type"] = a["answer_type"]
  return questions


def _files_by_image_id(images_dir: str, image_ids: set) -> dict:
  """image_id -> the one image file of images_dir whose name (without suffix) ends in the id's digits."""
  from blip2_jax.generate import IMAGE_SUFFIXES  # pylint: disable=g-import-not-at-top
  found = {}
  for name in os.listdir(images_dir):
    digits = re.search(r"(\d+)$", os.path.splitext(name)[0])
    if name.lower().endswith(IMAGE_SUFFIXES) and digits and int(digits[1]) in image_ids:
      found.setdefault(int(digits[1]), []).append(name)
  for image_id in sorted(image_ids, key=str):
    if image_id not in found:
      padded = f"{image_id:012d}" if isinstance(image_id, int) else image_id
      raise FileNotFoundError(f"No image for image_id {image_id} in {images_dir}: expected a file whose name ends in "
                              f"its number, e.g. COCO_val2014_{padded}.jpg or {padded}.jpg.")
    if len(found[image_id]) > 1:
      raise ValueError(f"Several images in {images_dir} end in image_id {image_id}: "
                       f"{', '.join(sorted(found[image_id]))}; keep one split per folder.")
  return {image_id: names[0] for image_id, names in found.items()}


def _image_batches(paths: list[str], size: int, batch_size: int, unit: str = "img"):
  """Yields (positions, batch) with a progress bar: the images at `paths`, `batch_size` paths at a time,
  preprocessed by generate.load_image in threads one batch ahead; batch [batch_size, size, size, 3] holds those
  that decoded (positions: their indices in `paths`), padded with copies of the last one so that every batch
  has one shape. An image that cannot be decoded is logged, naming it, and left out; if none can be, that is an
  error. Equal paths in one batch (questions about one image) are decoded once."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from blip2_jax import generate  # pylint: disable=g-import-not-at-top

  def load(path):
    try:
      return generate.load_image(path, size)
    except ValueError as e:
      return e

  chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
  warned = set()
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
       tqdm(total=len(paths), unit=unit) as bar:
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
        arrays = [decoded[paths[i]] for i in positions]
        yield positions, np.stack(arrays + [arrays[-1]] * (batch_size - len(arrays)))
      bar.update(len(chunk))
  if warned and len(warned) == len(set(paths)):
    raise ValueError(f"None of the {len(warned)} images could be decoded (see the warnings).")


def _check_task(task: str, kind: str, model_name: str = "this model"):
  """kind: 'retrieval' (stage 1) or anything else (a stage-2 LLM kind)."""
  if task == "retrieval" and kind != "retrieval":
    raise ValueError(f"--task=retrieval needs a stage-1 model (a Hugging Face Blip2ForImageTextRetrieval directory "
                     f"or a stage-1 workdir); {model_name} is a stage-2 captioning/VQA model.")
  if task != "retrieval" and kind == "retrieval":
    raise ValueError(f"--task={task} needs a stage-2 model (a Hugging Face Blip2ForConditionalGeneration directory "
                     f"or a stage-2 workdir); {model_name} is a stage-1 retrieval model.")


def _peek_model_kind(path: str) -> str | None:
  """'retrieval' or 'llm' from a model's config.json alone (nothing loaded), so a model of the wrong stage is
  refused before its weights are read; None where that does not tell (Blip2.load then says what is wrong)."""
  from blip2_jax import pretrained, train  # pylint: disable=g-import-not-at-top
  try:
    if os.path.isdir(os.path.join(path, "checkpoints")):  # as Blip2.load tells a workdir
      return "llm" if train.is_stage2(pretrained.load_workdir_config(path)) else "retrieval"
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      architecture = (json.load(f).get("architectures") or [None])[0]
  except (OSError, ValueError, AttributeError):
    return None
  return {"Blip2ForImageTextRetrieval": "retrieval", "Blip2ForConditionalGeneration": "llm"}.get(architecture)


def _image_fields(sample: dict) -> dict:
  return {k: sample[k] for k in ("image_id", "image") if k in sample}


def _skipped(samples: list[dict], done) -> list[str]:
  """The images of the samples not in `done` (could not be decoded), once each."""
  return list(dict.fromkeys(s["image"] for i, s in enumerate(samples) if i not in done))


def evaluate_captions(model, samples: list[dict], *, batch_size: int = 16, prompt: str | None = None,
                      **settings) -> dict:
  """Captions the images of `samples` (load_captions) with model.caption, the paper's settings unless overridden
  (prompt, num_beams, max_new_tokens, min_new_tokens, ...), and scores them against their captions
  (caption_metrics). -> the report: settings, metrics, counts, skipped images and every caption."""
  from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
  _check_task("caption", model.kind)
  if prompt is not None:
    settings["prompt"] = prompt
  predictions = {}
  for positions, batch in _image_batches([s["path"] for s in samples], model.cfg.vit.image_size, batch_size):
    predictions.update(zip(positions, model.caption(batch, **settings)))
  skipped = _skipped(samples, predictions)
  return {
      "task": "caption",
      "settings": {"prompt": tasks.CAPTION_PROMPT, **tasks.CAPTION_SETTINGS, **settings},
      "metrics": caption_metrics(predictions, {i: samples[i]["captions"] for i in predictions}),
      "num_images": len(predictions), "num_skipped": len(skipped), "skipped_images": skipped,
      "predictions": [{**_image_fields(samples[i]), "prediction": p, "references": samples[i]["captions"]}
                      for i, p in sorted(predictions.items())],
  }


def _check_vqa_prompt(prompt: str | None):
  if prompt is not None and prompt.count("{}") != 1:
    raise ValueError(f"A VQA prompt is a template with one {{}} for the question, e.g. 'Question: {{}} Short "
                     f"answer:'; got {prompt!r}.")


def evaluate_vqa(model, questions: list[dict], *, batch_size: int = 16, prompt: str | None = None,
                 **settings) -> dict:
  """Answers `questions` (load_vqa) zero-shot: model.answer (the paper's prompt and settings), or `prompt`, a
  template with "{}" for the question, with the same settings; either overridable (num_beams, ...). Questions
  about one image are batched together so it is decoded once. -> the report: settings, counts, skipped images,
  every answer, and where the questions have human answers the VQA accuracy (metrics.vqa_accuracy, in percent;
  also per answer_type) with each question's score."""
  from blip2_jax import metrics, tasks  # pylint: disable=g-import-not-at-top
  _check_task("vqa", model.kind)
  _check_vqa_prompt(prompt)
  order = sorted(range(len(questions)), key=lambda i: questions[i]["path"])  # stable: file order per image
  answers = {}
  for positions, batch in _image_batches([questions[i]["path"] for i in order], model.cfg.vit.image_size,
                                         batch_size, unit="question"):
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
      "settings": {"prompt": prompt or tasks.VQA_PROMPTS[model.kind], **tasks.VQA_SETTINGS, **settings},
      "num_questions": len(answers), "num_skipped_questions": len(questions) - len(answers),
      "num_skipped": len(skipped), "skipped_images": skipped,
      "predictions": [{k: questions[i][k] for k in ("question_id", "image_id", "question")} | {"prediction": a}
                      for i, a in sorted(answers.items())],
  }
  if all("answers" in q for q in questions):
    scored = metrics.vqa_accuracy({questions[i]["question_id"]: a for i, a in answers.items()},
                                  {questions[i]["question_id"]: questions[i]["answers"] for i in answers})
    by_type = {}
    for row, i in zip(report["predictions"], sorted(answers)):
      row["answers"] = questions[i]["answers"]
      row["accuracy"] = scored["per_question"][row["question_id"]]
      if "answer_type" in questions[i]:
        by_type.setdefault(questions[i]["answer_type"], []).append(row["accuracy"])
    report["metrics"] = {"accuracy": scored["accuracy"],
                         **({"accuracy_by_answer_type": {t: 100.0 * float(np.mean(v)) for t, v in by_type.items()}}
                            if by_type else {})}
  return report


def evaluate_retrieval(model, samples: list[dict], *, batch_size: int = 16, k_test: int = 128) -> dict:
  """Image-text retrieval over the images of `samples` (load_captions) and all their captions: RetrievalScorer
  with the top `k_test` ITC candidates reranked by ITM (capped at the number of candidates; the ITM pairs go
  min(k_test, N_texts) at a time, LAVIS's k per image), then retrieval_metrics. Captions are cleaned as in
  training and cut to MAX_TEXT_LEN tokens. -> the report: metrics, counts, skipped images, and for each image
  and each text its positives' best rank (0 = first) and its first NUM_TOP candidates; texts and images are
  named by their index in the report's "texts" and "images" lists."""
  from blip2_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  _check_task("retrieval", model.kind)
  if model.tokenizer is None:
    raise ValueError("This retrieval model has no tokenizer: put the Q-Former's BERT tokenizer files (vocab.txt, "
                     "tokenizer_config.json) beside its weights.")
  scorer = RetrievalScorer(model.module, batch_size, progress=True)
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
  ids, mask = tokenizer_lib.tokenize(model.tokenizer, [tokenizer_lib.clean_caption(t) for t in texts],
                                     min(MAX_TEXT_LEN, model.cfg.qformer.max_position_embeddings))
  sims, i2t, t2i = scorer.scores(model.params, image_embeds, image_feats, ids, mask, k_test,
                                 itm_batch_size=min(k_test, len(texts)))
  t2i_positives = [[j] for j in txt2img]
  i2t_ranks, t2i_ranks = positive_ranks(i2t, img2txt), positive_ranks(t2i, t2i_positives)
  i2t_top = np.argsort(-i2t, axis=1, kind="stable")[:, :NUM_TOP]
  t2i_top = np.argsort(-t2i, axis=1, kind="stable")[:, :NUM_TOP]
  return {
      "task": "retrieval", "k_test": k_test,
      "metrics": retrieval_metrics(sims, i2t, t2i, img2txt, txt2img),
      "num_images": len(kept), "num_texts": len(texts), "num_skipped": len(skipped), "skipped_images": skipped,
      "images": [{**_image_fields(samples[j]), "texts": img2txt[i], "rank": int(i2t_ranks[i]),
                  "top": i2t_top[i].tolist()} for i, j in enumerate(kept)],
      "texts": [{"text": t, "image": txt2img[i], "rank": int(t2i_ranks[i]), "top": t2i_top[i].tolist()}
                for i, t in enumerate(texts)],
  }


# Flags of --model mode that only some tasks read.
_TASK_FLAGS = {"caption": {"prompt", "num_beams", "max_new_tokens", "min_new_tokens"},
               "vqa": {"questions", "prompt", "num_beams", "max_new_tokens", "min_new_tokens"},
               "retrieval": {"k_test"}}


def evaluate_files() -> dict:
  """--model mode: checks the flags and the input files, loads the model, evaluates, writes --out."""
  from blip2_jax.pretrained import Blip2  # pylint: disable=g-import-not-at-top
  task = FLAGS.task
  if FLAGS["config"].present or FLAGS.workdir:
    raise app.UsageError("Give --model (annotation files) or --config with --workdir (a workdir's eval split).")
  if task is None:
    raise app.UsageError(f"--model needs --task ({', '.join(TASKS)}).")
  needed = ["questions" if task == "vqa" else "annotations", "images", "out"]
  missing = [f"--{name}" for name in needed if not FLAGS[name].value]
  if missing:
    raise app.UsageError(f"--task={task} needs {', '.join(missing)}.")
  for name in set().union(*_TASK_FLAGS.values()) - _TASK_FLAGS[task]:
    if FLAGS[name].present:
      raise app.UsageError(f"--{name} does not apply to --task={task}.")
  if FLAGS.batch_size < 1 or (FLAGS.limit is not None and FLAGS.limit < 1) or FLAGS.k_test < 1:
    raise app.UsageError("--batch_size, --limit and --k_test must be at least 1.")

  # Input errors first, before the model is read.
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"The folder {out_dir} of --out does not exist.")
  if task == "vqa":
    _check_vqa_prompt(FLAGS.prompt)
    samples = load_vqa(FLAGS.questions, FLAGS.annotations, FLAGS.images, FLAGS.limit)
  else:
    samples = load_captions(FLAGS.annotations, FLAGS.images, FLAGS.limit)
  settings = {name: FLAGS[name].value for name in ("num_beams", "max_new_tokens", "min_new_tokens")
              if FLAGS[name].value is not None}
  if task != "retrieval":
    from blip2_jax import tasks  # pylint: disable=g-import-not-at-top
    merged = {**(tasks.CAPTION_SETTINGS if task == "caption" else tasks.VQA_SETTINGS), **settings}
    if merged["min_new_tokens"] > merged["max_new_tokens"]:
      raise ValueError(f"min_new_tokens={merged['min_new_tokens']} exceeds max_new_tokens="
                       f"{merged['max_new_tokens']}: give a smaller --min_new_tokens too.")
  kind = _peek_model_kind(FLAGS.model)
  if kind is not None:
    _check_task(task, kind, FLAGS.model)

  model = Blip2.load(FLAGS.model, dtype=FLAGS.dtype)
  _check_task(task, model.kind, FLAGS.model)
  if task == "caption":
    report = evaluate_captions(model, samples, batch_size=FLAGS.batch_size, prompt=FLAGS.prompt, **settings)
  elif task == "vqa":
    report = evaluate_vqa(model, samples, batch_size=FLAGS.batch_size, prompt=FLAGS.prompt, **settings)
  else:
    report = evaluate_retrieval(model, samples, batch_size=FLAGS.batch_size, k_test=FLAGS.k_test)
  inputs = {"model": FLAGS.model, "questions": FLAGS.questions, "annotations": FLAGS.annotations,
            "image_dir": FLAGS.images}
  report = {**{k: v for k, v in inputs.items() if v is not None}, **report}
  if task == "vqa" and not FLAGS.annotations:  # the VQAv2 results format, for the evaluation server
    written = [{"question_id": p["question_id"], "answer": p["prediction"]} for p in report["predictions"]]
  else:
    written = report
  with open(FLAGS.out, "w", encoding="utf-8") as f:
    json.dump(written, f, indent=2)
  return report


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty at INFO
  logging.getLogger("blip2_jax").setLevel(logging.INFO)
  if FLAGS.model is None and (FLAGS.workdir is None or FLAGS.config is None):
    raise app.UsageError("Give --model (with --task and annotation files) or --config with --workdir.")
  try:
    if FLAGS.model is not None:
      report = evaluate_files()
      count = report.get("num_questions", report.get("num_images"))
      if "metrics" in report:
        print(json.dumps(report["metrics"], indent=2))
      print(f"wrote {FLAGS.out} ({count} {'questions' if FLAGS.task == 'vqa' else 'images'}"
            + (f", {report['num_skipped']} unreadable images skipped)" if report["num_skipped"] else ")"))
      return
    print(json.dumps(evaluate_workdir(FLAGS.config, FLAGS.workdir), indent=2))
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  # Flags are defined only when run as a program, so train/evaluate/benchmark can import each other.
  config_flags.DEFINE_config_file("config", None, "Config the workdir was trained with.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir whose latest checkpoint is evaluated.")
  flags.DEFINE_string("model", None, "HF BLIP-2 directory or blip2_jax workdir to evaluate on annotation files.")
  flags.DEFINE_enum("task", None, TASKS, "What --model is evaluated on.")
  flags.DEFINE_string("annotations", None, "caption/retrieval: COCO captions JSON or Karpathy-style list; vqa: "
                      "VQAv2 annotations JSON (optional: without it, --out is the VQAv2 results file).")
  flags.DEFINE_string("questions", None, "vqa: VQAv2 questions JSON.")
  flags.DEFINE_string("images", None, "Folder of the images the annotations name.")
  flags.DEFINE_string("out", None, "JSON report to write.")
  flags.DEFINE_integer("batch_size", 16, "Images (vqa: questions) per batch.")
  flags.DEFINE_integer("limit", None, "Only the first N images (vqa: questions) of the files.")
  flags.DEFINE_string("prompt", None, "caption: the prompt (default 'a photo of'); vqa: a template with {} for "
                      "the question (default: the paper's).")
  flags.DEFINE_integer("num_beams", None, "Beams (default: the task's, 5).")
  flags.DEFINE_integer("max_new_tokens", None, "At most this many new tokens (default: the task's).")
  flags.DEFINE_integer("min_new_tokens", None, "At least this many new tokens (default: the task's).")
  flags.DEFINE_integer("k_test", 128, "retrieval: ITC candidates per query reranked by ITM.")
  flags.DEFINE_string("dtype", "float32", "dtype of the frozen ViT and LLM (bfloat16 halves their memory).")
  app.run(main, flags_parser=cli.parse_flags)
