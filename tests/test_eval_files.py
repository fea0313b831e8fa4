"""`python -m blip2_jax.evaluate --model=... --task=...`: any model on COCO-format annotation files and an image folder.

Tiny random Hugging Face BLIP-2 checkpoints (as in test_api.py, with the demo tokenizers saved beside them)
are evaluated in-process on a few PNG images and tiny COCO / VQAv2 files. The reports are checked against what
they can be derived from independently: captions and answers against the model called directly on the same
batches, metrics recomputed from the written predictions, retrieval ranks against a brute-force numpy ranking of
the model's own ITC and ITM scores. A random model's outputs carry no meaning; these checks do not need any.
"""

import json
import logging
import os
import subprocess
import sys

from conftest import one_device_env
from helpers import OPT_TEXT
from helpers import randomise
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from test_api import IMAGE
from test_api import QUERIES
from test_api import VISION
from test_api import _qformer
import torch
import transformers

from blip2_jax import demo_llm
from blip2_jax import eval_files
from blip2_jax import metrics
from blip2_jax import partitioning
from blip2_jax.api import Blip2
from blip2_jax.data import annotations
from blip2_jax.data import images as images_lib
from blip2_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1)  # generation settings that compile quickly


def _save_hf(kind: str, out):
  """A tiny random HF BLIP-2 ('retrieval' or 'opt') with a tokenizer that covers its vocabulary."""
  if kind == "retrieval":
    tok = tokenizer_lib.load_tokenizer(tokenizer_lib.demo_vocab_path())
    config = transformers.Blip2Config(
      vision_config=VISION, qformer_config=_qformer(True), num_query_tokens=QUERIES, image_text_hidden_size=16
    )
    model = transformers.Blip2ForImageTextRetrieval(config)
  else:
    tok = demo_llm.make_tokenizer("opt")
    text = dict(
      OPT_TEXT,
      vocab_size=len(tok),
      pad_token_id=tok.pad_token_id,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
    )
    config = transformers.Blip2Config(
      vision_config=VISION, qformer_config=_qformer(False), text_config=text, num_query_tokens=QUERIES
    )
    model = transformers.Blip2ForConditionalGeneration(config)
  randomise(model, seed=0).save_pretrained(out)
  tok.save_pretrained(out)
  return model, str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """kind -> (its HF directory, the model loaded on one device (compiling for 8 fake devices costs more), the
  transformers model)."""
  root = tmp_path_factory.mktemp("hf")
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  out = {}
  for kind in ("retrieval", "opt"):
    hf, path = _save_hf(kind, root / kind)
    out[kind] = (path, Blip2.from_pretrained(path, mesh=mesh), hf)
  return out


def _write_images(folder, names, corrupt=()):
  """Random-noise images of different sizes (PNG, or JPEG by suffix); `corrupt` names get bytes that are none."""
  folder.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for i, name in enumerate(names):
    if name in corrupt:
      (folder / name).write_bytes(b"\x89PNG not an image")
    else:
      pixels = rng.integers(0, 256, size=(30 + 7 * i, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / name)
  return folder


def _coco(path, captions: dict):
  """captions: file name -> its captions -> a COCO captions file (image ids 1, 2, ... in that order)."""
  images = [{"id": i + 1, "file_name": name} for i, name in enumerate(captions)]
  annotations = [
    {"id": 100 * im["id"] + j, "image_id": im["id"], "caption": c}
    for im in images
    for j, c in enumerate(captions[im["file_name"]])
  ]
  path.write_text(json.dumps({"images": images, "annotations": annotations}))
  return str(path)


def _load(folder, names, size=IMAGE):
  return np.stack([images_lib.load_image(str(folder / n), size) for n in names])


# --- captioning ----------------------------------------------------------------------------------------------


def test_captions_match_the_model_and_metrics_match_the_predictions(models, tmp_path, caplog):
  """Batch 2 over 3 readable images (the last batch padded) and a corrupt one: the report's captions are those
  of model.caption on the same batches, the corrupt image is skipped with a warning naming it and counted, and
  exact match / BLEU / CIDEr-D are those of the written captions."""
  _, model, _ = models["opt"]
  names = ["a.png", "b.jpg", "c.png", "d.png"]
  folder = _write_images(tmp_path / "images", names, corrupt={"c.png"})
  x = _load(folder, ["a.png", "b.jpg", "d.png"])
  direct = model.caption(x[:2], **FAST) + model.caption(x[[2, 2]], **FAST)[:1]
  refs = {
    "a.png": [direct[0] + ".", "large red circle top left"],  # the caption itself: an exact match
    "b.jpg": ["small blue square", "zebra zebra"],
    "c.png": ["nothing"],
    "d.png": ["green triangle bottom right", "yellow circle"],
  }
  samples = annotations.load_captions(_coco(tmp_path / "captions.json", refs), str(folder))
  with caplog.at_level(logging.WARNING, logger="blip2_jax"):
    report = eval_files.evaluate_captions(model, samples, batch_size=2, **FAST)

  assert [p["image"] for p in report["predictions"]] == ["a.png", "b.jpg", "d.png"]
  assert [p["image_id"] for p in report["predictions"]] == [1, 2, 4]
  assert [p["prediction"] for p in report["predictions"]] == direct
  assert report["num_images"] == 3 and report["num_skipped"] == 1 and report["skipped_images"] == ["c.png"]
  assert any("Cannot decode image" in r.getMessage() and "c.png" in r.getMessage() for r in caplog.records)
  assert report["settings"] == {"prompt": "a photo of", **FAST}
  preds = {p["image"]: p["prediction"] for p in report["predictions"]}
  exact = np.mean([tokenizer_lib.clean_caption(preds[n]) in map(tokenizer_lib.clean_caption, refs[n]) for n in preds])
  assert exact >= 1 / 3  # a.png's reference is its own caption
  expected = {"exact_match": exact, **metrics.caption_scores(preds, {n: refs[n] for n in preds})}
  assert report["metrics"] == pytest.approx(expected, abs=1e-12)
  assert [p["references"] for p in report["predictions"]] == [refs[n] for n in preds]


class _Echo:
  """A stand-in captioning model whose output says which image (its mean pixel) and question it was given, and
  which records the batch shapes: a random model's captions barely depend on the image."""

  kind = "opt"
  cfg = ml_collections.ConfigDict({"vit": {"image_size": 8}})

  def __init__(self):
    self.shapes = []

  def caption(self, images, **settings):
    self.shapes.append(images.shape)
    return [f"{x.mean():.5f}" for x in images]

  def answer(self, images, questions, **settings):
    assert len(questions) == len(images)
    self.shapes.append(images.shape)
    return [f"{x.mean():.5f} {q}" for x, q in zip(images, questions)]


def _solid_images(folder, names, corrupt=()):
  folder.mkdir()
  for i, name in enumerate(names):
    if name in corrupt:
      (folder / name).write_bytes(b"GIF89a broken")
    else:
      Image.new("RGB", (12 + i, 10), (40 * i, 255 - 30 * i, 17 * i)).save(folder / name)
  return {n: f"{images_lib.load_image(str(folder / n), 8).mean():.5f}" for n in names if n not in corrupt}


def test_each_caption_and_answer_belongs_to_its_image_and_question(tmp_path):
  """Batch 2 over 5 images with a corrupt one in the middle, and over 6 questions about 3 of them out of order:
  every batch has one shape, each output is that of its own image (and question), padding rows are dropped."""
  names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
  means = _solid_images(tmp_path / "images", names, corrupt={"c.png"})
  model = _Echo()
  samples = annotations.load_captions(_coco(tmp_path / "c.json", {n: ["x"] for n in names}), str(tmp_path / "images"))
  report = eval_files.evaluate_captions(model, samples, batch_size=2)
  assert {p["image"]: p["prediction"] for p in report["predictions"]} == {
    n: means[n] for n in ["a.png", "b.png", "d.png", "e.png"]
  }
  assert set(model.shapes) == {(2, 8, 8, 3)} and report["skipped_images"] == ["c.png"]

  model = _Echo()
  questions = [(1, "d.png"), (2, "a.png"), (3, "c.png"), (4, "d.png"), (5, "a.png"), (6, "e.png")]
  qpath = tmp_path / "q.json"
  qpath.write_text(
    json.dumps(
      {
        "questions": [{"question_id": q, "image_id": 10 + q, "question": f"q{q}?"} for q, _ in questions],
        "images": [{"id": 10 + q, "file_name": n} for q, n in questions],
      }
    )
  )
  questions_read = annotations.load_vqa(str(qpath), None, str(tmp_path / "images"))
  report = eval_files.evaluate_vqa(model, questions_read, batch_size=2)
  assert [(p["question_id"], p["prediction"]) for p in report["predictions"]] == [
    (q, f"{means[n]} q{q}?") for q, n in questions if n != "c.png"
  ]
  assert set(model.shapes) == {(2, 8, 8, 3)} and len(model.shapes) == 3  # [a a] [c d] -> [d, pad], [d e]
  assert report["num_skipped_questions"] == 1 and report["skipped_images"] == ["c.png"]


def test_karpathy_list_and_limit(tmp_path):
  folder = _write_images(tmp_path / "images", ["x.png", "y.png", "z.png"])
  path = tmp_path / "karpathy.json"
  path.write_text(
    json.dumps(
      [
        {"image": "y.png", "caption": ["one", "two"]},
        {"image": "x.png", "caption": "three"},
        {"image": "x.png", "caption": "four"},
        {"image": "z.png", "caption": ["five"]},
      ]
    )
  )
  samples = annotations.load_captions(str(path), str(folder), limit=2)
  assert [(s["image"], s["captions"]) for s in samples] == [("y.png", ["one", "two"]), ("x.png", ["three", "four"])]
  assert samples[0]["path"] == os.path.join(str(folder), "y.png")


# --- VQA -----------------------------------------------------------------------------------------------------


def test_vqa_answers_results_file_and_accuracy(models, tmp_path):
  """Questions only -> answers (those of model.answer on the same batch); then annotations made from those
  answers, so that the accuracy is known: 10 of 10 humans agree (1.0), 2 of 10 (0.6), none (0.0)."""
  _, model, _ = models["opt"]
  # VQAv2's COCO 2014 naming and COCO 2017's; an unrelated image whose name ends in other digits.
  folder = _write_images(tmp_path / "images", ["COCO_val2014_000000000007.png", "000000000042.png", "x_5.png"])
  questions = [
    {"question_id": 71, "image_id": 7, "question": "what color is it?"},
    {"question_id": 421, "image_id": 42, "question": "how many circles?"},
    {"question_id": 72, "image_id": 7, "question": "is it large?"},
  ]
  qpath = tmp_path / "questions.json"
  qpath.write_text(json.dumps({"questions": questions}))
  samples = annotations.load_vqa(str(qpath), None, str(folder))
  assert [s["image"] for s in samples] == [
    "COCO_val2014_000000000007.png",
    "000000000042.png",
    "COCO_val2014_000000000007.png",
  ]
  report = eval_files.evaluate_vqa(model, samples, batch_size=2, **FAST)
  answers = {p["question_id"]: p["prediction"] for p in report["predictions"]}
  assert list(answers) == [71, 421, 72] and "metrics" not in report
  # Questions about one image are batched together (sorted by file: 42 first, then both of 7).
  x = _load(folder, ["COCO_val2014_000000000007.png"])
  assert model.answer(x[[0, 0]], ["what color is it?", "is it large?"], **FAST) == [answers[71], answers[72]]

  humans = {
    71: [metrics.normalize_answer(answers[71])] * 10,
    421: [metrics.normalize_answer(answers[421])] * 2 + ["zebra"] * 8,
    72: ["zebra"] * 10,
  }
  apath = tmp_path / "annotations.json"
  apath.write_text(
    json.dumps(
      {
        "annotations": [
          {
            "question_id": q,
            "image_id": 0,
            "answer_type": "yes/no" if q == 72 else "other",
            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(h)],
          }
          for q, h in humans.items()
        ]
      }
    )
  )
  scored = eval_files.evaluate_vqa(
    model, annotations.load_vqa(str(qpath), str(apath), str(folder)), batch_size=2, **FAST
  )
  assert {p["question_id"]: p["prediction"] for p in scored["predictions"]} == answers
  assert {p["question_id"]: p["accuracy"] for p in scored["predictions"]} == pytest.approx({71: 1.0, 421: 0.6, 72: 0.0})
  assert scored["metrics"]["accuracy"] == pytest.approx(100 * 1.6 / 3)
  assert scored["metrics"]["accuracy_by_answer_type"] == pytest.approx({"other": 80.0, "yes/no": 0.0})
  assert scored["num_questions"] == 3 and scored["num_skipped"] == 0


# --- retrieval -----------------------------------------------------------------------------------------------


def test_retrieval_matches_brute_force_ranking(models, tmp_path):
  """4 images x 2 captions, k_test=3: each query's top 3 by ITC reranked by ITM + ITC, the rest below in index
  order. Recomputed here from transformers' ITC scores and ITM logits of all 32 pairs (the reference
  implementation; test_api checks that ours match it to 1e-5)."""
  _, model, hf = models["retrieval"]
  names = ["p.png", "q.png", "r.png", "s.png"]
  folder = _write_images(tmp_path / "images", names)
  captions = {
    "p.png": ["large red circle top left", "small red square"],
    "q.png": ["blue triangle bottom right", "a large blue triangle"],
    "r.png": ["green square top right", "yellow circle, white square"],
    "s.png": ["purple triangle top left", "small white circle bottom left"],
  }
  samples = annotations.load_captions(_coco(tmp_path / "captions.json", captions), str(folder))
  k = 3
  report = eval_files.evaluate_retrieval(model, samples, batch_size=3, k_test=k)

  texts = [c for n in names for c in captions[n]]
  ids, mask = tokenizer_lib.tokenize(model.tokenizer, [tokenizer_lib.clean_caption(t) for t in texts], 16)
  px = torch.from_numpy(_load(folder, names).transpose(0, 3, 1, 2).copy())
  ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  with torch.no_grad():
    itc = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image.numpy()  # [4, 8]
    pairs = hf(
      pixel_values=px.repeat_interleave(8, 0),
      input_ids=ids.repeat(4, 1),
      attention_mask=mask.repeat(4, 1),
      use_image_text_matching_head=True,
    ).logits_per_image.numpy()
  itm = pairs[:, 1].reshape(4, 8)

  def ranked(sim, match):  # per query: candidates in score order, top-k reranked, the rest below
    scores = np.full(sim.shape, -100.0)
    for q, top in enumerate(np.argsort(-sim, axis=1, kind="stable")[:, :k]):
      scores[q, top] = match[q, top] + sim[q, top]
    return np.argsort(-scores, axis=1, kind="stable")

  i2t, t2i = ranked(itc, itm), ranked(itc.T, itm.T)
  txt2img = np.repeat(np.arange(4), 2)
  i2t_rank = [min(list(i2t[i]).index(t) for t in (2 * i, 2 * i + 1)) for i in range(4)]
  t2i_rank = [list(t2i[t]).index(txt2img[t]) for t in range(8)]
  assert [im["top"] for im in report["images"]] == i2t[:, : eval_files.NUM_TOP].tolist()
  assert [t["top"] for t in report["texts"]] == t2i[:, : eval_files.NUM_TOP].tolist()
  assert [im["rank"] for im in report["images"]] == i2t_rank
  assert [t["rank"] for t in report["texts"]] == t2i_rank
  assert [t["text"] for t in report["texts"]] == texts and [im["texts"] for im in report["images"]] == [
    [0, 1],
    [2, 3],
    [4, 5],
    [6, 7],
  ]
  m = report["metrics"]
  for r in (1, 5, 10):
    assert m[f"img2txt_r{r}"] == np.mean(np.array(i2t_rank) < r)
    assert m[f"txt2img_r{r}"] == np.mean(np.array(t2i_rank) < r)
  assert m["img2txt_r1_itc"] == np.mean([np.argmax(itc[i]) // 2 == i for i in range(4)])
  assert m["txt2img_r1_itc"] == np.mean([np.argmax(itc[:, t]) == txt2img[t] for t in range(8)])
  assert report["num_images"] == 4 and report["num_texts"] == 8 and report["k_test"] == k


# --- errors --------------------------------------------------------------------------------------------------


def test_input_errors_are_one_sentence_naming_the_file(models, tmp_path):
  folder = _write_images(tmp_path / "images", ["a.png", "b.png"], corrupt={"a.png", "b.png"})
  good = _coco(tmp_path / "captions.json", {"a.png": ["x"], "b.png": ["y"]})
  with pytest.raises(FileNotFoundError, match=r"Image .*missing\.png \(named in .*missing\.json\) does not exist"):
    annotations.load_captions(_coco(tmp_path / "missing.json", {"missing.png": ["x"]}), str(folder))
  with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
    annotations.load_captions(str(tmp_path / "nowhere.json"), str(folder))
  with pytest.raises(FileNotFoundError, match="Image folder .*nofolder does not exist"):
    annotations.load_captions(good, str(tmp_path / "nofolder"))
  vqa_file = tmp_path / "vqa.json"
  vqa_file.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "yes"}]}]}))
  with pytest.raises(ValueError, match=r"vqa\.json is not a COCO captions file .*no key 'images'"):
    annotations.load_captions(str(vqa_file), str(folder))
  with pytest.raises(ValueError, match=r"captions\.json is not a VQAv2 questions file .*no key 'questions'"):
    annotations.load_vqa(good, None, str(folder))
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match="broken.json is not JSON"):
    annotations.load_captions(str(tmp_path / "broken.json"), str(folder))
  with pytest.raises(FileNotFoundError, match=r"No image for image_id 9 .*COCO_val2014_000000000009\.jpg"):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 9, "question": "why?"}]}))
    annotations.load_vqa(str(tmp_path / "q.json"), None, str(folder))
  # Every image corrupt: nothing to score is an error, not an empty report.
  with pytest.raises(ValueError, match="None of the 2 images could be decoded"):
    eval_files.evaluate_captions(models["opt"][1], annotations.load_captions(good, str(folder)), batch_size=2, **FAST)
  with pytest.raises(ValueError, match="None of the 2 images could be decoded"):
    eval_files.evaluate_retrieval(models["retrieval"][1], annotations.load_captions(good, str(folder)), batch_size=2)
  # A model of the wrong stage.
  with pytest.raises(ValueError, match="--task=retrieval needs a stage-1 model"):
    eval_files.evaluate_retrieval(models["opt"][1], [])
  with pytest.raises(ValueError, match="--task=vqa needs a stage-2 model"):
    eval_files.evaluate_vqa(models["retrieval"][1], [])


def test_cli_refuses_a_stage1_model_for_captioning_in_one_line(models, tmp_path):
  """Before the weights are read: the model's config.json says it is a retrieval model."""
  folder = _write_images(tmp_path / "images", ["a.png"])
  annotations = _coco(tmp_path / "captions.json", {"a.png": ["x"]})
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "blip2_jax.evaluate",
      f"--model={models['retrieval'][0]}",
      "--task=caption",
      f"--annotations={annotations}",
      f"--images={folder}",
      f"--out={tmp_path / 'report.json'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=one_device_env(),
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --task=caption needs a stage-2 model")
  assert not (tmp_path / "report.json").exists()
