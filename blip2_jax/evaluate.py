r"""Evaluation: a training workdir's eval split, or any model on public annotation files and an image folder.

A training workdir (image-text retrieval for stage 1, captioning for stage 2, `CaptionEvaluator`):

  python -m blip2_jax.evaluate --config=configs/stage1.py:demo --workdir=workdirs/stage1_demo

evaluates the latest checkpoint of a workdir alone and writes WORKDIR/eval_step_N.json. During training the
same evaluator runs every config.eval_every steps and at the end.

Any model (a Hugging Face BLIP-2 directory or a workdir, `Blip2.load`) on annotation files, with a JSON report:

  python -m blip2_jax.evaluate --model=PATH --task=caption --annotations=captions_val2017.json --images=DIR \
      --out=report.json [--batch_size=16 --limit=N --num_beams=5 --max_new_tokens=30 --prompt="a photo of"]
  python -m blip2_jax.evaluate --model=PATH --task=vqa --questions=v2_OpenEnded_mscoco_val2014_questions.json \
      [--annotations=v2_mscoco_val2014_annotations.json] --images=DIR --out=report.json
  python -m blip2_jax.evaluate --model=PATH --task=vqa --questions=testdev_balanced_questions.json \
      --images=gqa/images --out=report.json
  python -m blip2_jax.evaluate --model=PATH --task=retrieval --annotations=dataset_coco.json --images=coco \
      --out=report.json [--split=test --k_test=128]

- caption (stage-2 model): COCO captions files ({"images": [{id, file_name}], "annotations": [{image_id,
  caption}]}; NoCaps's nocaps_val_4500_captions.json, whose images have a "domain"), Karpathy-style lists
  ([{"image": file, "caption": [...]}], LAVIS's coco_karpathy_test.json) or Karpathy's split files
  (dataset_coco.json, dataset_flickr30k.json: the images of --split, default "test", each with its sentences'
  "raw" text, at --images/filepath/filename or --images/filename). Paths are relative to --images. Paper
  settings (tasks.CAPTION_SETTINGS) unless overridden; BLEU-1..4 and CIDEr-D (metrics.caption_scores) and exact
  match, for NoCaps also per domain and "entire" (each domain scored alone); the report lists every caption.
- vqa (stage-2 model): VQAv2 or OK-VQA files, or GQA's testdev_balanced_questions.json (told by its layout; its
  answers are in it, so no --annotations). VQAv2 / OK-VQA: the image of a question is the `file_name` of its
  image_id in the questions file's own "images" list if it has one ({"id", "file_name"}, COCO style), else the
  file in --images whose name ends in the image_id's digits: COCO_val2014_000000000042.jpg (COCO 2014 images),
  000000000042.jpg (COCO 2017), 42.png; GQA: --images/<imageId>.jpg. Zero-shot prompt and settings of tasks.py
  (--prompt: another template with "{}" for the question). With answers the report has the accuracy (VQAv2 /
  OK-VQA: metrics.vqa_accuracy, also per answer_type and question_type; GQA: exact match after the VQA answer
  normalisation, metrics.gqa_accuracy, also per structural and semantic type) and every answer; without,
  --out is the results file of the evaluation server: VQAv2's [{"question_id", "answer"}], GQA's
  [{"questionId", "prediction"}].
- retrieval (stage-1 model): the caption files above; each caption is a text, each image's captions its
  positives. ITC over all pairs, the top --k_test candidates (capped at the number there are) reranked by ITM
  (`retrieval.RetrievalScorer`), R@1/5/10 both ways; the report gives each image's and text's rank and top candidates.

Input errors (a missing file, an annotation file of another format, a model of the wrong stage) stop the program
with one line, before the model is read where they can be seen that early. An image that cannot be decoded is
skipped with a warning naming it (its captions / questions with it) and counted in the report's `num_skipped`
and `skipped_images`; if none can be decoded, that is an error. The work is done by
evaluators.py (a workdir), data/annotations.py (the files) and eval_files.py (the reports); retrieval scores
as LAVIS computes them are described in retrieval.py.
"""

import json
import logging
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from blip2_jax import cli
from blip2_jax import eval_files
from blip2_jax import evaluators
from blip2_jax import tasks
from blip2_jax.api import Blip2
from blip2_jax.data import annotations

TASKS = ("caption", "vqa", "retrieval")

config_flags.DEFINE_config_file("config", None, "Config the workdir was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "Workdir whose latest checkpoint is evaluated.")
flags.DEFINE_string("model", None, "HF BLIP-2 directory or blip2_jax workdir to evaluate on annotation files.")
flags.DEFINE_enum("task", None, TASKS, "What --model is evaluated on.")
flags.DEFINE_string(
  "annotations",
  None,
  "caption/retrieval: COCO captions JSON (NoCaps too), Karpathy-style list or Karpathy's dataset_coco.json / "
  "dataset_flickr30k.json; vqa: VQAv2 / OK-VQA annotations JSON (optional: without it, --out is the VQAv2 "
  "results file).",
)
flags.DEFINE_string("questions", None, "vqa: VQAv2 / OK-VQA questions JSON or GQA's testdev_balanced_questions.json.")
flags.DEFINE_string("split", "test", "caption/retrieval: the split of a Karpathy dataset_*.json file to evaluate.")
flags.DEFINE_string("images", None, "Folder of the images the annotations name.")
flags.DEFINE_string("out", None, "JSON report to write.")
flags.DEFINE_integer("batch_size", 16, "Images (vqa: questions) per batch.")
flags.DEFINE_integer("limit", None, "Only the first N images (vqa: questions) of the files.")
flags.DEFINE_string(
  "prompt",
  None,
  "caption: the prompt (default 'a photo of'); vqa: a template with {} for the question (default: the paper's).",
)
flags.DEFINE_integer("num_beams", None, "Beams (default: the task's, 5).")
flags.DEFINE_integer("max_new_tokens", None, "At most this many new tokens (default: the task's).")
flags.DEFINE_integer("min_new_tokens", None, "At least this many new tokens (default: the task's).")
flags.DEFINE_integer("k_test", 128, "retrieval: ITC candidates per query reranked by ITM.")
flags.DEFINE_string("dtype", "float32", "dtype of the frozen ViT and LLM (bfloat16 halves their memory).")
FLAGS = flags.FLAGS

# Flags of --model mode that only some tasks read.
_TASK_FLAGS = {
  "caption": {"prompt", "num_beams", "max_new_tokens", "min_new_tokens", "split"},
  "vqa": {"questions", "prompt", "num_beams", "max_new_tokens", "min_new_tokens"},
  "retrieval": {"k_test", "split"},
}


def evaluate_files() -> dict:
  """--model mode: checks the flags and the input files, loads the model, evaluates, writes --out."""
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
    eval_files.check_vqa_prompt(FLAGS.prompt)
    samples = annotations.load_vqa(FLAGS.questions, FLAGS.annotations, FLAGS.images, FLAGS.limit)
  else:
    # Only Karpathy's split files have splits: --split given for another layout is an error there.
    split = FLAGS.split if FLAGS["split"].present else None
    samples = annotations.load_captions(FLAGS.annotations, FLAGS.images, FLAGS.limit, split=split)
  settings = {
    name: FLAGS[name].value
    for name in ("num_beams", "max_new_tokens", "min_new_tokens")
    if FLAGS[name].value is not None
  }
  if task != "retrieval":
    merged = {**(tasks.CAPTION_SETTINGS if task == "caption" else tasks.VQA_SETTINGS), **settings}
    if merged["min_new_tokens"] > merged["max_new_tokens"]:
      raise ValueError(
        f"min_new_tokens={merged['min_new_tokens']} exceeds max_new_tokens="
        f"{merged['max_new_tokens']}: give a smaller --min_new_tokens too."
      )
  kind = eval_files.peek_model_kind(FLAGS.model)
  if kind is not None:
    eval_files.check_task(task, kind, FLAGS.model)

  model = Blip2.load(FLAGS.model, dtype=FLAGS.dtype)
  eval_files.check_task(task, model.kind, FLAGS.model)
  if task == "caption":
    report = eval_files.evaluate_captions(model, samples, batch_size=FLAGS.batch_size, prompt=FLAGS.prompt, **settings)
  elif task == "vqa":
    report = eval_files.evaluate_vqa(model, samples, batch_size=FLAGS.batch_size, prompt=FLAGS.prompt, **settings)
  else:
    report = eval_files.evaluate_retrieval(model, samples, batch_size=FLAGS.batch_size, k_test=FLAGS.k_test)
  inputs = {
    "model": FLAGS.model,
    "questions": FLAGS.questions,
    "annotations": FLAGS.annotations,
    "image_dir": FLAGS.images,
    "split": samples[0].get("split"),  # Karpathy split files
  }
  report = {**{k: v for k, v in inputs.items() if v is not None}, **report}
  if task == "vqa" and "metrics" not in report:  # no answers: the results file of the evaluation server
    written = eval_files.vqa_results_file(report, samples[0]["layout"])
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
      print(
        f"wrote {FLAGS.out} ({count} {'questions' if FLAGS.task == 'vqa' else 'images'}"
        + (f", {report['num_skipped']} unreadable images skipped)" if report["num_skipped"] else ")")
      )
      return
    print(json.dumps(evaluators.evaluate_workdir(FLAGS.config, FLAGS.workdir), indent=2))
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
