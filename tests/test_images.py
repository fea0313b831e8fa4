"""Tests for blip2_jax.data.images: decoding every image mode, sorting broken images by reason, the training crop
(fast JPEG path against the full decode), and the ViT's on-device normalisation (CPU, a few seconds)."""

import io
import zlib

import numpy as np
from PIL import Image
import pytest

from blip2_jax.data import images as images_lib
from blip2_jax.models import vit as vit_lib

RED = (200, 30, 40)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **kwargs)
  return out.getvalue()


def photo(w=640, h=480, seed=0) -> np.ndarray:
  """A smooth, textured RGB picture (JPEG-friendly like a photo, unlike noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], -1)
  return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def png_claiming(width: int, height: int) -> bytes:
  """A PNG whose header says width x height (grayscale) and whose one IDAT holds a single compressed row."""

  def chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

  header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
  row = zlib.compress(b"\0" * (width + 1))
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def test_every_mode_decodes_to_8_bit_rgb():
  rgb = Image.new("RGB", (64, 48), RED)
  cases = {
    "rgb jpeg": (encode(rgb, "JPEG", quality=95), RED, 3),
    "grayscale jpeg": (encode(rgb.convert("L"), "JPEG", quality=95), (82, 82, 82), 2),
    "cmyk jpeg": (encode(rgb.convert("CMYK"), "JPEG", quality=95), RED, 3),
    "palette png": (encode(Image.new("P", (64, 48), 7), "PNG"), None, 0),
    # 16-bit grayscale: 40,000 / 65,535 of full scale is 155.6 / 255 (PIL's convert("RGB") would clip it to 255).
    "16-bit png": (encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "PNG"), (156, 156, 156), 0),
    # Transparent pixels become white (the colour underneath a transparent pixel is arbitrary).
    "rgba png": (encode(Image.new("RGBA", (64, 48), (255, 0, 0, 0)), "PNG"), (255, 255, 255), 0),
    "half-transparent la png": (encode(Image.new("LA", (64, 48), (0, 128)), "PNG"), (127, 127, 127), 1),
    "webp": (encode(rgb, "WEBP", lossless=True), RED, 0),
  }
  for name, (data, want, tol) in cases.items():
    image = images_lib.decode(data)
    assert image.mode == "RGB" and image.size == (64, 48), name
    if want is not None:
      assert np.abs(np.asarray(image, int)[10, 10] - want).max() <= tol, (name, np.asarray(image)[10, 10])


def test_exif_rotation_is_applied_in_decode_and_in_both_crop_paths():
  # Stored 64 wide x 48 high with a white block top-left; orientation 6 = shown rotated 90 degrees clockwise,
  # so upright it is 48 x 64 with the block top-right.
  stored = np.zeros((48, 64, 3), np.uint8)
  stored[:16, :16] = 255
  exif = Image.new("RGB", (1, 1)).getexif()
  exif[0x0112] = 6
  data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
  upright = np.asarray(images_lib.decode(data))
  assert upright.shape == (64, 48, 3)
  assert upright[4, -4].min() > 200 and upright[4, 4].max() < 50
  assert images_lib.upright_size(images_lib.open_image(data)) == (48, 64)
  for fast in (True, False):  # the whole image, 16 x 16: the block stays top-right
    crop = images_lib.random_crop(data, 16, (1.0, 1.0), np.random.default_rng(0), fast=fast)
    assert crop.shape == (16, 16, 3) and crop[1, -2].min() > 200 and crop[1, 1].max() < 50


@pytest.mark.parametrize(
  "reason, data",
  [
    ("zero_size", b""),
    ("undecodable", b"<html>404 not found</html>"),
    ("undecodable", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),  # a PNG signature and a broken header
    ("truncated", encode(Image.fromarray(photo(96, 64)), "PNG")[:3000]),
    ("truncated", encode(Image.fromarray(photo(96, 64)), "JPEG", quality=95)[:2500]),
    ("decompression_bomb", png_claiming(20_000, 20_000)),
  ],
)
def test_broken_images_are_sorted_by_reason(reason, data):
  with pytest.raises(images_lib.BadImage) as e:
    images_lib.decode(data)
  assert e.value.reason == reason, str(e.value)
  with pytest.raises(images_lib.BadImage) as e:  # the training crop, fast path included, agrees
    images_lib.random_crop(data, 16, (0.5, 1.0), np.random.default_rng(0))
  assert e.value.reason == reason


def test_max_pixels_is_a_limit_of_ours():
  data = encode(Image.new("RGB", (100, 100)), "PNG")
  assert images_lib.decode(data, max_pixels=10_000).size == (100, 100)
  with pytest.raises(images_lib.BadImage, match="decompression_bomb: 100x100 = 10,000 pixels"):
    images_lib.decode(data, max_pixels=9_999)


def test_fast_jpeg_crop_draws_the_same_box_and_matches_the_full_decode():
  data = encode(Image.fromarray(photo()), "JPEG", quality=92)
  diffs = []
  for seed in range(12):
    fast = images_lib.random_crop(data, 224, (0.5, 1.0), np.random.default_rng(seed), fast=True)
    full = images_lib.random_crop(data, 224, (0.5, 1.0), np.random.default_rng(seed), fast=False)
    assert fast.shape == full.shape == (224, 224, 3) and fast.dtype == np.uint8
    diffs.append(np.abs(fast.astype(int) - full.astype(int)).mean())
  # The same crop, resampled from a DCT-scaled decode: a different low-pass filter, the same picture (a box
  # drawn elsewhere would differ by tens of levels on this gradient image).
  assert 0 < min(diffs) and max(diffs) < 3.0, diffs  # > 0: the fast path did decode scaled
  # The scale n/8 is the smallest that keeps the box's shorter side >= the output (no upsampling from a reduced
  # decode), except 7/8, which libjpeg-turbo decodes slower than 8/8.
  factors = (2.0, 1.0, 0.9, 0.8, 0.75, 0.7, 0.5, 0.3, 0.1)
  assert [images_lib._jpeg_eighths(f) for f in factors] == [8, 8, 8, 8, 6, 6, 4, 3, 1]


def test_vit_normalises_uint8_pixels_as_the_host_does():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  host = np.stack([images_lib.normalize(Image.fromarray(p)) for p in pixels])
  np.testing.assert_allclose(np.asarray(vit_lib.normalize_pixels(pixels)), host, atol=1e-6)
  assert vit_lib.normalize_pixels(host) is host  # floats are taken as normalised already
