"""Readers of the annotation files BLIP-2 is evaluated on, in their public layouts.

- captions (load_captions), one of three layouts, told apart by their shape:
  - a COCO captions file ({"images": [{id, file_name}], "annotations": [{image_id, caption}]}); NoCaps's
    nocaps_val_4500_captions.json is one whose images also have a "domain" (in-domain, near-domain, out-domain),
    which the samples keep;
  - a Karpathy-style list ([{"image": file, "caption": [...]}], LAVIS's coco_karpathy_test.json);
  - Karpathy's split files dataset_coco.json / dataset_flickr30k.json ({"images": [{"filepath" (COCO only),
    "filename", "split", "sentences": [{"raw", ...}], "imgid", "cocoid" (COCO only)}], "dataset"}): the images
    of one split ("test": COCO's 5k, Flickr30k's 1k), each with its sentences' "raw" text, found at
    images_dir/filepath/filename (COCO: coco/val2014/COCO_val2014_....jpg) or images_dir/filename (Flickr30k).
  `file_name` / `image` are relative to the image folder.
- VQA (load_vqa), one of two layouts:
  - VQAv2 (and OK-VQA, which has its layout): the questions file and, optionally, the annotations file with the
    human answers (their "answer" fields; OK-VQA's also have "raw_answer" and "answer_confidence", unused, as by
    the official evaluation). The image of a question is the `file_name` of its image_id in the questions file's
    own "images" list if it has one (COCO style), else the file of the image folder whose name ends in the
    image_id's digits: COCO_val2014_000000000042.jpg (VQAv2's and OK-VQA's COCO 2014 images), 000000000042.jpg
    (COCO 2017), 42.png.
  - GQA (testdev_balanced_questions.json, told by its shape: a dict question id -> {"imageId", "question",
    "answer", "types", ...}): the questions and their one answer in one file; the image is
    images_dir/<imageId>.jpg.
A file of another layout, a missing file or image is one error sentence naming the file.
"""

import contextlib
import json
import os
import re

from blip2_jax.data import images as images_lib

CAPTIONS_FORMAT = (
  'a COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id", '
  '"caption"}]}), a Karpathy-style list ([{"image", "caption": [...]}]) or Karpathy\'s dataset_coco.json / '
  'dataset_flickr30k.json ({"images": [{"filename", "split", "sentences": [{"raw"}]}]})'
)
KARPATHY_FORMAT = (
  'a Karpathy split file like dataset_coco.json ({"images": [{"filepath" (COCO only), "filename", "split", '
  '"sentences": [{"raw"}]}]})'
)
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
QUESTIONS_FORMAT = (
  'a VQAv2 questions file ({"questions": [{"question_id", "image_id", "question"}]}) or GQA\'s '
  'testdev_balanced_questions.json ({question_id: {"imageId", "question", "answer"}})'
)
GQA_FORMAT = 'a GQA questions file ({question_id: {"imageId", "question", "answer", "types": {"structural"}}})'
ANSWERS_FORMAT = 'a VQAv2 annotations file ({"annotations": [{"question_id", "answers": [{"answer"}, ...]}]})'


def read_json(path: str, expected: str):
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


def _is_karpathy_split_file(data) -> bool:
  """dataset_coco.json / dataset_flickr30k.json: a dict whose "images" have "sentences" (COCO files' have not)."""
  images = data.get("images") if isinstance(data, dict) else None
  return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def load_captions(path: str, images_dir: str, limit: int | None = None, split: str | None = None) -> list[dict]:
  """A captions file of one of the layouts of the module docstring -> one sample per image that has captions, in
  file order (the first `limit`): {"image": its file name relative to images_dir, "path", "captions", for COCO
  files "image_id", for Karpathy split files "image_id" (cocoid, else imgid) and "split", for NoCaps "domain"}.
  `split` chooses the images of a Karpathy split file ("train", "val", "test", "restval"; default "test"); the
  other layouts have no splits, so giving one is an error. Each image file must exist (a missing one is an
  error: most likely --images is the wrong folder)."""
  _check_images_dir(images_dir)
  data = read_json(path, CAPTIONS_FORMAT)
  if _is_karpathy_split_file(data):
    samples = _karpathy_split(data, path, split or "test")
  else:
    if split is not None:
      raise ValueError(
        f"{path} is not a Karpathy split file (dataset_coco.json / dataset_flickr30k.json) and has no splits: "
        "drop --split."
      )
    samples = _coco_or_karpathy_list(data, path)
  with _reading(path, CAPTIONS_FORMAT):
    samples = samples[:limit]
    for s in samples:
      if not all(isinstance(c, str) for c in s["captions"]):
        raise TypeError(f"a caption of {s['image']} is not a string")
      s["path"] = os.path.join(images_dir, s["image"])
  if not samples:
    raise ValueError(f"{path} has no image with a caption.")
  _check_image_files(samples, path)
  return samples


def _coco_or_karpathy_list(data, path: str) -> list[dict]:
  samples = {}  # image key -> sample, in file order
  with _reading(path, CAPTIONS_FORMAT):
    if isinstance(data, dict):
      images, captions = data["images"], {}
      for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
      with_domain = [image["id"] for image in images if "domain" in image]
      if with_domain and len(with_domain) != len(images):
        missing = next(image["id"] for image in images if "domain" not in image)
        raise ValueError(f'{path}: some images have a "domain" (NoCaps) and some not, e.g. image {missing}.')
      for image in images:
        if image["id"] in captions:
          samples[image["id"]] = {
            "image": image["file_name"],
            "image_id": image["id"],
            "captions": captions[image["id"]],
          }
          if "domain" in image:
            if image["domain"] not in NOCAPS_DOMAINS:
              raise ValueError(
                f"{path}: image {image['id']} has domain {image['domain']!r}; NoCaps's are {', '.join(NOCAPS_DOMAINS)}."
              )
            samples[image["id"]]["domain"] = image["domain"]
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
  return list(samples.values())


def _karpathy_split(data: dict, path: str, split: str) -> list[dict]:
  """The images of `split` in Karpathy's dataset_coco.json / dataset_flickr30k.json, with their raw sentences."""
  samples = []
  with _reading(path, KARPATHY_FORMAT):
    splits = {}
    for image in data["images"]:
      splits[image["split"]] = splits.get(image["split"], 0) + 1
      if image["split"] != split or not image["sentences"]:
        continue
      name = image["filename"]
      samples.append(
        {
          "image": os.path.join(image["filepath"], name) if image.get("filepath") else name,
          "image_id": image.get("cocoid", image["imgid"]),
          "split": split,
          "captions": [sentence["raw"] for sentence in image["sentences"]],
        }
      )
  if not samples:
    found = ", ".join(f"{k} ({v} images)" for k, v in splits.items())
    raise ValueError(f"{path} has no image of split {split!r}; its splits are {found}: give another --split.")
  return samples


def _is_gqa_file(data) -> bool:
  """GQA's questions files: a dict question id -> a question with an "imageId" (VQAv2's has a "questions" list)."""
  first = next(iter(data.values()), None) if isinstance(data, dict) and "questions" not in data else None
  return isinstance(first, dict) and "imageId" in first


def load_vqa(
  questions_path: str, annotations_path: str | None, images_dir: str, limit: int | None = None
) -> list[dict]:
  """VQAv2 / OK-VQA files or a GQA questions file -> one sample per question, in the questions file's order (the
  first `limit`): {"question_id", "image_id", "question", "image" (file name), "path", "layout" ("vqav2" or
  "gqa")}, plus, from a VQAv2
  annotations file if given, "answers" (the human answers), "answer_type" and "question_type", or, from a GQA
  file, "answer" (its one answer) and "structural_type" / "semantic_type" (its "types"). Images: see the module
  docstring."""
  _check_images_dir(images_dir)
  data = read_json(questions_path, QUESTIONS_FORMAT)
  if _is_gqa_file(data):
    if annotations_path:
      raise ValueError(
        f"{questions_path} is a GQA questions file, which holds its answers: drop --annotations={annotations_path}."
      )
    return _load_gqa(data, questions_path, images_dir, limit)
  with _reading(questions_path, QUESTIONS_FORMAT):
    questions = [
      {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"], "layout": "vqav2"}
      for q in data["questions"]
    ][:limit]
    file_names = {image["id"]: image["file_name"] for image in data.get("images", [])}
    for q in questions:
      _check_question(q, questions_path)
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
    data = read_json(annotations_path, ANSWERS_FORMAT)
    with _reading(annotations_path, ANSWERS_FORMAT):
      by_id = {a["question_id"]: a for a in data["annotations"]}
      for q in questions:
        if q["question_id"] not in by_id:
          raise ValueError(
            f"{annotations_path} has no annotation for question {q['question_id']} of "
            f"{questions_path}: are they files of the same split?"
          )
        a = by_id[q["question_id"]]
        q["answers"] = [h["answer"] for h in a["answers"]]
        for key in ("answer_type", "question_type"):
          if key in a:
            q[key] = a[key]
  return questions


def _check_question(q: dict, path: str):
  if not isinstance(q["question"], str) or not q["question"].strip():
    raise ValueError(f"{path}: question {q['question_id']} is empty or not a string.")


def _load_gqa(data: dict, path: str, images_dir: str, limit: int | None) -> list[dict]:
  """GQA questions (testdev_balanced_questions.json): the image is images_dir/<imageId>.jpg; the answer, where
  the file has them (the challenge's test files have none), is the one to match exactly."""
  questions = []
  with _reading(path, GQA_FORMAT):
    for question_id, entry in list(data.items())[:limit]:
      q = {"question_id": question_id, "image_id": entry["imageId"], "question": entry["question"], "layout": "gqa"}
      _check_question(q, path)
      q["image"] = f"{entry['imageId']}.jpg"
      q["path"] = os.path.join(images_dir, q["image"])
      if "answer" in entry:
        if not isinstance(entry["answer"], str):
          raise TypeError(f"the answer of question {question_id} is not a string")
        q["answer"] = entry["answer"]
      for kind in ("structural", "semantic"):
        if kind in entry.get("types", {}):
          q[f"{kind}_type"] = entry["types"][kind]
      questions.append(q)
    if len({"answer" in q for q in questions}) > 1:
      raise ValueError(f"{path}: some of its questions have an answer and some not.")
  if not questions:
    raise ValueError(f"{path} has no questions.")
  _check_image_files(questions, path)
  return questions


def _files_by_image_id(images_dir: str, image_ids: set) -> dict:
  """image_id -> the one image file of images_dir whose name (without suffix) ends in the id's digits."""
  found = {}
  for name in os.listdir(images_dir):
    digits = re.search(r"(\d+)$", os.path.splitext(name)[0])
    if name.lower().endswith(images_lib.IMAGE_SUFFIXES) and digits and int(digits[1]) in image_ids:
      found.setdefault(int(digits[1]), []).append(name)
  for image_id in sorted(image_ids, key=str):
    if image_id not in found:
      padded = f"{image_id:012d}" if isinstance(image_id, int) else image_id
      raise FileNotFoundError(
        f"No image for image_id {image_id} in {images_dir}: expected a file whose name ends in "
        f"its number, e.g. COCO_val2014_{padded}.jpg or {padded}.jpg."
      )
    if len(found[image_id]) > 1:
      raise ValueError(
        f"Several images in {images_dir} end in image_id {image_id}: "
        f"{', '.join(sorted(found[image_id]))}; keep one split per folder."
      )
  return {image_id: names[0] for image_id, names in found.items()}
