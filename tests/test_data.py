"""Tests for blip2_jax.data: the synthetic dataset, the tokenizer and the grain pipeline (CPU, ~15 s)."""

import io
import json
import logging

import ml_collections
import numpy as np
from PIL import Image
import pytest

from blip2_jax.data import images as images_lib
from blip2_jax.data import pipeline
from blip2_jax.data import synthetic_shapes as shapes
from blip2_jax.data import tokenizer as tokenizer_lib
from blip2_jax.models import vit as vit_lib

NUM_TRAIN, NUM_TEST = 300, 100


def make_cfg(data_dir, **overrides):
  fields = dict(
    name="synthetic_shapes",
    data_dir=str(data_dir),
    builder_kwargs=dict(num_train=NUM_TRAIN, num_test=NUM_TEST),
    train_split="train",
    eval_split="test",
    image_size=48,
    crop_scale=(0.5, 1.0),
    flip=True,
    max_text_len=24,
    num_threads=2,
    prefetch=4,
    eval_max_examples=None,
  )
  return ml_collections.ConfigDict({**fields, **overrides})  # replaces builder_kwargs, never merges


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  pipeline.get_source(make_cfg(path), "train")  # generates once for the whole module
  return path


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer(tokenizer_lib.demo_vocab_path())


def raw_examples(data_dir, split):
  source = pipeline.get_source(make_cfg(data_dir), split)
  return [source[i] for i in range(len(source))]


def read_scene(pixels: np.ndarray) -> set[str]:
  """The caption clauses a uint8 image shows, worked out from its pixels alone."""
  colours = {rgb: name for name, rgb in shapes.COLOURS.items()}
  half = pixels.shape[0] // 2
  clauses = set()
  for q, quadrant in enumerate(shapes.QUADRANTS):
    tile = pixels[(q // 2) * half : (q // 2 + 1) * half, (q % 2) * half : (q % 2 + 1) * half]
    on = tile.any(-1)
    if not on.any():
      continue
    found = {tuple(int(c) for c in rgb) for rgb in tile[on]}
    assert len(found) == 1, f"{quadrant}: several colours {found}"
    ys, xs = np.nonzero(on)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = on.sum() / box  # square 1, circle ~0.8, triangle ~0.55
    shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
    size = "large" if box > 12 * 12 else "small"
    clauses.add(f"{size} {colours[found.pop()]} {shape} {quadrant}")
  return clauses


def decode(example) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(example["image"])).convert("RGB"))


# --------------------------------------------------------------------------------------- synthetic_shapes


def test_test_captions_are_distinct_and_never_in_train(data_dir):
  train = {ex["caption"] for ex in raw_examples(data_dir, "train")}
  test = [ex["caption"] for ex in raw_examples(data_dir, "test")]
  assert len(test) == NUM_TEST and len(set(test)) == NUM_TEST
  assert not train & set(test)
  assert len(train) > NUM_TRAIN // 2  # train is varied, not one caption repeated


def test_caption_describes_image(data_dir):
  for split in ("train", "test"):
    for ex in raw_examples(data_dir, split):
      pixels = decode(ex)
      assert pixels.shape == (48, 48, 3)
      caption = ex["caption"].decode()
      assert read_scene(pixels) == set(caption.split(", ")), caption


def test_image_ids_unique(data_dir):
  ids = [ex["image_id"] for split in ("train", "test") for ex in raw_examples(data_dir, split)]
  assert len(set(ids)) == NUM_TRAIN + NUM_TEST


def test_generation_is_deterministic(data_dir, tmp_path):
  again = pipeline.get_source(make_cfg(tmp_path), "test")
  first = raw_examples(data_dir, "test")
  assert all(
    again[i]["image"] == first[i]["image"] and again[i]["caption"] == first[i]["caption"] for i in range(len(first))
  )
  other_seed = pipeline.get_source(
    make_cfg(tmp_path, builder_kwargs=dict(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=1)), "test"
  )
  assert [other_seed[i]["caption"] for i in range(10)] != [ex["caption"] for ex in first[:10]]


def test_demo_vocab_covers_every_caption_within_the_demo_text_length(data_dir, tok):
  from configs import stage1

  max_len = stage1.get_config("demo").data.max_text_len
  for ex in raw_examples(data_dir, "train") + raw_examples(data_dir, "test"):
    ids = tok(ex["caption"].decode()).input_ids
    assert tok.unk_token_id not in ids and len(ids) <= max_len


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_adds_dec_and_pads(tok, tmp_path):
  assert tok.bos_token == "[DEC]" and tok.bos_token_id == len(tok) - 1
  assert tok.convert_tokens_to_ids("[PAD]") == 0
  ids, mask = tokenizer_lib.tokenize(tok, ["a red circle", "a large red circle top left, " * 3], 8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == np.int32
  assert ids[0].tolist() == [
    tok.cls_token_id,
    *tok.convert_tokens_to_ids(["a", "red", "circle"]),
    tok.sep_token_id,
    0,
    0,
    0,
  ]
  assert mask[0].tolist() == [1] * 5 + [0] * 3
  assert ids[1, 0] == tok.cls_token_id and ids[1, -1] == tok.sep_token_id and mask[1].all()  # truncated

  # A directory in the bert-base-uncased layout gives the same tokenizer, with [DEC] not added twice.
  tok.save_pretrained(tmp_path)
  again = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert len(again) == len(tok) and again.bos_token_id == tok.bos_token_id
  assert (tokenizer_lib.tokenize(again, ["a red circle"], 8)[0] == ids[:1]).all()


def test_missing_tokenizer_path(tmp_path):
  missing = str(tmp_path / "no_such_tokenizer")
  with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
    tokenizer_lib.load_tokenizer(missing)


def test_clean_caption():
  assert tokenizer_lib.clean_caption('A  Dog (brown) runs!\n "fast"; ok.') == "a dog brown runs fast ok"
  assert tokenizer_lib.clean_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


# ------------------------------------------------------------------------------------------------- pipeline


def test_train_batch_shapes_and_normalisation(data_dir, tok):
  batch = next(pipeline.make_train_iterator(make_cfg(data_dir), tok, global_batch_size=8, seed=0))
  assert set(batch) == {"image", "text_ids", "text_mask"}
  # uint8 pixels: the ViT normalises them on the accelerator (models/vit.py).
  assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.uint8
  assert batch["text_ids"].shape == batch["text_mask"].shape == (8, 24)
  assert batch["text_ids"].dtype == batch["text_mask"].dtype == np.int32
  assert (batch["image"].reshape(-1, 3).min(0) == 0).all()  # the black background
  lo, hi = -images_lib.CLIP_MEAN / images_lib.CLIP_STD, (1 - images_lib.CLIP_MEAN) / images_lib.CLIP_STD
  pixels = np.asarray(vit_lib.normalize_pixels(batch["image"])).reshape(-1, 3)
  assert (pixels >= lo - 1e-5).all() and (pixels <= hi + 1e-5).all()
  assert np.allclose(pixels.min(0), lo, atol=1e-5)  # the black background maps to -mean/std
  assert (batch["text_ids"][:, 0] == tok.cls_token_id).all()
  last = batch["text_mask"].sum(1) - 1
  assert (batch["text_ids"][np.arange(8), last] == tok.sep_token_id).all()


def test_iterator_state_round_trip(data_dir, tok):
  cfg = make_cfg(data_dir)
  it = pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=3)
  for _ in range(25):  # past the end of the first epoch (300 / 16 = 18.75 batches)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  restored = pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=3)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert not np.array_equal(expected[0]["image"], expected[1]["image"])


def test_processes_read_their_rows_of_one_global_batch_and_resume_on_another_count(data_dir, tok):
  """N processes' batches, stacked, are the one-process batch (so a run's data does not depend on the host
  count), and the position saved by either resumes in the other (past an epoch boundary)."""
  cfg = make_cfg(data_dir)

  def iterators(count):
    return [
      pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=3, process_index=p, process_count=count)
      for p in range(count)
    ]

  def stacked(its):
    parts = [next(it) for it in its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  (one,), two = iterators(1), iterators(2)
  for _ in range(21):  # past the end of the first epoch (300 / 16 = 18.75 batches)
    want, got = next(one), stacked(two)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  for written, resumed in ((two[0], iterators(1)), (one, iterators(2))):
    state = json.loads(json.dumps(written.get_state()))
    assert state["global_batches"] == 21
    for it in resumed:
      it.set_state(state)
    want, got = next(one_at(cfg, tok, 21)), stacked(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def one_at(cfg, tok, batches: int) -> dict:
  """A one-process iterator that has drawn `batches` batches from the start."""
  it = pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=3)
  for _ in range(batches):
    next(it)
  return it


def test_seed_changes_order(data_dir, tok):
  a = next(pipeline.make_train_iterator(make_cfg(data_dir), tok, global_batch_size=8, seed=0))
  b = next(pipeline.make_train_iterator(make_cfg(data_dir), tok, global_batch_size=8, seed=1))
  assert not np.array_equal(a["text_ids"], b["text_ids"])


def test_process_shares_are_disjoint_and_cover_the_data(data_dir, tok):
  # The test split's captions are all distinct, so a caption identifies its example.
  cfg = make_cfg(data_dir, train_split="test", flip=False)
  shares = []
  for process_index in range(2):
    it = pipeline.make_train_iterator(
      cfg, tok, global_batch_size=NUM_TEST, seed=0, process_index=process_index, process_count=2
    )
    shares.append({tuple(row) for row in next(it)["text_ids"]})  # one batch = one epoch of the share
  everything = {
    tuple(row)
    for row in tokenizer_lib.tokenize(tok, [ex["caption"].decode() for ex in raw_examples(data_dir, "test")], 24)[0]
  }
  assert len(shares[0]) == len(shares[1]) == NUM_TEST // 2
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == everything


def test_batch_size_must_divide_by_process_count(data_dir, tok):
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(make_cfg(data_dir), tok, global_batch_size=9, seed=0, process_count=2)


def raw_train_example(data_dir) -> dict:
  """The first test example as the training preprocessing sees it (image bytes, its place for the warnings)."""
  ex = raw_examples(data_dir, "test")[0]
  return {**ex, "caption": ex["caption"].decode(), "_where": ("test", 0)}


def test_flip_mirrors_image_and_swaps_left_right(data_dir):
  ex = raw_train_example(data_dir)
  flip_cfg = make_cfg(data_dir, crop_scale=(1.0, 1.0))
  keep_cfg = make_cfg(data_dir, crop_scale=(1.0, 1.0), flip=False)
  flipped = 0
  for seed in range(16):
    out = pipeline.train_preprocess(ex, np.random.default_rng(seed), flip_cfg)
    plain = pipeline.train_preprocess(ex, np.random.default_rng(seed), keep_cfg)
    assert plain["caption"] == ex["caption"]
    if out["caption"] == ex["caption"]:
      np.testing.assert_array_equal(out["image"], plain["image"])
      continue
    flipped += 1
    np.testing.assert_array_equal(out["image"], plain["image"][:, ::-1])
    assert out["caption"] == pipeline.swap_left_right(ex["caption"]) != ex["caption"]
    # ...and the swapped caption describes the mirrored picture.
    assert read_scene(out["image"]) == set(out["caption"].split(", "))
  assert 0 < flipped < 16


def test_t5_prompt_fraction_mixes_prompt_to_caption_examples_with_prefix_lm_splits(data_dir, tok):
  ex = raw_train_example(data_dir)
  caption = tokenizer_lib.clean_caption(ex["caption"])
  for fraction in (0.0, 0.5):
    cfg = make_cfg(data_dir, flip=False, prompt="a photo of", prompt_fraction=fraction)
    outs = [pipeline.train_preprocess(ex, np.random.default_rng(seed), cfg, "t5") for seed in range(200)]
    prompted = [o for o in outs if o["prefix"] == "a photo of"]
    assert all(o["suffix"] == caption for o in prompted)
    # The others are prefix-LM splits: the caption cut at a word boundary, at least one word after the cut.
    for o in outs:
      if o["prefix"] != "a photo of":
        assert o["suffix"] and " ".join(filter(None, (o["prefix"], o["suffix"]))) == caption
    assert (60 < len(prompted) < 140) if fraction else not prompted

  with pytest.raises(ValueError, match="prompt_fraction=0.5 is for encoder-decoder LLMs.*data.prompt before every"):
    pipeline.make_train_iterator(
      make_cfg(data_dir, prompt="a", prompt_fraction=0.5), tok, global_batch_size=8, seed=0, kind="opt"
    )
  with pytest.raises(ValueError, match="prompt_fraction=0.5 needs a config.data.prompt"):
    pipeline.make_train_iterator(
      make_cfg(data_dir, prompt="", prompt_fraction=0.5), tok, global_batch_size=8, seed=0, kind="t5"
    )


def write_coco(root, captions_per_image, bad=()):
  """A COCO-format test split whose image k is a flat grey of level 60 * k (garbage bytes if k in bad)."""
  image_dir = root / "images"
  image_dir.mkdir()
  images, annotations = [], []
  for k, n_captions in enumerate(captions_per_image):
    if k in bad:
      (image_dir / f"{k}.png").write_bytes(b"\x89PNG but not really an image")
    else:
      Image.fromarray(np.full((20 + k, 30, 3), 60 * k % 256, np.uint8)).save(image_dir / f"{k}.png")
    images.append({"id": 500 + k, "file_name": f"{k}.png"})
    annotations += [{"image_id": 500 + k, "caption": f"Image {k} (text {c})."} for c in range(n_captions)]
  (root / "test.json").write_text(json.dumps({"images": images, "annotations": annotations}))
  return dict(image_dir=str(image_dir), test_annotations=str(root / "test.json"))


def test_undecodable_image_is_skipped_counted_and_logged(tmp_path, tok, caplog):
  kwargs = write_coco(tmp_path, [1] * 12, bad={3})
  cfg = make_cfg(tmp_path / "tfds", name="coco_captions", builder_kwargs=kwargs, train_split="test", num_threads=1)
  before = pipeline.num_skipped_images()
  with caplog.at_level(logging.WARNING):
    it = pipeline.make_train_iterator(cfg, tok, global_batch_size=4, seed=0)
    batches = [next(it) for _ in range(9)]  # 36 examples: three passes over the 11 good ones
  assert all(b["image"].shape[0] == 4 for b in batches)
  assert pipeline.num_skipped_images() - before >= 3
  warnings = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
  assert len(warnings) == 1 and "example 3 of coco_captions (undecodable)" in warnings[0], warnings

  evals = pipeline.load_eval_set(cfg, tok)
  assert evals["images"].shape[0] == len(evals["captions"]) == 11
  assert "image 3 text 0" not in evals["captions"]


def test_prepared_dataset_is_read_by_name(data_dir):
  # A name we don't ship is read from data_dir as prepared (here: our own files, named with their config).
  config = f"size48_obj4_train{NUM_TRAIN}_test{NUM_TEST}_seed0"
  source = pipeline.get_source(make_cfg(data_dir, name=f"synthetic_shapes/{config}", builder_kwargs={}), "test")
  assert [source[i]["caption"] for i in range(5)] == [ex["caption"] for ex in raw_examples(data_dir, "test")[:5]]


def test_unprepared_dataset_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dataset"):
    pipeline.get_source(make_cfg(tmp_path, name="no_such_dataset", builder_kwargs={}), "train")


# ------------------------------------------------------------------------------------------------ eval set


def test_eval_set_one_image_per_example_without_shared_ids(data_dir, tok):
  evals = pipeline.load_eval_set(make_cfg(data_dir, eval_max_examples=40), tok)
  assert evals["images"].shape == (40, 48, 48, 3) and evals["text_ids"].shape == (40, 24)
  assert evals["txt2img"].tolist() == list(range(40)) and evals["img2txt"] == [[i] for i in range(40)]
  first = raw_examples(data_dir, "test")[0]
  assert evals["captions"][0] == first["caption"].decode()
  want = images_lib.normalize(Image.fromarray(decode(first)))  # 48 -> 48 bicubic is the identity
  np.testing.assert_allclose(evals["images"][0], want, atol=1e-5)


def test_coco_captions_grouped_by_image_id(tmp_path, tok):
  kwargs = write_coco(tmp_path, [2, 1, 3])
  cfg = make_cfg(tmp_path / "tfds", name="coco_captions", builder_kwargs=kwargs, image_size=16)

  evals = pipeline.load_eval_set(cfg, tok)
  assert evals["images"].shape == (3, 16, 16, 3) and len(evals["captions"]) == 6
  assert sorted(len(t) for t in evals["img2txt"]) == [1, 2, 3]
  for i, texts in enumerate(evals["img2txt"]):
    for t in texts:
      assert evals["txt2img"][t] == i
      k = int(evals["captions"][t].split()[1])  # "image k text c"
      level = (evals["images"][i] * images_lib.CLIP_STD + images_lib.CLIP_MEAN) * 255
      assert np.allclose(level, 60 * k, atol=1)

  missing = dict(kwargs, test_annotations=str(tmp_path / "nope.json"))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    pipeline.get_source(make_cfg(tmp_path / "tfds2", name="coco_captions", builder_kwargs=missing), "test")
