"""Readers of the annotation files BLIP-2 is evaluated on: COCO captions, Karpathy-style lists and VQAv2.

- captions: a COCO captions file ({"images": [{id, file_name}], "annotations": [{image_id, caption}]}) or a
  Karpathy-style list ([{"image": file, "caption": [...]}], LAVIS's coco_karpathy_test.json); `file_name` /
  `image` are relative to the image folder.
- VQAv2: the questions file and, optionally, the annotations file with the human answers. The image of a
  question is the `file_name` of its image_id in the questions file's own "images" list if it has one (COCO
  style), else the file of the image folder whose name ends in the image_id's digits: COCO_val2014_000000000042.jpg
  (VQAv2's COCO 2014 images), 000000000042.jpg (COCO 2017), 42.png.
A file of another layout, a missing file or image is one error sentence naming the file.
"""

import contextlib
import json
import os
import re

from blip2_jax.data import images as images_lib

CAPTIONS_FORMAT = (
  'a COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id", '
  '"caption"}]}) or a Karpathy-style list ([{"image", "caption": [...]}])'
)
QUESTIONS_FORMAT = 'a VQAv2 questions file ({"questions": [{"question_id", "image_id", "question"}]})'
ANSWERS_FORMAT = 'a VQAv2 annotations file ({"annotations": [{"question_id", "answers": [{"answer"}, ...]}]})'


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
          samples[image["id"]] = {
            "image": image["file_name"],
            "image_id": image["id"],
            "captions": captions[image["id"]],
          }
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


def load_vqa(
  questions_path: str, annotations_path: str | None, images_dir: str, limit: int | None = None
) -> list[dict]:
  """VQAv2 files -> one sample per question, in the questions file's order (the first `limit`): {"question_id",
  "image_id", "question", "image" (file name), "path"}, plus "answers" (the human answers) and "answer_type" from
  the annotations file if given. Images: see the module docstring."""
  _check_images_dir(images_dir)
  data = _read_json(questions_path, QUESTIONS_FORMAT)
  with _reading(questions_path, QUESTIONS_FORMAT):
    questions = [
      {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]} for q in data["questions"]
    ][:limit]
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
          raise ValueError(
            f"{annotations_path} has no annotation for question {q['question_id']} of "
            f"{questions_path}: are they files of the same split?"
          )
        a = by_id[q["question_id"]]
        q["answers"] = [h["answer"] for h in a["answers"]]
        if "answer_type" in a:
          q["answer_type"] = a["answer_type"]
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
