"""Evaluation sets in their public file layouts: Karpathy's COCO / Flickr30k split files, NoCaps, OK-VQA and GQA.

Each test writes small files in the real layout (the keys the released files have, tiny real JPEGs), checks the
samples data/annotations.py reads from them, and scores scripted predictions against figures worked out by hand
in the docstrings. A stand-in model answers from a script (which image it was given is told by the image's mean
pixel), so the scores are known without running a network; one CLI run per new layout family (GQA through
`--task=vqa`, a Karpathy split file through `--task=retrieval --split`) runs a tiny random model end to end.
"""

import json
import math
import subprocess
import sys

from conftest import one_device_env
import ml_collections
from PIL import Image
import pytest
from test_eval_files import REPO
from test_eval_files import _save_hf

from blip2_jax import eval_files
from blip2_jax import metrics
from blip2_jax.data import annotations
from blip2_jax.data import images as images_lib

SIZE = 8  # the stand-in model's input size


def _jpegs(folder, names):
  """Solid-colour JPEGs (a different colour each), in sub-folders where a name has them -> name -> the key the
  stand-in model sees for it (its preprocessed mean pixel)."""
  keys = {}
  for i, name in enumerate(names):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16 + i, 12), (30 * i, 250 - 40 * i, 60 + 20 * i)).save(path, "JPEG")
    keys[name] = _key(images_lib.load_image(str(path), SIZE))
  assert len(set(keys.values())) == len(keys)
  return keys


def _key(image) -> str:
  return f"{image.mean():.5f}"


class _Scripted:
  """A stage-2 model that captions each image (known by its mean pixel) and answers each question as scripted."""

  kind = "opt"
  cfg = ml_collections.ConfigDict({"vit": {"image_size": SIZE}})

  def __init__(self, captions=None, answers=None):
    self.captions, self.answers = captions or {}, answers or {}

  def caption(self, images, **settings):
    return [self.captions.get(_key(x), "padding") for x in images]

  def answer(self, images, questions, **settings):
    return [self.answers[q] for q in questions]


def _write(path, data):
  path.write_text(json.dumps(data))
  return str(path)


def _cli(*args):
  r = subprocess.run(
    [sys.executable, "-m", "blip2_jax.evaluate", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=one_device_env(),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return r


# --- Karpathy's dataset_coco.json / dataset_flickr30k.json ---------------------------------------------------


def _karpathy_image(imgid, filename, split, sentences, filepath=None, cocoid=None):
  """One image of Karpathy's split files, with the keys they have (COCO: filepath and cocoid too)."""
  sentids = list(range(10 * imgid, 10 * imgid + len(sentences)))
  image = {
    "sentids": sentids,
    "imgid": imgid,
    "sentences": [
      {"tokens": raw.lower().rstrip(". ").split(), "raw": raw, "imgid": imgid, "sentid": sentid}
      for raw, sentid in zip(sentences, sentids)
    ],
    "split": split,
    "filename": filename,
  }
  if filepath is not None:
    image |= {"filepath": filepath, "cocoid": cocoid}
  return image


def _dataset_coco(tmp_path):
  images = [
    _karpathy_image(
      0, "COCO_val2014_000000391895.jpg", "test", ["A man riding a moped.", "A man on a bike."], "val2014", 391895
    ),
    _karpathy_image(1, "COCO_train2014_000000000009.jpg", "train", ["Food in a dish."], "train2014", 9),
    _karpathy_image(2, "COCO_val2014_000000522418.jpg", "val", ["A woman cutting a cake."], "val2014", 522418),
    _karpathy_image(
      3, "COCO_val2014_000000184613.jpg", "test", ["A boy and a cow.", "Cattle.", "A herd."], "val2014", 184613
    ),
    _karpathy_image(4, "COCO_val2014_000000318219.jpg", "restval", ["A computer."], "val2014", 318219),
  ]
  names = [f"{im['filepath']}/{im['filename']}" for im in images]
  _jpegs(tmp_path / "coco", names)
  return _write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"}), str(tmp_path / "coco")


def _dataset_flickr30k(tmp_path):
  images = [
    _karpathy_image(0, "1000092795.jpg", "train", ["Two young guys with shaggy hair."]),
    _karpathy_image(1, "10002456.jpg", "test", ["Several men in hard hats.", "Workers look down."]),
    _karpathy_image(2, "1000268201.jpg", "val", ["A child in a pink dress."]),
    _karpathy_image(3, "1000344755.jpg", "test", ["Someone in a blue shirt.", "A man on a ladder."]),
  ]
  _jpegs(tmp_path / "flickr30k-images", [im["filename"] for im in images])
  path = _write(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
  return path, str(tmp_path / "flickr30k-images")


def test_karpathy_split_files_give_the_images_of_one_split_with_their_raw_sentences(tmp_path):
  """COCO: images at images_dir/filepath/filename, image_id = cocoid; Flickr30k (no filepath): images_dir/filename,
  image_id = imgid. The default split is "test"; --split picks another; --limit counts within the split."""
  coco, coco_dir = _dataset_coco(tmp_path)
  samples = annotations.load_captions(coco, coco_dir)
  assert [(s["image"], s["image_id"], s["split"], s["captions"]) for s in samples] == [
    ("val2014/COCO_val2014_000000391895.jpg", 391895, "test", ["A man riding a moped.", "A man on a bike."]),
    ("val2014/COCO_val2014_000000184613.jpg", 184613, "test", ["A boy and a cow.", "Cattle.", "A herd."]),
  ]
  assert samples[0]["path"] == f"{coco_dir}/val2014/COCO_val2014_000000391895.jpg"
  assert [s["image_id"] for s in annotations.load_captions(coco, coco_dir, split="restval")] == [318219]
  assert [s["image_id"] for s in annotations.load_captions(coco, coco_dir, limit=1)] == [391895]

  flickr, flickr_dir = _dataset_flickr30k(tmp_path)
  samples = annotations.load_captions(flickr, flickr_dir)
  assert [(s["image"], s["image_id"], s["captions"]) for s in samples] == [
    ("10002456.jpg", 1, ["Several men in hard hats.", "Workers look down."]),
    ("1000344755.jpg", 3, ["Someone in a blue shirt.", "A man on a ladder."]),
  ]
  assert samples[1]["path"] == f"{flickr_dir}/1000344755.jpg"
  assert [s["image"] for s in annotations.load_captions(flickr, flickr_dir, split="val")] == ["1000268201.jpg"]


def test_karpathy_split_file_errors_name_the_file(tmp_path):
  coco, coco_dir = _dataset_coco(tmp_path)
  with pytest.raises(ValueError, match=r"dataset_coco\.json has no image of split 'testing'; its splits are test "):
    annotations.load_captions(coco, coco_dir, split="testing")
  broken = json.loads(open(coco).read())
  del broken["images"][3]["sentences"][1]["raw"]
  with pytest.raises(ValueError, match=r"broken\.json is not a Karpathy split file .*no key 'raw'"):
    annotations.load_captions(_write(tmp_path / "broken.json", broken), coco_dir)
  # COCO captions files and Karpathy-style lists have no splits: --split is refused, not ignored.
  listing = _write(tmp_path / "list.json", [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["x"]}])
  with pytest.raises(ValueError, match=r"list\.json is not a Karpathy split file .* drop --split"):
    annotations.load_captions(listing, coco_dir, split="test")
  no_filepath = json.loads(open(coco).read())
  del no_filepath["images"][0]["filepath"]  # then the image is looked for in coco/ itself
  with pytest.raises(FileNotFoundError, match=r"Image .*coco/COCO_val2014_000000391895\.jpg \(named in .*\) does not"):
    annotations.load_captions(_write(tmp_path / "nofilepath.json", no_filepath), coco_dir)


def test_cli_retrieval_on_a_karpathy_split_file(tmp_path):
  """`--task=retrieval --annotations=dataset_flickr30k.json --split=test`: the report covers the test images (2)
  and their raw sentences (4) in file order, each image's positives being its own sentences."""
  flickr, flickr_dir = _dataset_flickr30k(tmp_path)
  _, model = _save_hf("retrieval", tmp_path / "model")
  out = tmp_path / "report.json"
  _cli(
    f"--model={model}",
    "--task=retrieval",
    f"--annotations={flickr}",
    "--split=test",
    f"--images={flickr_dir}",
    f"--out={out}",
    "--batch_size=2",
    "--k_test=2",
  )
  report = json.loads(out.read_text())
  assert report["split"] == "test" and report["num_images"] == 2 and report["num_texts"] == 4
  assert [im["image"] for im in report["images"]] == ["10002456.jpg", "1000344755.jpg"]
  assert [im["texts"] for im in report["images"]] == [[0, 1], [2, 3]]
  assert [t["text"] for t in report["texts"]] == [
    "Several men in hard hats.",
    "Workers look down.",
    "Someone in a blue shirt.",
    "A man on a ladder.",
  ]
  ranks = [im["rank"] for im in report["images"]]
  assert report["metrics"]["img2txt_r1"] == sum(r < 1 for r in ranks) / 2


# --- NoCaps --------------------------------------------------------------------------------------------------


def _nocaps(tmp_path, domains: dict, references: dict):
  """nocaps_val_4500_captions.json's layout: file name -> domain and -> its reference captions."""
  keys = _jpegs(tmp_path / "nocaps_val", list(domains))
  images = [
    {
      "id": i,
      "file_name": name,
      "open_images_id": name.removesuffix(".jpg"),
      "height": 12,
      "width": 16 + i,
      "coco_url": f"https://s3.amazonaws.com/nocaps/val/{name}",
      "license": 0,
      "date_captured": "2018-11-06 11:04:33",
      "domain": domain,
    }
    for i, (name, domain) in enumerate(domains.items())
  ]
  annotations_ = [
    {"image_id": i, "id": 10 * i + j, "caption": c}
    for i, name in enumerate(domains)
    for j, c in enumerate(references[name])
  ]
  data = {"licenses": [], "info": {"version": "0.1"}, "images": images, "annotations": annotations_}
  return _write(tmp_path / "nocaps_val_4500_captions.json", data), str(tmp_path / "nocaps_val"), keys


def test_nocaps_scores_each_domain_on_its_own_and_entire(tmp_path):
  """Five images, one reference each, the caption equal to it except for B.

  CIDEr-D (test_metrics has the formula): a caption equal to its one two-word reference has cosine 1 for
  n = 1, 2 and no 3- or 4-grams, so it scores 10 x 2/4 = 5 as long as its n-grams' idf is not zero; B shares no
  n-gram with its reference: 0. The idf is log(#images scored / #images whose references have the n-gram):
    in-domain {A "red cat", B "blue dog"}: all idf log 2 -> (5 + 0) / 2 = 2.5
    near-domain {E "yellow bus"}: one image, every idf log(1/1) = 0 -> 0, though the caption is perfect
    out-domain {C "red cat", D "blue dog"}: -> (5 + 5) / 2 = 5
    entire (5 images): "red cat" is in 2 of 5 reference sets, idf log(5/2) > 0 -> (5 + 0 + 5 + 5 + 5) / 5 = 4,
      not the image-weighted mean of the domains, (2 x 2.5 + 0 + 2 x 5) / 5 = 3.
  BLEU-1 (clipped unigram precision, no brevity penalty as lengths agree): in 2/4, near 2/2, out 4/4, entire
  8/10; exact match: 1/2, 1, 1, 4/5.
  """
  domains = {
    "0013ea2087020901.jpg": "in-domain",  # A
    "00223a7ff2a2e9b0.jpg": "in-domain",  # B
    "003de7d5a1d9ac5e.jpg": "out-domain",  # C
    "004ad2b7b3c87a1c.jpg": "out-domain",  # D
    "006b5f9e5a7aeda4.jpg": "near-domain",  # E
  }
  references = dict(zip(domains, [["Red cat."], ["Blue dog."], ["Red cat."], ["Blue dog."], ["Yellow bus."]]))
  path, folder, keys = _nocaps(tmp_path, domains, references)
  samples = annotations.load_captions(path, folder)
  assert [(s["image_id"], s["domain"], s["captions"]) for s in samples] == [
    (i, d, references[n]) for i, (n, d) in enumerate(domains.items())
  ]
  captions = dict(zip(domains, ["Red cat.", "green bird", "red cat", "blue dog", "yellow bus"]))
  model = _Scripted(captions={keys[n]: c for n, c in captions.items()})
  report = eval_files.evaluate_captions(model, samples, batch_size=2)

  by_domain = report["metrics"]["by_domain"]
  assert list(by_domain) == ["in-domain", "near-domain", "out-domain", "entire"]
  expected = {
    "in-domain": (2.5, 0.5, 0.5),
    "near-domain": (0.0, 1.0, 1.0),
    "out-domain": (5.0, 1.0, 1.0),
    "entire": (4.0, 0.8, 0.8),
  }
  for domain, (cider, bleu1, exact) in expected.items():
    got = by_domain[domain]
    assert (got["cider"], got["bleu1"], got["exact_match"]) == pytest.approx((cider, bleu1, exact), abs=1e-8), domain
  assert {k: v for k, v in report["metrics"].items() if k != "by_domain"} == by_domain["entire"]
  assert [(p["domain"], p["prediction"]) for p in report["predictions"]] == [(domains[n], captions[n]) for n in domains]


def test_nocaps_file_errors(tmp_path):
  domains = {"a.jpg": "in-domain", "b.jpg": "out-domain"}
  path, folder, _ = _nocaps(tmp_path, domains, {"a.jpg": ["x"], "b.jpg": ["y"]})
  data = json.loads(open(path).read())
  data["images"][1]["domain"] = "far-domain"
  with pytest.raises(ValueError, match=r"odd\.json: image 1 has domain 'far-domain'; NoCaps's are in-domain, near"):
    annotations.load_captions(_write(tmp_path / "odd.json", data), folder)
  del data["images"][1]["domain"]
  with pytest.raises(ValueError, match=r'mixed\.json: some images have a "domain" \(NoCaps\) and some not'):
    annotations.load_captions(_write(tmp_path / "mixed.json", data), folder)


# --- OK-VQA --------------------------------------------------------------------------------------------------


def _okvqa_answers(*pairs):
  """OK-VQA's 10 answers: 5 annotators, each answer listed twice, with its stemmed "answer" and "raw_answer"."""
  answers = []
  for raw, stemmed in pairs:
    for _ in range(2):
      answers.append({"answer_id": len(answers) + 1, "raw_answer": raw, "answer_confidence": "yes", "answer": stemmed})
  return answers


def test_okvqa_files_and_vqa_accuracy_by_question_type(tmp_path):
  """OK-VQA in its released layout (OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json;
  COCO val2014 images found by image_id). The human answers are the stemmed "answer" fields, the prediction is
  normalised but not stemmed, as the official evaluation does. VQA accuracy = the mean over the 10 leave-one-out
  subsets of min(#matches among the other 9 / 3, 1):
    q1 "Race" -> "race", 4 of 10 humans: every subset keeps >= 3 -> 1.0
    q2 "A car." -> "car", 2 of 10: 2 subsets keep 1 (1/3), 8 keep 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    q3 "racing" -> "racing": the stemmed answers say "race" -> 0.0
  accuracy (1 + 0.6 + 0) / 3 = 53.33%; question_type "eight" (q1, q2) 80%, "one" (q3) 0%; answer_type "other".
  """
  keys = _jpegs(tmp_path / "val2014", ["COCO_val2014_000000297147.jpg", "COCO_val2014_000000393225.jpg"])
  questions = {
    "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"},
    "data_subtype": "val2014",
    "task_type": "Open-Ended",
    "questions": [
      {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475},
      {"image_id": 393225, "question": "What is parked at the curb?", "question_id": 3932255},
      {"image_id": 297147, "question": "What kind of event is this?", "question_id": 2971476},
    ],
    "info": {"year": 2019, "version": "1.0", "description": "This is v1.0 of the OK-VQA dataset."},
    "data_type": "mscoco",
  }
  answers = {
    2971475: (
      "eight",
      _okvqa_answers(
        ("racing", "race"), ("race", "race"), ("motocross", "motocross"), ("ride", "ride"), ("riding", "ride")
      ),
    ),
    3932255: (
      "eight",
      _okvqa_answers(("car", "car"), ("taxi", "taxi"), ("cab", "cab"), ("taxi cab", "taxi cab"), ("sedan", "sedan")),
    ),
    2971476: (
      "one",
      _okvqa_answers(
        ("racing", "race"),
        ("races", "race"),
        ("race", "race"),
        ("motorbike race", "motorbike race"),
        ("sport", "sport"),
      ),
    ),
  }
  annotations_file = {
    "license": questions["license"],
    "data_subtype": "val2014",
    "annotations": [
      {
        "image_id": qid // 10,
        "answer_type": "other",
        "question_type": question_type,
        "question_id": qid,
        "answers": human,
        "confidence": 3,
      }
      for qid, (question_type, human) in answers.items()
    ],
    "info": questions["info"],
    "data_type": "mscoco",
  }
  qpath = _write(tmp_path / "OpenEnded_mscoco_val2014_questions.json", questions)
  apath = _write(tmp_path / "mscoco_val2014_annotations.json", annotations_file)
  samples = annotations.load_vqa(qpath, apath, str(tmp_path / "val2014"))
  assert [(s["question_id"], s["image"], s["question_type"], s["answer_type"]) for s in samples] == [
    (2971475, "COCO_val2014_000000297147.jpg", "eight", "other"),
    (3932255, "COCO_val2014_000000393225.jpg", "eight", "other"),
    (2971476, "COCO_val2014_000000297147.jpg", "one", "other"),
  ]
  assert samples[0]["answers"] == ["race"] * 4 + ["motocross"] * 2 + ["ride"] * 4
  assert set(keys) == {s["image"] for s in samples}

  model = _Scripted(
    answers={
      "What sport can you use this for?": "Race",
      "What is parked at the curb?": "A car.",
      "What kind of event is this?": "racing",
    }
  )
  report = eval_files.evaluate_vqa(model, samples, batch_size=2)
  assert report["scoring"] == "vqa_accuracy"
  assert {p["question_id"]: p["accuracy"] for p in report["predictions"]} == pytest.approx(
    {2971475: 1.0, 3932255: 0.6, 2971476: 0.0}
  )
  m = report["metrics"]
  assert m["accuracy"] == pytest.approx(100 * 1.6 / 3)
  assert m["accuracy_by_answer_type"] == pytest.approx({"other": 100 * 1.6 / 3})
  assert m["accuracy_by_question_type"] == pytest.approx({"eight": 80.0, "one": 0.0})


# --- GQA -----------------------------------------------------------------------------------------------------


def _gqa_question(image_id, question, answer, structural, semantic, full_answer):
  """One entry of testdev_balanced_questions.json, with the keys the released file has."""
  return {
    "semantic": [{"operation": "select", "dependencies": [], "argument": "scene"}],
    "entailed": [],
    "equivalent": [],
    "question": question,
    "imageId": image_id,
    "isBalanced": True,
    "groups": {"global": None, "local": "01-scene"},
    "answer": answer,
    "semanticStr": "select: scene->verify place: outdoors",
    "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
    "types": {"detailed": "place", "semantic": semantic, "structural": structural},
    "fullAnswer": full_answer,
  }


def _gqa(tmp_path):
  _jpegs(tmp_path / "images", ["n161313.jpg", "n235859.jpg", "n3002.jpg"])
  data = {
    "20968379": _gqa_question("n161313", "Is it an outdoors scene?", "no", "verify", "global", "It is indoors."),
    "201640614": _gqa_question(
      "n235859", "Which side is the cup on?", "left", "query", "rel", "The cup is on the left."
    ),
    "20507448": _gqa_question("n161313", "What color is the wall?", "white", "query", "attr", "The wall is white."),
    "2087577": _gqa_question(
      "n3002", "Is the table or the chair wooden?", "table", "choose", "attr", "The table is wooden."
    ),
  }
  return _write(tmp_path / "testdev_balanced_questions.json", data), str(tmp_path / "images")


def test_gqa_questions_file_and_exact_match_by_structural_type(tmp_path):
  """testdev_balanced_questions.json (a dict question id -> question) is told from a VQAv2 file by its layout;
  images are images_dir/<imageId>.jpg. Exact match after the VQA normalisation of the prediction (punctuation,
  lower case, articles, number words), the answer as written:
    "No." -> "no" = "no": 1;  "on the left" -> "on left" != "left": 0;  "White" -> "white": 1;
    "a table" -> "table": 1.
  accuracy 3/4 = 75%; structural: verify 1/1 = 100%, query 1/2 = 50%, choose 100%; semantic: global 100%,
  rel 0%, attr 2/2 = 100%.
  """
  path, folder = _gqa(tmp_path)
  samples = annotations.load_vqa(path, None, folder)
  assert [(s["question_id"], s["image_id"], s["image"], s["answer"], s["structural_type"]) for s in samples] == [
    ("20968379", "n161313", "n161313.jpg", "no", "verify"),
    ("201640614", "n235859", "n235859.jpg", "left", "query"),
    ("20507448", "n161313", "n161313.jpg", "white", "query"),
    ("2087577", "n3002", "n3002.jpg", "table", "choose"),
  ]
  assert samples[0]["path"] == f"{folder}/n161313.jpg" and samples[0]["question"] == "Is it an outdoors scene?"
  assert [s["question_id"] for s in annotations.load_vqa(path, None, folder, limit=2)] == ["20968379", "201640614"]

  model = _Scripted(
    answers={
      "Is it an outdoors scene?": "No.",
      "Which side is the cup on?": "on the left",
      "What color is the wall?": "White",
      "Is the table or the chair wooden?": "a table",
    }
  )
  report = eval_files.evaluate_vqa(model, samples, batch_size=3)
  assert report["scoring"] == "exact_match"
  assert [(p["question_id"], p["answer"], p["accuracy"]) for p in report["predictions"]] == [
    ("20968379", "no", 1.0),
    ("201640614", "left", 0.0),
    ("20507448", "white", 1.0),
    ("2087577", "table", 1.0),
  ]
  m = report["metrics"]
  assert m["accuracy"] == 75.0
  assert m["accuracy_by_structural_type"] == {"verify": 100.0, "query": 50.0, "choose": 100.0}
  assert m["accuracy_by_semantic_type"] == {"global": 100.0, "rel": 0.0, "attr": 100.0}


def test_gqa_questions_without_answers_give_gqa_results_file(tmp_path):
  """The challenge's question files have no "answer": no score, and the results file is GQA's format."""
  path, folder = _gqa(tmp_path)
  data = json.loads(open(path).read())
  for entry in data.values():
    del entry["answer"]
  samples = annotations.load_vqa(_write(tmp_path / "submission_all_questions.json", data), None, folder)
  model = _Scripted(answers={q["question"]: f"answer {i}" for i, q in enumerate(data.values())})
  report = eval_files.evaluate_vqa(model, samples, batch_size=2)
  assert "metrics" not in report and "scoring" not in report and samples[0]["layout"] == "gqa"
  assert eval_files.vqa_results_file(report, "gqa") == [
    {"questionId": "20968379", "prediction": "answer 0"},
    {"questionId": "201640614", "prediction": "answer 1"},
    {"questionId": "20507448", "prediction": "answer 2"},
    {"questionId": "2087577", "prediction": "answer 3"},
  ]


def test_gqa_accuracy_is_exact_match_of_the_normalised_prediction():
  """Only the prediction is normalised (as LAVIS's GQA task): an answer "the table" can never be matched."""
  scored = metrics.gqa_accuracy(
    {1: "Two", 2: "yes!", 3: "the table", 4: "tables"}, {1: "2", 2: "yes", 3: "the table", 4: "table"}
  )
  assert scored["per_question"] == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}
  assert math.isclose(scored["accuracy"], 50.0)
  with pytest.raises(ValueError, match="in answers but not in predictions"):
    metrics.gqa_accuracy({1: "yes"}, {1: "yes", 2: "no"})
  with pytest.raises(ValueError, match=r"answers\[1\] must be one answer string"):
    metrics.gqa_accuracy({1: "yes"}, {1: ["yes"]})


def test_gqa_file_errors_name_the_file(tmp_path):
  path, folder = _gqa(tmp_path)
  with pytest.raises(ValueError, match=r"testdev_balanced_questions\.json is a GQA questions file, which holds its"):
    annotations.load_vqa(path, str(tmp_path / "answers.json"), folder)
  data = json.loads(open(path).read())
  del data["201640614"]["question"]
  with pytest.raises(ValueError, match=r"noquestion\.json is not a GQA questions file .*no key 'question'"):
    annotations.load_vqa(_write(tmp_path / "noquestion.json", data), None, folder)
  data = json.loads(open(path).read())
  data["2087577"]["imageId"] = "n404"
  with pytest.raises(FileNotFoundError, match=r"Image .*images/n404\.jpg \(named in .*\) does not exist"):
    annotations.load_vqa(_write(tmp_path / "noimage.json", data), None, folder)
  del data["2087577"]["answer"]
  with pytest.raises(ValueError, match=r"noanswer\.json: some of its questions have an answer and some not"):
    annotations.load_vqa(_write(tmp_path / "noanswer.json", data), None, folder)


def test_cli_gqa_testdev_through_task_vqa(tmp_path):
  """`--task=vqa --questions=testdev_balanced_questions.json` with no --annotations: the report is scored by exact
  match (a random model's answers: each question's score is whether its normalised answer equals the file's)."""
  path, folder = _gqa(tmp_path)
  _, model = _save_hf("opt", tmp_path / "model")
  out = tmp_path / "report.json"
  _cli(
    f"--model={model}",
    "--task=vqa",
    f"--questions={path}",
    f"--images={folder}",
    f"--out={out}",
    "--batch_size=4",
    "--num_beams=1",
    "--max_new_tokens=3",
  )
  report = json.loads(out.read_text())
  assert report["scoring"] == "exact_match" and report["num_questions"] == 4
  rows = report["predictions"]
  assert [p["question_id"] for p in rows] == ["20968379", "201640614", "20507448", "2087577"]
  assert [p["answer"] for p in rows] == ["no", "left", "white", "table"]
  assert [p["accuracy"] for p in rows] == [
    float(metrics.normalize_answer(p["prediction"]) == p["answer"]) for p in rows
  ]
  assert report["metrics"]["accuracy"] == pytest.approx(100 * sum(p["accuracy"] for p in rows) / 4)
  assert set(report["metrics"]["accuracy_by_structural_type"]) == {"verify", "query", "choose"}
