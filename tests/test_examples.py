"""The examples picture (blip2_jax.examples) and the evaluators' first-images subsets."""

import numpy as np
import pytest

from blip2_jax import evaluators
from blip2_jax import examples
from blip2_jax.data import images as images_lib


def test_grid_places_each_image_and_colours_its_text():
  images = np.zeros((5, 8, 8, 3), np.uint8)
  images[:, :, :, 2] = 255  # blue squares
  texts = examples.retrieval_texts(
    ["a b", "c d", "e f", "g h", "i j"], np.eye(5)[[0, 1, 0, 3, 4]], [[0], [1], [2], [3], [4]], n=5
  )
  assert [t[0][1] for t in texts] == [examples.RIGHT, examples.RIGHT, examples.WRONG, examples.RIGHT, examples.RIGHT]
  assert texts[2][0][0] == "wrong: a b"
  picture = np.asarray(examples.grid(images, texts, columns=2, cell=32))
  rows = 3  # 5 images, 2 a row
  assert picture.shape[1] == 2 * (32 + 8) + 8 and picture.shape[0] > rows * 32
  assert (picture[8:40, 8:40] == [0, 0, 255]).all() and (picture[8:40, 48:80] == [0, 0, 255]).all()
  red = (picture == examples.WRONG).all(axis=-1)
  assert red.any()  # the third image's "wrong:" line
  with pytest.raises(ValueError, match="2 images but 1 texts"):
    examples.grid(images[:2], texts[:1])


def test_to_uint8_inverts_the_pipelines_normalisation():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  normalised = np.stack([images_lib.normalize(p) for p in pixels])
  np.testing.assert_array_equal(examples.to_uint8(normalised), pixels)


def test_caption_texts_mark_exact_matches():
  out = examples.caption_texts(["A red circle.", "a blue square"], [["a red circle"], ["a green square", "x"]], 2)
  assert out[0] == [("model: A red circle.", examples.RIGHT), ("reference: a red circle", examples.NEUTRAL)]
  assert out[1][0][1] == examples.WRONG


def test_first_images_keeps_their_texts_and_renumbers_them():
  data = {
    "images": np.arange(4)[:, None],
    "text_ids": np.arange(7)[:, None] + 10,
    "text_mask": np.ones((7, 1), np.int32),
    "txt2img": np.array([0, 0, 1, 2, 1, 3, 2]),
    "img2txt": [[0, 1], [2, 4], [3, 6], [5]],
    "captions": list("abcdefg"),
  }
  sub = evaluators._first_images(data, 2)  # pylint: disable=protected-access
  assert sub["images"].tolist() == [[0], [1]]
  assert sub["captions"] == ["a", "b", "c", "e"] and sub["text_ids"][:, 0].tolist() == [10, 11, 12, 14]
  assert sub["txt2img"].tolist() == [0, 0, 1, 1] and sub["img2txt"] == [[0, 1], [2, 3]]
  assert evaluators._first_images(data, None) is data and evaluators._first_images(data, 4) is data  # pylint: disable=protected-access
