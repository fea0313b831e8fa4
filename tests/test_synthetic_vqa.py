"""Tests for blip2_jax.data.synthetic_vqa: every answer right for its scene, the split, the ids, equal shares of
question types, and the vocabularies that must cover every question and answer (CPU, a few seconds).

The demo LLM answering held-out questions is tested in test_demo_llm.py, on the pretraining its other tests share.
"""

import collections
import functools
import io
import re

import ml_collections
import numpy as np
from PIL import Image
import pytest

from blip2_jax import demo_llm
from blip2_jax import metrics
from blip2_jax import state as state_lib
from blip2_jax.data import pipeline
from blip2_jax.data import synthetic_shapes as shapes
from blip2_jax.data import synthetic_vqa as vqa
from blip2_jax.data import tokenizer as tokenizer_lib
from configs import stage1

NUM_TRAIN, NUM_TEST, PER_IMAGE = 300, 100, 2


def make_cfg(data_dir, name="synthetic_vqa"):
  return ml_collections.ConfigDict(
    dict(name=name, data_dir=str(data_dir), builder_kwargs=dict(num_train=NUM_TRAIN, num_test=NUM_TEST))
  )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def read(data_dir, split, num_train=NUM_TRAIN) -> list[dict]:
  """The split's examples, through the pipeline's source (so by the name registered in SHIPPED_BUILDERS)."""
  cfg = make_cfg(data_dir)
  cfg.builder_kwargs.num_train = num_train
  source = pipeline.get_source(cfg, split)
  text = lambda v: v.decode() if isinstance(v, bytes) else v
  out = []
  for i in range(len(source)):
    ex = dict(source[i])
    for key in ("question", "question_type"):
      ex[key] = text(ex[key])
    ex["answers"] = [text(a) for a in ex["answers"]]
    ex["pixels"] = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"))  # the source gives PNG bytes
    out.append(ex)
  return out


@pytest.fixture(scope="module")
def splits(data_dir):
  return {split: read(data_dir, split) for split in ("train", "test")}


@functools.cache
def split_scenes():
  return vqa.split_scenes(NUM_TRAIN, NUM_TEST, num_objects=4, seed=0)  # a permutation of 36^4: cached


def scene_of(example) -> list:
  """The scene of an example's image, from its image_id and the generation arguments alone."""
  scenes = split_scenes()
  image_id = int(example["image_id"])
  index = scenes["train"][image_id] if image_id < NUM_TRAIN else scenes["test"][image_id - NUM_TRAIN]
  return shapes.combination(int(index), 4)


def true_answer(question: str, scene) -> str:
  """The answer worked out from the question's words, independently of synthetic_vqa's own functions."""
  objects = {shapes.QUADRANTS[q]: obj for q, obj in scene}
  if m := re.fullmatch(r"what (colour|shape|size) is the object at the (.+)\?", question):
    size, colour, shape = objects[m.group(2)]
    return {"size": size, "colour": colour, "shape": shape}[m.group(1)]
  if m := re.fullmatch(r"where is the (\w+) (\w+) (\w+)\?", question):
    (where,) = [q for q, obj in objects.items() if obj == m.groups()]  # exactly one: unambiguous
    return where
  if m := re.fullmatch(r"how many (\w+)s are there\?", question):
    return str(sum(obj[2] == m.group(1) for obj in objects.values()))
  if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
    return str(sum(obj[1] == m.group(1) for obj in objects.values()))
  raise AssertionError(f"Not one of the templates: {question!r}")


# --- the examples ------------------------------------------------------------------------------------------------


def test_every_answer_is_right_for_its_scene_and_its_image_is_the_scenes_picture(splits):
  for split, examples in splits.items():
    assert len(examples) == PER_IMAGE * (NUM_TRAIN if split == "train" else NUM_TEST)
    for ex in examples:
      scene = scene_of(ex)
      assert ex["answers"] == [true_answer(ex["question"], scene)] * 10, (ex["question"], shapes.caption(scene))
      assert ex["question_type"] in vqa.QUESTION_TYPES
      assert ex["question"] == ex["question"].lower()
  # The picture is synthetic_shapes' drawing of the scene (the first few: drawing is the slow part).
  for ex in splits["test"][:20:PER_IMAGE]:
    i = int(ex["image_id"]) - NUM_TRAIN
    drawn = shapes.draw(scene_of(ex), 48, np.random.default_rng([0, 1, i]))
    np.testing.assert_array_equal(ex["pixels"], drawn)


def test_position_questions_ask_about_an_object_that_occurs_once(splits):
  asked = 0
  for ex in splits["train"] + splits["test"]:
    if ex["question_type"] == "position":
      triple = tuple(re.fullmatch(r"where is the (\w+) (\w+) (\w+)\?", ex["question"]).groups())
      assert [obj for _, obj in scene_of(ex)].count(triple) == 1
      asked += 1
  assert asked > 0
  # A scene whose objects all occur twice gets no position question.
  twice = [(0, ("large", "red", "circle")), (1, ("small", "blue", "square"))] * 2
  twice = [(q, obj) for q, (_, obj) in enumerate(twice)]
  assert not vqa.can_ask(twice, "position")
  for i in range(10):
    types = vqa.question_types(i, twice, 5, seed=0, stream=0)
    assert "position" not in types and len(types) == 5
    assert len({q for _, q, _ in vqa.image_questions(twice, i, 5, seed=0, stream=0)}) == 5  # all distinct


def test_question_types_come_in_equal_shares(splits):
  # 300 and 100 images: blocks of 5 images, each type PER_IMAGE times a block.
  for examples in splits.values():
    counts = collections.Counter(ex["question_type"] for ex in examples)
    unaskable = sum(not vqa.can_ask(scene_of(ex), "position") for ex in examples[::PER_IMAGE])
    share = len(examples) // len(vqa.QUESTION_TYPES)
    assert counts["position"] >= share - unaskable and sum(counts.values()) == len(examples), counts
    assert all(abs(counts[t] - share) <= unaskable for t in vqa.QUESTION_TYPES), counts
  # Over many images with a position question askable: exactly equal shares, distinct types within an image.
  scene = shapes.combination(123_456, 4)
  assert vqa.can_ask(scene, "position")
  for k in range(1, 6):
    per_image = [vqa.question_types(i, scene, k, seed=3, stream=0) for i in range(500)]
    assert all(len(set(types)) == k for types in per_image)
    assert set(collections.Counter(t for types in per_image for t in types).values()) == {100 * k}


def test_test_scenes_are_never_training_scenes():
  scenes = split_scenes()
  assert not set(scenes["test"].tolist()) & set(scenes["train"].tolist())
  assert len(set(scenes["test"].tolist())) == NUM_TEST
  # The same scenes as synthetic_shapes' splits.
  test, train = shapes.split_combinations(NUM_TEST, 0, 4)
  np.testing.assert_array_equal(scenes["test"], test)
  assert set(scenes["train"].tolist()) <= set(train.tolist())


def test_question_ids_unique_and_image_ids_shared_by_the_questions_of_one_image(splits):
  examples = splits["train"] + splits["test"]
  assert len({int(ex["question_id"]) for ex in examples}) == len(examples)
  by_image = collections.defaultdict(list)
  for ex in examples:
    by_image[int(ex["image_id"])].append(ex)
  assert sorted(by_image) == list(range(NUM_TRAIN + NUM_TEST))  # train 0.., test NUM_TRAIN..
  for group in by_image.values():
    assert len(group) == PER_IMAGE
    assert len({ex["question"] for ex in group}) == PER_IMAGE  # never the same question twice
    assert len({ex["question_type"] for ex in group}) == PER_IMAGE
    assert all(ex["image"] == group[0]["image"] for ex in group)


def test_same_images_as_synthetic_shapes_and_deterministic(data_dir, splits):
  """With the same arguments, image i is synthetic_shapes' image i (whose caption describes it); a build with more
  images starts with the same examples."""
  source = pipeline.get_source(make_cfg(data_dir, name="synthetic_shapes"), "test")
  for ex in splits["test"][: 10 * PER_IMAGE : PER_IMAGE]:
    caption_example = source[int(ex["image_id"]) - NUM_TRAIN]
    pixels = np.asarray(Image.open(io.BytesIO(caption_example["image"])).convert("RGB"))
    np.testing.assert_array_equal(ex["pixels"], pixels)
    caption = caption_example["caption"]
    assert vqa.parse_caption(caption.decode() if isinstance(caption, bytes) else caption) == scene_of(ex)
  smaller = read(data_dir, "train", num_train=50)
  assert [ex["question"] for ex in smaller] == [ex["question"] for ex in splits["train"][: len(smaller)]]


def test_answers_score_one_or_zero_with_the_vqa_metric(splits):
  examples = splits["test"]
  answers = {int(ex["question_id"]): ex["answers"] for ex in examples}
  right = {int(ex["question_id"]): ex["answers"][0] for ex in examples}
  assert metrics.vqa_accuracy(right, answers)["accuracy"] == 100.0
  wrong = {qid: "4" if a[0] != "4" else "3" for qid, a in answers.items()}
  assert metrics.vqa_accuracy(wrong, answers)["accuracy"] == 0.0
  # A count predicted in words scores as its digits (the official normalisation), so the digits are the answers.
  count = next(ex for ex in examples if ex["question_type"] == "count")
  word = ["zero", "one", "two", "three", "four"][int(count["answers"][0])]
  assert metrics.vqa_accuracy({0: word}, {0: count["answers"]})["accuracy"] == 100.0


def test_user_errors_are_one_line(tmp_path):
  with pytest.raises(
    ValueError, match=r"^questions_per_image must be in \[1, 5\] \(one question of each type at most\); got 6\.$"
  ):
    vqa.SyntheticVqa(data_dir=str(tmp_path), questions_per_image=6)
  with pytest.raises(
    ValueError, match=r"^Unknown question type 'why'; choose one of colour, shape, size, position, count\.$"
  ):
    vqa.question("why", 0)
  with pytest.raises(ValueError, match=r"^Not a synthetic_shapes caption: 'a cat'\.$"):
    vqa.parse_caption("a cat")


# --- vocabularies ------------------------------------------------------------------------------------------------


def test_vocabulary_lists_the_new_words_and_demo_vqa_vocab_extends_demo_vocab():
  words = {w for text in vqa.all_questions() + vqa.all_answers() for w in text.replace("?", " ?").split()}
  assert set(vqa.vocabulary()) == words - set(shapes.vocabulary())
  with open(tokenizer_lib.demo_vocab_path()) as f:
    demo = f.read().splitlines()
  with open(tokenizer_lib.demo_vocab_path("demo_vqa")) as f:
    demo_vqa = f.read().splitlines()
  assert len(demo) == 22  # the stage-1 demo's Q-Former vocab is unchanged
  assert demo_vqa == demo + vqa.vocabulary()


def test_every_question_and_answer_tokenises_without_unknown_tokens():
  texts = vqa.all_questions() + vqa.all_answers()
  config = stage1.get_config("tiny")
  config.tokenizer = "demo_vqa"  # resolved by state.load_tokenizer, as "demo" is
  bert = state_lib.load_tokenizer(config)
  assert len(bert) == 22 + len(vqa.vocabulary()) + 1  # + [DEC]
  for text in texts:
    ids = bert(text).input_ids
    assert bert.unk_token_id not in ids, text
    assert len(ids) == 2 + len(text.replace("?", " ?").split())  # one WordPiece per word
  config.tokenizer = "demo"
  assert any(
    state_lib.load_tokenizer(config).unk_token_id in state_lib.load_tokenizer(config)(t).input_ids for t in texts
  )
  for kind in demo_llm.KINDS:
    tok = demo_llm.make_tokenizer(kind)
    for question in vqa.all_questions():
      prompt = demo_llm.vqa_prompt(kind, question)
      ids = tok(prompt).input_ids
      assert tok.unk_token_id not in ids, prompt
      assert tok.decode(ids, skip_special_tokens=True) == prompt.lower()
    for answer in vqa.all_answers():
      assert tok.unk_token_id not in tok(answer).input_ids, answer
