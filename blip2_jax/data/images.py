"""Images as the model reads them, from files, bytes, PIL images or arrays; and fixed-size padded batches.

BLIP-2's processors resize to the model's input size (bicubic) and normalise with CLIP's mean and std (EVA-CLIP's
too); the model takes float32 [B, S, S, 3], channels last. Every entry point (training's eval split, `Blip2`,
the evaluation and generation command lines) reads images through this module. Batches of a fixed size (the
last one padded with copies of its last row) keep one compiled program per shape.
"""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# CLIP's normalisation, which EVA-CLIP and hence BLIP-2 use.
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def normalize(image: Image.Image) -> np.ndarray:
  """uint8 RGB -> float32 HWC in [0, 1], then CLIP mean/std."""
  return (np.asarray(image, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def eval_preprocess(image: Image.Image, image_size: int) -> np.ndarray:
  return normalize(image.resize((image_size, image_size), Image.BICUBIC))


def decode(data: bytes) -> Image.Image:
  """Encoded image bytes -> RGB PIL image; the full decode happens here, so a truncated file fails here."""
  return Image.open(io.BytesIO(data)).convert("RGB")


def load_image(path: str, size: int) -> np.ndarray:
  """An image file -> the model's input [size, size, 3]; an undecodable file is a ValueError naming it."""
  try:
    image = Image.open(path).convert("RGB")
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types for bad files)
    raise ValueError(f"Cannot decode image {path}: {type(e).__name__}: {e}") from None
  return eval_preprocess(image, size)


def to_pixels(images, size: int):
  """The model's input, float [B, size, size, 3], from images as a user has them.

  `images`: one image or a list of them, each a PIL image, a file path, or an array [H, W, 3] (uint8 pixels, or
  float already preprocessed at size x size), of any sizes: each is converted to RGB, resized (bicubic) and
  CLIP-normalised. A float array [B, size, size, 3] is taken as already preprocessed (and returned as it is, so
  a device array stays on its device)."""
  if isinstance(images, (np.ndarray, jax.Array)) and images.ndim == 4:
    if jnp.issubdtype(images.dtype, jnp.floating):
      return images
    images = list(images)  # a batch of pixel arrays
  if not isinstance(images, (list, tuple)):
    images = [images]
  if not images:
    raise ValueError("No images given.")
  out = []
  for i, image in enumerate(images):
    if isinstance(image, (str, os.PathLike)):
      out.append(load_image(os.fspath(image), size))
    elif isinstance(image, Image.Image):
      out.append(eval_preprocess(image.convert("RGB"), size))
    elif isinstance(image, (np.ndarray, jax.Array)) and image.ndim == 3 and image.shape[-1] == 3:
      image = np.asarray(image)
      if np.issubdtype(image.dtype, np.floating):
        if image.shape != (size, size, 3):
          raise ValueError(
            f"Image {i} is a float array of shape {image.shape}: float arrays must be "
            f"preprocessed already, [{size}, {size}, 3]; give uint8 pixels to have it resized."
          )
        out.append(image.astype(np.float32))
      else:
        out.append(eval_preprocess(Image.fromarray(image.astype(np.uint8)), size))
    else:
      shape = getattr(image, "shape", None)
      raise ValueError(
        f"Image {i} is a {type(image).__name__}{f' of shape {shape}' if shape else ''}: give a "
        "PIL image, a file path or an [H, W, 3] array."
      )
  return np.stack(out)


def pad_rows(rows, batch_size: int) -> np.ndarray:
  """A batch of exactly batch_size rows: `rows` (an array or a list of arrays) padded with copies of its last."""
  rows = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
  return np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])


def padded_batches(*arrays, batch_size: int):
  """(batch, number of real rows): the arrays (equal length) in fixed-size chunks, the last one padded with
  copies of its last row; one array gives batches of it, several give tuples."""
  for start in range(0, len(arrays[0]), batch_size):
    chunk = [pad_rows(a[start : start + batch_size], batch_size) for a in arrays]
    yield (chunk[0] if len(arrays) == 1 else tuple(chunk)), min(batch_size, len(arrays[0]) - start)
