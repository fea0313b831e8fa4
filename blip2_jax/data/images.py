"""Images as the model reads them, from files, bytes, PIL images or arrays; and fixed-size padded batches.

BLIP-2's processors resize to the model's input size (bicubic) and normalise with CLIP's mean and std (EVA-CLIP's
too); the model takes float32 [B, S, S, 3], channels last, or uint8 pixels that it normalises itself
(models/vit.py). Every entry point (training, `Blip2`, the evaluation and generation command lines, data
preparation) decodes images through this module, so every one of them:
- takes any mode PIL reads (grayscale, CMYK, palette, 16-bit, with alpha: composited on white) to 8-bit RGB, and
  turns EXIF-rotated photos upright;
- sorts a broken image into one of SKIP_REASONS (BadImage.reason): zero_size, undecodable (not an image PIL
  knows, or a corrupt header), truncated (the data ends before the pixels do), decompression_bomb (more than
  MAX_PIXELS pixels: a small file that would decode to gigabytes).
Batches of a fixed size (the last one padded with copies of its last row) keep one compiled program per shape.

The training crop (random_crop) decodes a JPEG at the smallest DCT scale (libjpeg-turbo's n/8 scaling, through
simplejpeg) that still leaves the crop at least as large as the output, so a 640x480 photo cropped to 224 pixels
is decoded at 5/8 or 3/4 of its size at no cost in quality: the resampling downscales either way.
"""

import io
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import simplejpeg

from blip2_jax.models import vit as vit_lib

# CLIP's normalisation, which EVA-CLIP and hence BLIP-2 use.
CLIP_MEAN = np.array(vit_lib.CLIP_MEAN, np.float32)
CLIP_STD = np.array(vit_lib.CLIP_STD, np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL's own default limit (~9,459 x 9,459 pixels, a 256 MiB RGB image); larger images are taken as decompression
# bombs. Web-scale data holds a few: LAION has panoramas and scans far larger than any model input.
MAX_PIXELS = 89_478_485
SKIP_REASONS = ("zero_size", "undecodable", "truncated", "decompression_bomb", "missing_caption")
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which LAVIS keeps
# EXIF orientation -> the transpose that makes the image upright (as PIL's ImageOps.exif_transpose).
_ORIENTATION = {
  2: Image.Transpose.FLIP_LEFT_RIGHT,
  3: Image.Transpose.ROTATE_180,
  4: Image.Transpose.FLIP_TOP_BOTTOM,
  5: Image.Transpose.TRANSPOSE,
  6: Image.Transpose.ROTATE_270,
  7: Image.Transpose.TRANSVERSE,
  8: Image.Transpose.ROTATE_90,
}


class BadImage(ValueError):
  """An image that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Reads only the header of encoded image bytes: a lazy PIL image, or BadImage (zero_size, undecodable,
  decompression_bomb) before any pixel is decoded."""
  if not data:
    raise BadImage("zero_size", "the image has 0 bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadImage("decompression_bomb", str(e)) from None
  except Exception as e:  # PIL raises a grab-bag of types for bad data  # noqa: BLE001
    raise _load_failure(e) from None
  w, h = image.size
  if w * h == 0:
    raise BadImage("zero_size", f"the image is {w}x{h} pixels")
  if w * h > max_pixels:
    raise BadImage("decompression_bomb", f"{w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
  return image


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(0x0112, 1))
  except Exception:  # a broken EXIF block: keep the image as stored  # noqa: BLE001
    return 1


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
  w, h = size
  return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def upright_size(image: Image.Image) -> tuple[int, int]:
  """(width, height) once the EXIF orientation is applied."""
  return _upright(image.size, _orientation(image))


def _load_failure(e: Exception) -> BadImage:
  truncated = isinstance(e, EOFError) or "truncat" in str(e).lower() or "premature end" in str(e).lower()
  return BadImage("truncated" if truncated else "undecodable", f"{type(e).__name__}: {e}")


def to_rgb(image: Image.Image) -> Image.Image:
  """A lazily opened image (open_image) -> upright 8-bit RGB, fully decoded; BadImage if the pixels are broken.

  16-bit and 32-bit grayscale are scaled to 8 bits (PIL's own convert would clip them to white), float images
  are taken as [0, 1], and transparent pixels are composited on white (as img2dataset does)."""
  orientation = _orientation(image)
  try:
    image.load()
  except Exception as e:  # noqa: BLE001
    raise _load_failure(e) from None
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    pixels = np.asarray(image, np.float64)
    if image.mode == "F":
      pixels = pixels * 255.0
    elif image.mode != "I" or pixels.max(initial=0) > 255:
      pixels = pixels / 257.0  # 16-bit range -> 8-bit
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    image = Image.new("RGB", rgba.size, (255, 255, 255))
    image.paste(rgba, mask=rgba.getchannel("A"))
  elif image.mode != "RGB":
    image = image.convert("RGB")
  if orientation in _ORIENTATION:
    image = image.transpose(_ORIENTATION[orientation])
  return image


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Encoded image bytes -> upright RGB PIL image, fully decoded; BadImage (a ValueError) if broken."""
  return to_rgb(open_image(data, max_pixels))


# ------------------------------------------------------------------------------------------- training crop


def sample_crop(w: int, h: int, scale, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (x, y, width, height) in a w x h image: 10 tries at a random area
  fraction in `scale` and aspect ratio in CROP_RATIO (log-uniform), then the whole image cut to the nearest
  allowed aspect ratio."""
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*np.log(CROP_RATIO)))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
  cw, ch = w, h
  if w / h < CROP_RATIO[0]:
    ch = int(round(w / CROP_RATIO[0]))
  elif w / h > CROP_RATIO[1]:
    cw = int(round(h * CROP_RATIO[1]))
  return (w - cw) // 2, (h - ch) // 2, cw, ch


def _jpeg_eighths(factor: float) -> int:
  """The libjpeg-turbo scale n/8 to decode at: the smallest that is >= factor, except 7/8, whose IDCT is slower
  than the full decode's SIMD one (measured: 7/8 1.5x the time of 8/8; 6/8 and 5/8 about equal to it, but they
  leave less to resample; 4/8 and below cheaper)."""
  n = max(1, math.ceil(8 * factor - 1e-9))
  return 8 if n >= 7 else n


def _decode_jpeg(image: Image.Image, data: bytes, factor: float, orientation: int) -> Image.Image | None:
  """The JPEG decoded by libjpeg-turbo (simplejpeg) at scale _jpeg_eighths(factor), upright RGB; None if
  libjpeg-turbo reports any problem (the caller then decodes with PIL, which classifies it)."""
  w, h = image.size
  n = _jpeg_eighths(factor)
  try:
    pixels = simplejpeg.decode_jpeg(
      data,
      colorspace="RGB",
      min_width=math.ceil(w * n / 8),
      min_height=math.ceil(h * n / 8),
      fastupsample=True,
      strict=True,
    )
  except Exception:  # noqa: BLE001  (corrupt, truncated or unusual JPEGs: PIL's path decides)
    return None
  out = Image.fromarray(pixels, "RGB")
  return out.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else out


def random_crop(
  data: bytes, size: int, scale, rng: np.random.Generator, *, fast: bool = True, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
  """RandomResizedCrop of encoded image bytes to uint8 [size, size, 3] (bicubic, as LAVIS), BadImage if broken.

  The box is drawn in the upright image before any pixel is decoded. fast=True decodes an RGB or grayscale JPEG
  with libjpeg-turbo at the smallest DCT scale n/8 that keeps the box at least `size` pixels on its shorter side
  (but never 7/8: see _jpeg_eighths), then resamples the scaled box; any other image, or fast=False, is decoded
  whole with PIL. Both draw the same box from the same rng."""
  image = open_image(data, max_pixels)
  orientation = _orientation(image)
  w, h = _upright(image.size, orientation)
  x, y, cw, ch = sample_crop(w, h, scale, rng)
  decoded = None
  if fast and image.format == "JPEG" and image.mode in ("RGB", "L"):
    decoded = _decode_jpeg(image, data, size / min(cw, ch), orientation)
  if decoded is None:
    decoded = to_rgb(image)
  s = decoded.size[0] / w  # 1 unless the JPEG was decoded scaled
  box = (x * s, y * s, (x + cw) * s, (y + ch) * s)
  return np.asarray(decoded.resize((size, size), Image.BICUBIC, box=box))


# ------------------------------------------------------------------------------------------- model input


def normalize(image: Image.Image) -> np.ndarray:
  """uint8 RGB -> float32 HWC in [0, 1], then CLIP mean/std."""
  return (np.asarray(image, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def eval_preprocess(image: Image.Image, image_size: int) -> np.ndarray:
  return normalize(image.resize((image_size, image_size), Image.BICUBIC))


def load_image(path: str, size: int) -> np.ndarray:
  """An image file -> the model's input [size, size, 3]; an undecodable file is a ValueError naming it."""
  try:
    with open(path, "rb") as f:
      image = decode(f.read())
  except (BadImage, OSError) as e:
    raise ValueError(f"Cannot decode image {path}: {e}") from None
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
      out.append(eval_preprocess(to_rgb(image), size))
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
