"""Image-text input pipeline: TFDS array_record files read with grain, preprocessed with numpy and PIL.

No TensorFlow anywhere: TFDS only writes and indexes the files, grain shuffles, shards and prefetches, and
images are decoded here with PIL, so a corrupt image is caught, counted and skipped instead of killing a run.

Training reads either `data.name`'s train split or, when any of `data.sources` has a path, a weighted mixture of
prepared folders (data/prepared.py, written by `python -m blip2_jax.data.prepare`). A record may hold several
captions (a web caption and CapFilt's synthetic ones); each step draws one of them.

The `data` ConfigDict fields read here: name, data_dir, builder_kwargs, train_split, eval_split, image_size,
crop_scale, flip, max_text_len, num_threads, prefetch, eval_max_examples, and, with defaults for older configs,
sources ({} = none), clean_captions (True), max_caption_words (50), fast_decode (True), max_pixels
(images.MAX_PIXELS), image_ids (False: retrieval fine-tuning's `image_id` batch field), captions_per_image (1),
task ("caption"; "vqa": stage-2 VQA fine-tuning, below) and max_question_len (max_text_len).

VQA (data.task "vqa", stage 2): examples {'image', 'question', 'answers' (VQAv2: 10 human answers), 'question_type',
'image_id', 'question_id'}, e.g. synthetic_vqa. Each step trains on (image, question, one answer), the answer drawn
from the example's answers uniformly, i.e. each distinct answer with probability count / number of answers: the
expected loss is then the answer-weighted loss of BLIP and LAVIS (LAVIS's VQA datasets give each distinct answer
the weight count / len(answers), and BLIP's VQA loss sums the answers' losses times those weights). The LLM text is
the family's VQA prompt with the question, then the answer (`tokenize_vqa_batch`); a question-conditioned model
(model.qformer_text_input) also gets the question alone in the Q-Former's tokenizer, qformer_ids / qformer_mask.

Instruction tuning (data.task "instruct", InstructBLIP): data.tasks names several datasets, each a caption or a VQA
task with its instruction templates and a sampling weight (instruct_tasks). Each example draws one of its task's
templates; the LLM reads the instruction, then the answer (the caption, or a drawn human answer), the loss on the
answer; the Q-Former reads the whole instruction.
"""

import collections
import logging
import math
import re
import threading
import zlib

import grain
import numpy as np
import tensorflow_datasets as tfds

from blip2_jax.data import images as images_lib
from blip2_jax.data import prepared as prepared_lib
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.data.coco_captions import CocoCaptions
from blip2_jax.data.synthetic_shapes import SyntheticShapes
from blip2_jax.data.synthetic_vqa import SyntheticVqa
from blip2_jax.models import llms

# Builders that ship with the package prepare their own data on first use (generate it, or convert local
# COCO files); any other name must already be prepared under data_dir.
SHIPPED_BUILDERS = {"synthetic_shapes": SyntheticShapes, "synthetic_vqa": SyntheticVqa, "coco_captions": CocoCaptions}


# ----------------------------------------------------------------------------------------------- source


def get_source(data_cfg, split: str):
  """A random-access source of raw examples of `split`: {'image': encoded bytes, 'caption', ...}."""
  kwargs = dict(data_cfg.builder_kwargs or {})
  if data_cfg.name in SHIPPED_BUILDERS:
    builder = SHIPPED_BUILDERS[data_cfg.name](data_dir=data_cfg.data_dir, file_format="array_record", **kwargs)
    builder.download_and_prepare()  # a no-op once the files exist
  else:
    try:
      builder = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir, **kwargs)
      prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
      prepared = False
    if not prepared:
      raise FileNotFoundError(
        f"No prepared TFDS dataset {data_cfg.name!r} (split {split!r}) under data_dir "
        f"{data_cfg.data_dir or tfds.core.constants.DATA_DIR!r}: prepare it there first in array_record "
        f"format, e.g. `tfds build {data_cfg.name} --data_dir=... --file_format=array_record`."
      )
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"Dataset {data_cfg.name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  # Skip TFDS's image decoding (it would need TensorFlow); we decode with PIL and can catch bad images.
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


# ------------------------------------------------------------------------------------------ mixtures


def train_sources(data_cfg) -> list[tuple[str, object, float]]:
  """(name, source, weight) of each training source: the prepared folders of data.sources that have a path, or,
  if none has, data.name's train split (weight 1).

  A source's weight is its sampling proportion; -1 means "by size" (its number of records), which mixes like
  LAVIS's concatenated datasets, each image once per pass; weight 0 leaves the source out."""
  sources = []
  for name in sorted(data_cfg.get("sources") or {}):
    spec = data_cfg.sources[name]
    if not spec.get("path") or spec.get("weight", -1) == 0:
      continue
    source = prepared_lib.PreparedSource(spec.path)
    if not len(source):
      raise ValueError(f"config.data.sources.{name}: the prepared dataset {spec.path} has no records.")
    weight = spec.get("weight", -1)
    if weight != -1 and not weight > 0:
      raise ValueError(f"config.data.sources.{name}.weight={weight}: use a positive weight, -1 (by size) or 0 (off).")
    sources.append((name, source, float(len(source) if weight == -1 else weight)))
  if not sources:
    sources.append((data_cfg.name, get_source(data_cfg, data_cfg.train_split), 1.0))
  return sources


# ------------------------------------------------------------------------------------------ bad samples

_skipped = collections.Counter()  # reason -> examples dropped by this process (an epoch's repeats count again)
_warned = set()  # (source, index) already logged: a bad example comes back every epoch
_skipped_lock = threading.Lock()  # grain decodes in several threads


def skipped_counts() -> dict[str, int]:
  """How many examples this process has dropped, per reason (images.SKIP_REASONS), all reasons present."""
  with _skipped_lock:
    return {reason: _skipped[reason] for reason in images_lib.SKIP_REASONS}


def num_skipped_images() -> int:
  """How many examples this process has dropped for any reason."""
  return sum(skipped_counts().values())


def _skip(reason: str, where: tuple, detail: str):
  with _skipped_lock:
    _skipped[reason] += 1
    first_time = where not in _warned
    _warned.add(where)
  if first_time:
    logging.warning("Skipping example %d of %s (%s): %s.", where[1], where[0], reason, detail)


def _decode(example: dict, index: int) -> dict:
  """Eval: the image bytes decoded to an upright RGB PIL image, or None (counted, logged) if it is broken."""
  try:
    image = images_lib.decode(example["image"])
  except images_lib.BadImage as e:
    _skip(e.reason, ("the eval split", index), str(e))
    image = None
  caption = example["caption"]
  out = {"image": image, "caption": caption.decode("utf-8") if isinstance(caption, bytes) else caption}
  if "image_id" in example:
    out["image_id"] = int(example["image_id"])
  return out


def _has_image_bytes(example: dict) -> bool:
  """Drops (and counts) an example with a zero-size image before any work is spent on it."""
  if example["image"]:
    return True
  _skip("zero_size", example["_where"], "the image has 0 bytes")
  return False


def _captions(example: dict) -> list[str]:
  """The captions of a raw example: a prepared record's list, or a TFDS example's one caption."""
  if "captions" in example:
    captions = example["captions"]
  else:
    captions = [example["caption"]]
  return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]


def clean(data_cfg, caption: str) -> str:
  """BLIP-2's caption cleaning (tokenizer.clean_caption) unless data.clean_captions is False."""
  if not data_cfg.get("clean_captions", True):
    return " ".join(caption.split())
  return tokenizer_lib.clean_caption(caption, data_cfg.get("max_caption_words", 50))


# -------------------------------------------------------------------------------------- preprocessing


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
  return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def _train_image(example: dict, rng: np.random.Generator, data_cfg) -> np.ndarray | None:
  """The RandomResizedCrop uint8 image of a training example, or None (counted by reason, logged once)."""
  try:
    return images_lib.random_crop(
      example["image"],
      data_cfg.image_size,
      data_cfg.crop_scale,
      rng,
      fast=data_cfg.get("fast_decode", True),
      max_pixels=data_cfg.get("max_pixels", images_lib.MAX_PIXELS),
    )
  except images_lib.BadImage as e:
    _skip(e.reason, example["_where"], str(e))
    return None


def train_preprocess(example: dict, rng: np.random.Generator, data_cfg, kind: str = llms.RETRIEVAL) -> dict | None:
  """An augmented training example of the model `kind` (models/llms.py): the RandomResizedCrop uint8 image
  (the model normalises it on the accelerator) and one cleaned caption of the example's list, which an
  encoder-decoder LLM's prefix-LM splits into a prefix and a suffix. None (counted by reason, logged once) for an
  example whose image is broken or that has no caption left after cleaning."""
  where = example["_where"]
  image = _train_image(example, rng, data_cfg)
  if image is None:
    return None
  captions = [c for c in (clean(data_cfg, c) for c in _captions(example)) if c]
  if not captions:
    _skip("missing_caption", where, "no caption left after cleaning")
    return None
  if data_cfg.flip and rng.random() < 0.5:
    # A flip turns "on the left" into "on the right". LAVIS flips and leaves the caption wrong; we swap
    # the words instead, so the caption stays true (skipping the flip would lose the augmentation).
    image = image[:, ::-1]
    captions = [swap_left_right(c) for c in captions]
  # One caption per image per step (BLIP-2 samples one of an image's kept captions each time it is seen);
  # drawn only when there is a choice, so one-caption data keeps its random stream.
  if "_visit" in example:  # data.captions_per_image: the k-th visit of an image in an epoch reads its k-th caption
    caption = captions[example["_visit"] % len(captions)]
  else:
    caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
  out = {"image": image, "caption": caption}  # a flipped view: the batching copies it anyway
  if data_cfg.get("image_ids", False):
    out["image_id"] = example["_image_id"]
  if kind != llms.RETRIEVAL and llms.family(kind).encoder_decoder:
    if data_cfg.get("prompt_fraction", 0.0) and rng.random() < data_cfg.prompt_fraction:
      out["prefix"], out["suffix"] = data_cfg.prompt, caption  # the captioning format: prompt -> caption
    else:
      out["prefix"], out["suffix"] = split_prefix_lm(caption, rng)
  return out


def split_prefix_lm(caption: str, rng: np.random.Generator) -> tuple[str, str]:
  """BLIP-2's prefix-LM for FlanT5: the caption cut at a random word boundary into an encoder prefix and a
  decoder suffix of at least one word (the prefix may be empty)."""
  words = caption.split()
  cut = int(rng.integers(0, max(len(words), 1)))
  return " ".join(words[:cut]), " ".join(words[cut:])


# ------------------------------------------------------------------------------------------------ VQA

TASKS = ("caption", "vqa", "instruct")
_QUESTION_STRIPPED = re.compile(r'[.!"()*#:;~]')  # what LAVIS's question processor removes ("?" stays)


def task(data_cfg, kind: str) -> str:
  """data.task: "caption" (the default: image-text pairs), "vqa" (question-answer pairs) or "instruct" (a mixture of
  caption and VQA tasks under instruction templates, data.tasks); the last two are for stage-2 models only."""
  name = data_cfg.get("task", "caption")
  if name not in TASKS:
    raise ValueError(f"config.data.task={name!r}: choose one of {', '.join(TASKS)}.")
  if name != "caption" and kind == llms.RETRIEVAL:
    raise ValueError(f"config.data.task={name!r} is for stage-2 (LLM) models; a stage-1 model trains on captions.")
  return name


def vqa_template(prompt: str, kind: str, where: str = "config.data.prompt") -> str:
  """The VQA prompt template: `prompt`, or with "" the LLM family's (the paper's "Question: {} Answer:" for OPT,
  "Question: {} Short answer:" for T5); it must hold one "{}", where the question goes."""
  default = llms.family(kind).vqa_prompt
  template = prompt or default
  if template.count("{}") != 1:
    raise ValueError(
      f"{where}={prompt!r}: a VQA prompt is a template with one {{}} for the question, e.g. {default!r} "
      "(or '' for that, the LLM family's)."
    )
  return template


def max_question_len(data_cfg) -> int:
  """The Q-Former's question length (qformer_ids), data.max_question_len, by default data.max_text_len."""
  return data_cfg.get("max_question_len") or data_cfg.max_text_len


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def clean_question(data_cfg, question: str) -> str:
  """LAVIS's question processor (BlipQuestionProcessor): lower case, [.!"()*#:;~] removed ("?" kept), at most
  data.max_caption_words words; with data.clean_captions False only the whitespace is collapsed."""
  if not data_cfg.get("clean_captions", True):
    return " ".join(question.split())
  return " ".join(_QUESTION_STRIPPED.sub("", question.lower()).split()[: data_cfg.get("max_caption_words", 50)])


def vqa_train_preprocess(example: dict, rng: np.random.Generator, data_cfg) -> dict | None:
  """An augmented VQA training example: the image as train_preprocess crops it, the cleaned question and one
  answer, drawn uniformly from the example's answers (each distinct answer with probability count / number of
  answers; module docstring). A horizontal flip swaps "left" and "right" in the question and the answer, so both
  stay true. None (counted as missing_caption, logged once) without a question or an answer."""
  image = _train_image(example, rng, data_cfg)
  if image is None:
    return None
  question = clean_question(data_cfg, _text(example["question"]))
  answers = [a for a in (" ".join(_text(a).split()) for a in example["answers"]) if a]
  if not question or not answers:
    _skip("missing_caption", example["_where"], "no question or no answer")
    return None
  flip = data_cfg.flip and rng.random() < 0.5
  answer = answers[int(rng.integers(len(answers)))]
  if flip:
    image, question, answer = image[:, ::-1], swap_left_right(question), swap_left_right(answer)
  return {"image": image, "question": question, "answer": answer}


def tokenize_vqa_batch(batch: dict, tokenizer, qformer_tokenizer, data_cfg, kind: str) -> dict:
  """The text side of a VQA batch (data.prompt the template, "" = the family's VQA prompt): the template with the
  question, then the answer (tokenize_prompted_batch); a question-conditioned model's Q-Former reads the question."""
  template = vqa_template(data_cfg.get("prompt", ""), kind)
  questions = [str(q) for q in batch["question"]]
  prompts = [template.format(q) for q in questions]
  return tokenize_prompted_batch(
    batch["image"], prompts, [str(a) for a in batch["answer"]], questions, tokenizer, qformer_tokenizer, data_cfg, kind
  )


def tokenize_prompted_batch(
  images, prompts: list[str], answers: list[str], qformer_texts: list[str], tokenizer, qformer_tokenizer, data_cfg, kind
) -> dict:
  """A batch of (image, prompt, answer) rows as the LLM family `kind` trains on them, the loss on the answer only:
  - a decoder-only LLM (OPT, LLaMA): text_ids, text_mask of BOS + prompt + " " + answer + the family's end ("\n"
    for OPT), label_mask on the answer and the end only;
  - an encoder-decoder LLM (T5): text_ids, text_mask of prompt + "</s>" (the encoder), target_ids, target_mask of
    answer + "</s>" (the decoder);
  - with a Q-Former tokenizer (a question-conditioned model): qformer_ids, qformer_mask of "[CLS] text [SEP]" for
    qformer_texts (the question for VQA fine-tuning, the whole instruction for instruction tuning), padded to
    data.max_question_len."""
  family = llms.family(kind)
  max_len = data_cfg.max_text_len
  out = {"image": images}
  if family.encoder_decoder:
    out["text_ids"], out["text_mask"] = tokenizer_lib.tokenize(tokenizer, prompts, max_len)
    out["target_ids"], out["target_mask"] = tokenizer_lib.tokenize(tokenizer, answers, max_len)
  else:
    end = family.caption_end or tokenizer.eos_token
    out.update(tokenize_decoder_only(tokenizer, answers, prompts, max_len, end))
  if qformer_tokenizer is not None:
    out["qformer_ids"], out["qformer_mask"] = tokenizer_lib.tokenize(
      qformer_tokenizer, qformer_texts, max_question_len(data_cfg)
    )
  return out


# ----------------------------------------------------------------------------------- instruction tuning

INSTRUCT_FORMATS = ("caption", "vqa")  # the kinds of dataset an instruction-tuning task reads
_TASK_KEYS = ("dataset", "format", "templates", "weight", "builder_kwargs", "train_split", "eval_split", "eval")


def instruct_tasks(data_cfg) -> dict:
  """data.tasks of an instruction-tuning config (data.task "instruct"), checked, by name in sorted order. Each task:
  dataset         a TFDS dataset (data.data_dir): image-caption examples ("caption") or VQA ones ("vqa")
  format          "caption" or "vqa"
  templates       instruction templates; a VQA one has one "{}" where the question goes, a caption one none.
                  Each training example draws one uniformly; evaluation uses the first.
  weight          the task's sampling proportion; -1 = the square root of its number of examples (InstructBLIP's
                  rule); 0 leaves the task out of training (it is still evaluated)
  builder_kwargs, train_split, eval_split: the dataset's, by default data's
  eval            config.eval fields for this task's evaluation (e.g. max_new_tokens), by default config.eval's."""
  tasks = data_cfg.get("tasks") or {}
  if not tasks:
    raise ValueError(
      "config.data.task='instruct' needs config.data.tasks: {name: {dataset, format ('caption' or 'vqa'), templates, "
      "weight}} (configs/instruct.py has examples)."
    )
  out = {}
  for name in sorted(tasks):
    spec, where = tasks[name], f"config.data.tasks.{name}"
    unknown = sorted(set(spec) - set(_TASK_KEYS))
    if unknown:
      raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}; a task has {', '.join(_TASK_KEYS)}.")
    if not spec.get("dataset"):
      raise ValueError(f"{where}.dataset is missing: the TFDS dataset the task reads (e.g. 'synthetic_vqa').")
    if spec.get("format") not in INSTRUCT_FORMATS:
      raise ValueError(f"{where}.format={spec.get('format')!r}: choose one of {', '.join(INSTRUCT_FORMATS)}.")
    templates = [str(t) for t in (spec.get("templates") or ())]
    if not templates:
      raise ValueError(f"{where}.templates is empty: give at least one instruction template.")
    slots = 1 if spec.format == "vqa" else 0
    for t in templates:
      if t.count("{}") != slots:
        raise ValueError(
          f"{where}.templates has {t!r}: a {spec.format} template has "
          + ("one {} where the question goes." if slots else "no {} (a caption task has no question).")
        )
    weight = spec.get("weight", -1)
    if weight != -1 and not weight >= 0:
      raise ValueError(f"{where}.weight={weight}: use a positive weight, -1 (square root of size) or 0 (off).")
    out[name] = spec
  return out


def task_data_config(data_cfg, name: str):
  """The data config that reads instruction task `name`'s dataset as the ordinary pipeline does: data_cfg with that
  task's dataset, splits and builder arguments, data.task its format, data.prompt its first template."""
  spec = instruct_tasks(data_cfg)[name]
  sub = data_cfg.copy_and_resolve_references()
  with sub.unlocked():
    sub.name = spec.dataset
    sub.task = spec.format
    sub.prompt = str(spec.templates[0])
    sub.tasks = {}
    for key in ("builder_kwargs", "train_split", "eval_split"):
      if spec.get(key) is not None:
        sub[key] = spec[key]
  return sub


def instruct_sources(data_cfg) -> list[tuple[str, object, float]]:
  """(task name, train source, weight) of every task with a non-zero weight; -1 = sqrt(number of examples)."""
  sources = []
  for name, spec in instruct_tasks(data_cfg).items():
    weight = spec.get("weight", -1)
    if weight == 0:
      continue
    sub = task_data_config(data_cfg, name)
    source = get_source(sub, sub.train_split)
    sources.append((name, source, math.sqrt(len(source)) if weight == -1 else float(weight)))
  if not sources:
    raise ValueError("Every task of config.data.tasks has weight 0: give at least one a weight to train on.")
  return sources


def instruct_train_preprocess(example: dict, rng: np.random.Generator, task_configs: dict) -> dict | None:
  """An instruction-tuning example: the image as its task's format augments it (a flip swaps left and right in the
  text too), an instruction drawn uniformly from the task's templates (a VQA one with the question in it) and the
  answer (the caption, or one of the human answers). task_configs: task name -> (spec, its data config)."""
  spec, sub = task_configs[example["_where"][0]]
  if spec.format == "vqa":
    ex = vqa_train_preprocess(example, rng, sub)
    if ex is None:
      return None
    template, answer = str(spec.templates[int(rng.integers(len(spec.templates)))]), ex["answer"]
    prompt = template.format(ex["question"])
  else:
    ex = train_preprocess(example, rng, sub)
    if ex is None:
      return None
    prompt, answer = str(spec.templates[int(rng.integers(len(spec.templates)))]), ex["caption"]
  return {"image": ex["image"], "prompt": prompt, "answer": answer}


def tokenize_instruct_batch(batch: dict, tokenizer, qformer_tokenizer, data_cfg, kind: str) -> dict:
  """An instruction-tuning batch: the LLM reads the instruction, then the answer (the loss on the answer); the
  Q-Former reads the same instruction (InstructBLIP's instruction-aware Q-Former)."""
  prompts = [str(p) for p in batch["prompt"]]
  answers = [str(a) for a in batch["answer"]]
  return tokenize_prompted_batch(
    batch["image"], prompts, answers, prompts, tokenizer, qformer_tokenizer, data_cfg, kind
  )


# ------------------------------------------------------------------------------------------- training


def make_train_iterator(
  data_cfg,
  tokenizer,
  *,
  global_batch_size: int,
  seed: int,
  kind: str = llms.RETRIEVAL,
  process_index: int = 0,
  process_count: int = 1,
  qformer_tokenizer=None,
) -> "TrainIterator":
  """An endless iterator of this process's batches: {'image' f32 [b,S,S,3], 'text_ids', 'text_mask' i32 [b,L],
  and the other text fields the model `kind` reads (see _tokenize_batch)}; b = global_batch_size // process_count.
  With data.task "vqa": VQA batches (tokenize_vqa_batch); "instruct": the tasks of data.tasks mixed by their weights,
  each example under an instruction template (tokenize_instruct_batch). Both with qformer_ids / qformer_mask when
  qformer_tokenizer (a question-conditioned model's) is given.

  One stream defines the data, whatever the number of processes: the training split shuffled by `seed` (a new
  order each epoch), each example augmented by a function of (seed, its position in the stream). Global batch s
  is the stream's examples [s * B, (s + 1) * B), B = global_batch_size; process p decodes only its rows of it,
  examples s * B + p * b ... s * B + (p + 1) * b - 1. So 1 process and N processes train on the same batches, and
  a run resumes on another number of processes where it stopped (TrainIterator.get_state). An example whose
  image cannot be decoded is skipped, and its process takes the next example of its own share instead.
  """
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by the number of processes "
      f"{process_count}; pick a multiple of {process_count}."
    )
  name = task(data_cfg, kind)
  sources = None
  if name == "vqa":
    _check_vqa(data_cfg, kind)
    preprocess = lambda ex, rng: vqa_train_preprocess(ex, rng, data_cfg)
    tokenize = lambda batch: tokenize_vqa_batch(batch, tokenizer, qformer_tokenizer, data_cfg, kind)
  elif name == "instruct":
    _check_instruct(data_cfg)
    task_configs = {n: (spec, task_data_config(data_cfg, n)) for n, spec in instruct_tasks(data_cfg).items()}
    sources = instruct_sources(data_cfg)
    preprocess = lambda ex, rng: instruct_train_preprocess(ex, rng, task_configs)
    tokenize = lambda batch: tokenize_instruct_batch(batch, tokenizer, qformer_tokenizer, data_cfg, kind)
  else:
    if qformer_tokenizer is not None:
      raise ValueError(
        "A question-conditioned model (config.model.qformer_text_input) reads a question or an instruction: set "
        "config.data.task to 'vqa' or 'instruct'."
      )
    _check_prompt_fraction(data_cfg, kind)
    preprocess = lambda ex, rng: train_preprocess(ex, rng, data_cfg, kind)
    tokenize = lambda batch: _tokenize_batch(batch, tokenizer, data_cfg, kind)
  stream = (
    _mixture(sources or train_sources(data_cfg), seed, data_cfg.get("captions_per_image", 1))
    .filter(_has_image_bytes)
    .random_map(preprocess)
    .filter(lambda ex: ex is not None)  # broken images and examples without captions
  )
  b = global_batch_size // process_count
  if process_count > 1:
    # Round robin over b strided views: element k is stream[p * b + k % b + (k // b) * B], this process's rows.
    stream = grain.MapDataset.mix([stream[process_index * b + j :: global_batch_size] for j in range(b)])

  def make(start: int):
    return iter(
      stream[start:]
      .to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
      # Batch after to_iter_dataset: grain can't batch a MapDataset after a filter (its length is unknown).
      .batch(b, drop_remainder=True)
      # Tokenise whole batches in the consuming thread: one call per batch is fast, and a HF fast
      # tokenizer shared by grain's worker threads can fail with "Already borrowed".
      .map(tokenize)
    )

  return TrainIterator(make, b, process_count)


def _mixture(sources, seed: int, captions_per_image: int = 1) -> grain.MapDataset:
  """The endless stream of raw examples: each source shuffled anew every epoch and repeated, the sources
  interleaved in proportion to their weights (grain's deterministic mix). Each example carries `_where` (source
  name, record index) for the bad-sample warnings and `_image_id`: the example's own `image_id` field if it has one
  (TFDS COCO, synthetic_shapes), else the record's position in the sources' concatenation (a prepared record is one
  image). captions_per_image K > 1 (retrieval fine-tuning on prepared COCO, whose records hold an image's ~5
  captions): an epoch visits every record K times, the k-th visit marked `_visit` k, as LAVIS trains on every
  (image, caption) pair once per epoch."""
  if captions_per_image < 1:
    raise ValueError(f"config.data.captions_per_image={captions_per_image}: use 1 or more.")
  offsets = np.cumsum([0] + [len(source) for _, source, _ in sources])

  def tagged(name, source, seed, offset):
    n = len(source)

    def tag(i, ex):
      # The record's index, for the warning (grain passes later epochs' indices unwrapped).
      image_id = int(ex["image_id"]) if "image_id" in ex else offset + i % n
      out = {**ex, "_where": (name, i % n), "_image_id": image_id}
      if captions_per_image > 1:
        out["_visit"] = (i // n) % captions_per_image
      return out

    ds = grain.MapDataset.source(source)
    if captions_per_image > 1:
      ds = ds.repeat(captions_per_image)
    ds = ds.seed(seed).map_with_index(tag)
    # The whole-dataset slice [0::1] changes nothing but grain's seeding of the shuffle: it keeps the order (and so
    # the demo results) of the runs made when each process shuffled its own slice of the data.
    return ds[0::1].shuffle().repeat()  # a new order each epoch (grain mixes the epoch into the seed)

  if len(sources) == 1:
    return tagged(*sources[0][:2], seed, 0)
  parents = [
    tagged(name, source, seed + zlib.crc32(name.encode()) % 2**31, int(offset))
    for (name, source, _), offset in zip(sources, offsets)
  ]
  weights = [w for _, _, w in sources]
  return grain.MapDataset.mix(parents, [w / math.fsum(weights) for w in weights])


class TrainIterator:
  """This process's batches (make_train_iterator) with a position that holds across process counts.

  get_state() -> {"global_batches": batches drawn so far (the same on every process), "process_count",
  "iterator": grain's own state (one process only)}. set_state(state) resumes exactly where that state was
  taken: with grain's state when both runs have one process (exact even past undecodable images), else from the
  global position (exact unless undecodable images were skipped before it: each one shifts its process's rows
  by one example). A state of grain's own (older checkpoints) is read as a one-process state."""

  def __init__(self, make, batch_size: int, process_count: int):
    self._make, self._batch_size, self._process_count = make, batch_size, process_count
    self._it, self._batches = make(0), 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self._batches += 1
    return batch

  def get_state(self) -> dict:
    state = {"global_batches": self._batches, "process_count": self._process_count}
    if self._process_count == 1:
      state["iterator"] = self._it.get_state()
    return state

  def set_state(self, state: dict) -> None:
    if "global_batches" not in state:  # grain's own state, from a one-process run
      state = {"global_batches": None, "process_count": 1, "iterator": state}
    if self._process_count == 1 and state.get("process_count") == 1 and "iterator" in state:
      self._it = self._make(0)
      self._it.set_state(state["iterator"])
      if state["global_batches"] is None:
        state = dict(state, global_batches=0)
        logging.info("Resumed the data from an older checkpoint's iterator state (batch count unknown).")
    else:
      self._it = self._make(state["global_batches"] * self._batch_size)
    self._batches = state["global_batches"]


def _check_vqa(data_cfg, kind: str):
  vqa_template(data_cfg.get("prompt", ""), kind)
  if any(spec.get("path") for spec in (data_cfg.get("sources") or {}).values()):
    raise ValueError(
      "config.data.task='vqa' reads data.name's TFDS dataset; the prepared folders of data.sources hold captions: "
      "clear their paths."
    )
  if data_cfg.get("prompt_fraction", 0.0):
    raise ValueError("config.data.prompt_fraction is for captions; with config.data.task='vqa' set it to 0.")


def _check_instruct(data_cfg):
  if any(spec.get("path") for spec in (data_cfg.get("sources") or {}).values()):
    raise ValueError(
      "config.data.task='instruct' reads the TFDS datasets of config.data.tasks; clear the paths of data.sources."
    )
  if data_cfg.get("prompt_fraction", 0.0):
    raise ValueError("config.data.prompt_fraction is for captions; with config.data.task='instruct' set it to 0.")


def _check_prompt_fraction(data_cfg, kind: str):
  fraction = data_cfg.get("prompt_fraction", 0.0)
  if not fraction:
    return
  if kind == llms.RETRIEVAL or not llms.family(kind).encoder_decoder:
    raise ValueError(
      f"config.data.prompt_fraction={fraction} is for encoder-decoder LLMs such as T5 (the share "
      f"of prompt -> caption examples beside the prefix-LM ones); with a {kind!r} model set it to 0"
      + ("." if kind == llms.RETRIEVAL else " (a decoder-only LLM has data.prompt before every caption).")
    )
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"config.data.prompt_fraction={fraction} is not in [0, 1].")
  if not data_cfg.get("prompt"):
    raise ValueError(
      f"config.data.prompt_fraction={fraction} needs a config.data.prompt to put before the "
      "caption (e.g. 'a photo of')."
    )


def _tokenize_batch(batch: dict, tokenizer, data_cfg, kind: str) -> dict:
  """The text side of a batch, as the model `kind` reads it:
  - retrieval (stage 1): text_ids, text_mask ([CLS] caption [SEP], BERT);
  - a decoder-only LLM (OPT): text_ids, text_mask of the tokenizer's BOS ("</s>") + prompt + caption + the
    family's caption_end ("\n"), and label_mask (caption and end only);
  - an encoder-decoder LLM (T5, prefix-LM): text_ids, text_mask of the prefix + "</s>"; target_ids, target_mask
    of the suffix + "</s>" (for data.prompt_fraction of the examples the prefix is data.prompt, the suffix the
    whole caption)."""
  max_len = data_cfg.max_text_len
  out = {"image": batch["image"]}
  if "image_id" in batch:
    out["image_id"] = np.asarray(batch["image_id"], np.int32)
  if kind == llms.RETRIEVAL:
    out["text_ids"], out["text_mask"] = tokenizer_lib.tokenize(tokenizer, [str(c) for c in batch["caption"]], max_len)
    return out
  family = llms.family(kind)
  if not family.encoder_decoder:
    out.update(
      tokenize_decoder_only(
        tokenizer,
        [str(c) for c in batch["caption"]],
        data_cfg.prompt,
        max_len,
        family.caption_end or tokenizer.eos_token,
      )
    )
  else:
    out["text_ids"], out["text_mask"] = tokenizer_lib.tokenize(tokenizer, [str(c) for c in batch["prefix"]], max_len)
    out["target_ids"], out["target_mask"] = tokenizer_lib.tokenize(
      tokenizer, [str(c) for c in batch["suffix"]], max_len
    )
  return out


def tokenize_decoder_only(tokenizer, captions: list[str], prompt: str | list[str], max_len: int, end: str) -> dict:
  """BLIP-2's text for a decoder-only LLM: the tokenizer's BOS ("</s>" for OPT) + prompt + caption + end ("\n"
  for OPT); label_mask is 1 on the caption and end tokens, 0 on BOS, prompt and pads (LAVIS Blip2OPT). `prompt`:
  one for every row (data.prompt), or one per row (VQA: the template with each row's question; the caption is then
  the answer)."""
  prompts = [p.rstrip() for p in ([prompt] * len(captions) if isinstance(prompt, str) else prompt)]
  texts = [f"{p} {c}{end}" if p else f"{c}{end}" for p, c in zip(prompts, captions)]
  ids, mask = tokenizer_lib.tokenize(tokenizer, texts, max_len)
  prompt_lens = np.asarray([len(x) for x in tokenizer(prompts).input_ids])  # bos + prompt tokens
  label_mask = mask * (np.arange(max_len)[None] >= prompt_lens[:, None])
  return {"text_ids": ids, "text_mask": mask, "label_mask": label_mask.astype(np.int32)}


# --------------------------------------------------------------------------------------------- eval


def _eval_examples(data_cfg, split: str | None, decode) -> tuple[list[dict], list[int], list[np.ndarray]]:
  """The eval split's examples (its first eval_max_examples; those whose image decodes), in the split's order:
  (examples, the row of each one's image in `images`, images). Examples that share an `image_id` share one row;
  without an image_id every example has its own. decode(example, index) -> the example with a PIL image or None."""
  source = get_source(data_cfg, split or data_cfg.eval_split)
  n = len(source) if data_cfg.eval_max_examples is None else min(len(source), data_cfg.eval_max_examples)
  decoded = (
    grain.MapDataset.source(source)[:n]
    .map_with_index(lambda i, ex: decode(ex, i))
    .filter(lambda ex: ex["image"] is not None)
    .map(lambda ex: {**ex, "image": images_lib.eval_preprocess(ex["image"], data_cfg.image_size)})
    # Threads decode in parallel, and the order stays that of the split.
    .to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
  )
  examples, rows, images = [], [], []
  image_index = {}  # image_id -> row in images
  for i, ex in enumerate(decoded):
    key = ex.get("image_id", ("example", i))
    if key not in image_index:
      image_index[key] = len(images)
      images.append(ex["image"])
    rows.append(image_index[key])
    examples.append(ex)
  return examples, rows, images


def load_eval_set(data_cfg, tokenizer, split: str | None = None) -> dict:
  """The whole eval split (or its first eval_max_examples examples), for retrieval and captioning.

  Examples that share an `image_id` (COCO has ~5 captions per image) become one image with several
  texts; without an image_id every example is its own image. Returns
    images   f32 [N_img, S, S, 3]     text_ids, text_mask  i32 [N_txt, L]
    txt2img  i32 [N_txt]              img2txt  list of N_img lists of text indices
    captions list of N_txt cleaned captions.
  """
  examples, txt2img, images = _eval_examples(data_cfg, split, _decode)
  captions = [tokenizer_lib.clean_caption(ex["caption"]) for ex in examples]
  img2txt = collections.defaultdict(list)
  for t, i in enumerate(txt2img):
    img2txt[i].append(t)
  ids, mask = tokenizer_lib.tokenize(tokenizer, captions, data_cfg.max_text_len)
  return {
    "images": np.stack(images),
    "text_ids": ids,
    "text_mask": mask,
    "txt2img": np.asarray(txt2img, np.int32),
    "img2txt": [img2txt[i] for i in range(len(images))],
    "captions": captions,
  }


def load_vqa_eval_set(data_cfg, split: str | None = None) -> dict:
  """The whole VQA eval split (data.task "vqa"; or its first eval_max_examples questions), with the questions
  cleaned as in training. Questions that share an `image_id` share one image (without an image_id each question is
  its own image). Returns
    images          f32 [N_img, S, S, 3]    q2img  i32 [N_q], the image of each question
    questions, question_types: N_q strings  answers: N_q lists of the human answers   question_ids: N_q ints."""
  examples, q2img, images = _eval_examples(data_cfg, split, _decode_vqa)
  if not images:
    raise ValueError(f"The VQA eval split of {data_cfg.name!r} has no question with a readable image.")
  return {
    "images": np.stack(images),
    "q2img": np.asarray(q2img, np.int32),
    "questions": [clean_question(data_cfg, ex["question"]) for ex in examples],
    "answers": [ex["answers"] for ex in examples],
    "question_types": [ex["question_type"] for ex in examples],
    "question_ids": [ex["question_id"] for ex in examples],
  }


def _decode_vqa(example: dict, index: int) -> dict:
  """Eval: a VQA example with its image decoded (None if broken: counted, logged)."""
  try:
    image = images_lib.decode(example["image"])
  except images_lib.BadImage as e:
    _skip(e.reason, ("the eval split", index), str(e))
    image = None
  out = {
    "image": image,
    "question": _text(example["question"]),
    "answers": [_text(a) for a in example["answers"]],
    "question_type": _text(example["question_type"]) if "question_type" in example else "",
    "question_id": int(example["question_id"]) if "question_id" in example else index,
  }
  if "image_id" in example:
    out["image_id"] = int(example["image_id"])
  return out
