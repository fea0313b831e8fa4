"""Small image-text datasets laid out as img2dataset (webdataset, parquet), COCO, Visual Genome and image folders
lay them out, with real image bytes of many kinds and broken samples, and what preparing them should give.

Every make_* function returns the expected outcome:
  {"num_samples": good samples, "skipped": {reason: n}, "skipped_keys": {key: reason},
   "samples": {key: {"captions": [web captions], "width", "height" (upright), "sha256" (of the bytes written),
                     "url" or "image" (what synthetic captions match by)}},
   "per_input": {shard name: {"num_samples", "skipped": {reason: n}}} (webdataset, parquet)}
Images come from a pool of pre-encoded JPEGs with varied content (fast enough for 50,000 samples: encoding is done
once per pool entry), plus, with zoo=True, one image of each awkward kind (ZOO) and, with broken=True, one broken
sample of each kind (BROKEN), spread over the shards.
"""

import functools
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("red", "small", "old", "bright", "wooden", "happy", "dog", "house", "car", "tree", "boat", "cat", "street")
# The awkward images every dataset holds: name -> upright (width, height).
ZOO = {
  "rgb_640x480": (640, 480),
  "rgb_97x61": (97, 61),
  "rgb_200x500": (200, 500),
  "gray_jpeg": (50, 40),
  "cmyk_jpeg": (48, 32),
  "palette_png": (40, 30),
  "rgba_png": (36, 28),
  "gray16_png": (33, 21),
  "exif_rotated_jpeg": (40, 60),  # stored 60x40 with EXIF orientation 6
  "rgb_webp": (44, 30),
}
# The broken samples: name -> the reason prepare gives.
BROKEN = {
  "zero_size": "zero_size",
  "random_bytes": "undecodable",
  "truncated_jpeg": "truncated",
  "decompression_bomb": "decompression_bomb",
  "empty_caption": "missing_caption",
}


@functools.lru_cache(maxsize=8)
def _noise(w: int, h: int) -> np.ndarray:
  return np.random.default_rng(w * 10_007 + h).normal(0, 12, (h, w, 3)).astype(np.float32)


def _content(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
  """A photo-like image: a smooth random colour field with some noise (compresses like a photo). The noise is
  one field per size, shifted at random, which is what keeps a pool of 640x480 images fast to make."""
  w, h = size
  low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
  noise = np.roll(_noise(w, h), (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
  return Image.fromarray(np.clip(np.asarray(low, np.float32) + noise, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **kwargs)
  return out.getvalue()


@functools.lru_cache(maxsize=8)
def image_pool(count: int, size: tuple[int, int], quality: int, seed: int) -> tuple[tuple[bytes, tuple[int, int]], ...]:
  """`count` distinct RGB JPEGs of `size`: ((bytes, (width, height)), ...)."""
  rng = np.random.default_rng(seed)
  return tuple((_encode(_content(rng, size), "JPEG", quality=quality), size) for _ in range(count))


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
  """A valid 1-bit grayscale PNG of width x height zeros (400M pixels, over images.MAX_PIXELS): ~50 KB on disk."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
  z = zlib.compressobj(9)
  idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
  idat += z.flush()
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def zoo_images() -> dict[str, bytes]:
  """One image of each kind of ZOO, encoded."""
  rng = np.random.default_rng(1234)
  out = {
    "rgb_640x480": _encode(_content(rng, (640, 480)), "JPEG", quality=90),
    "rgb_97x61": _encode(_content(rng, (97, 61)), "JPEG", quality=90),
    "rgb_200x500": _encode(_content(rng, (200, 500)), "JPEG", quality=90),
    "gray_jpeg": _encode(_content(rng, (50, 40)).convert("L"), "JPEG"),
    "cmyk_jpeg": _encode(_content(rng, (48, 32)).convert("CMYK"), "JPEG"),
    "palette_png": _encode(_content(rng, (40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
    "rgb_webp": _encode(_content(rng, (44, 30)), "WEBP", quality=80),
  }
  rgba = _content(rng, (36, 28)).convert("RGBA")
  rgba.putalpha(Image.fromarray(rng.integers(0, 256, (28, 36), dtype=np.uint8)))
  out["rgba_png"] = _encode(rgba, "PNG")
  out["gray16_png"] = _encode(Image.fromarray(rng.integers(0, 65536, (21, 33), dtype=np.uint16)), "PNG")
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to view: stored 60x40, upright 40x60
  out["exif_rotated_jpeg"] = _encode(_content(rng, (60, 40)), "JPEG", exif=exif.tobytes())
  return out


@functools.lru_cache(maxsize=1)
def broken_images() -> dict[str, bytes]:
  """The image bytes of each kind of BROKEN (empty_caption has a good image)."""
  rng = np.random.default_rng(99)
  jpeg = _encode(_content(rng, (640, 480)), "JPEG", quality=90)
  return {
    "zero_size": b"",
    "random_bytes": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    "truncated_jpeg": jpeg[: len(jpeg) * 3 // 5],
    "decompression_bomb": _bomb_png(),
    "empty_caption": _encode(_content(rng, (32, 24)), "JPEG"),
  }


@functools.lru_cache(maxsize=4096)  # pool images repeat; a bytes object caches its own hash, so a hit is cheap
def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _caption(rng: np.random.Generator, n: int) -> str:
  a, b = rng.choice(len(WORDS), 2)
  return f"a {WORDS[a]} {WORDS[b]} number {n}"


def _samples(total: int, seed: int, broken: bool, zoo: bool, image_size, quality: int, pool_size: int):
  """`total` samples in order: (kind, name, image bytes, caption, upright size), kind in pool / zoo / broken; the
  zoo and broken ones spread evenly."""
  extras = ([("zoo", n) for n in ZOO] if zoo else []) + ([("broken", n) for n in BROKEN] if broken else [])
  if total < len(extras):
    raise ValueError(f"{total} samples cannot hold the {len(extras)} zoo and broken ones: make more.")
  rng = np.random.default_rng(seed)
  pool = image_pool(min(pool_size, total), tuple(image_size), quality, seed)
  stride = total // max(len(extras), 1)
  at = {i * stride: e for i, e in enumerate(extras)}
  zoo_bytes, broken_bytes = zoo_images(), broken_images()
  for g in range(total):
    caption = _caption(rng, g)
    kind, name = at.get(g, ("pool", None))
    if kind == "zoo":
      yield kind, name, zoo_bytes[name], caption, ZOO[name]
    elif kind == "broken":
      yield kind, name, broken_bytes[name], ("" if name == "empty_caption" else caption), None
    else:
      data, size = pool[g % len(pool)]
      yield kind, None, data, caption, size


def _new_expected() -> dict:
  return {"num_samples": 0, "skipped": {}, "skipped_keys": {}, "samples": {}, "per_input": {}}


def _expect(expected: dict, unit: str | None, key: str, kind, name, data, caption, size, match: dict):
  per = expected["per_input"].setdefault(unit, {"num_samples": 0, "skipped": {}}) if unit is not None else None
  if kind == "broken":
    reason = BROKEN[name]
    expected["skipped"][reason] = expected["skipped"].get(reason, 0) + 1
    expected["skipped_keys"][key] = reason
    if per is not None:
      per["skipped"][reason] = per["skipped"].get(reason, 0) + 1
    return
  expected["num_samples"] += 1
  if per is not None:
    per["num_samples"] += 1
  w, h = size
  expected["samples"][key] = {"captions": [caption], "width": w, "height": h, "sha256": _sha256(data), **match}


def _meta(key: str, url: str, caption: str, size, data: bytes | None, status: str = "success") -> dict:
  """The metadata img2dataset keeps of a sample (its .json, and the rows of its parquet files)."""
  w, h = size if size else (None, None)
  return {
    "url": url,
    "caption": caption,
    "key": key,
    "status": status,
    "error_message": None if status == "success" else "HTTP Error 404: Not Found",
    "width": w,
    "height": h,
    "original_width": w,
    "original_height": h,
    "exif": "{}" if data is not None else None,
    "sha256": _sha256(data) if data is not None else None,
  }


META_SCHEMA = pa.schema(
  [
    ("url", pa.string()),
    ("caption", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
  ]
)


def _write_parquet(path: str, rows: list[dict], schema: pa.Schema, row_group: int = 100):
  """As img2dataset's BufferedParquetWriter: row groups of 100 rows."""
  with pq.ParquetWriter(path, schema) as writer:
    for start in range(0, len(rows), row_group):
      writer.write_table(pa.Table.from_pylist(rows[start : start + row_group], schema))


def _key_digits(per_shard: int) -> int:
  return max(4, len(str(per_shard - 1)))


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o444
  tar.addfile(info, io.BytesIO(data))


def make_webdataset(
  out_dir: str,
  num_shards: int = 2,
  per_shard: int = 16,
  seed: int = 0,
  broken: bool = True,
  zoo: bool = True,
  image_size=(64, 48),
  quality: int = 85,
  pool_size: int = 256,
  failed_downloads: int = 1,
) -> dict:
  """img2dataset's output_format=webdataset: NNNNN.tar (KEY.jpg / .png / .webp, KEY.txt, KEY.json per sample),
  NNNNN.parquet (the metadata of every url of the shard, failed downloads too) and NNNNN_stats.json; keys are
  the shard number and the sample's number in it. `failed_downloads` urls per shard failed (in the metadata, not
  in the tar)."""
  os.makedirs(out_dir, exist_ok=True)
  expected = _new_expected()
  samples = _samples(num_shards * per_shard, seed, broken, zoo, image_size, quality, pool_size)
  digits = _key_digits(per_shard)
  for shard in range(num_shards):
    name = f"{shard:05d}"
    meta_rows = []
    with tarfile.open(os.path.join(out_dir, f"{name}.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
      for i in range(per_shard):
        kind, what, data, caption, size = next(samples)
        key = f"{name}{i:0{digits}d}"
        url = f"https://example.com/{seed}/{key}.jpg"
        ext = "png" if data.startswith(b"\x89PNG") else "webp" if data[8:12] == b"WEBP" else "jpg"
        meta = _meta(key, url, caption, size, data)
        _add_tar_member(tar, f"{key}.{ext}", data)
        _add_tar_member(tar, f"{key}.txt", caption.encode())
        _add_tar_member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
        meta_rows.append(meta)
        _expect(expected, name, key, kind, what, data, caption, size, {"url": url})
    for j in range(failed_downloads):
      key = f"{name}{per_shard + j:0{digits}d}"
      meta_rows.append(_meta(key, f"https://example.com/{seed}/{key}.jpg", "gone", None, None, "failed_to_download"))
    _write_parquet(os.path.join(out_dir, f"{name}.parquet"), meta_rows, META_SCHEMA)
    stats = {"count": len(meta_rows), "successes": per_shard, "failed_to_download": failed_downloads}
    with open(os.path.join(out_dir, f"{name}_stats.json"), "w") as f:
      json.dump(stats, f)
  return expected


def make_parquet(
  out_dir: str,
  num_files: int = 2,
  per_file: int = 16,
  seed: int = 0,
  broken: bool = True,
  zoo: bool = True,
  image_size=(64, 48),
  quality: int = 85,
  pool_size: int = 256,
  failed_downloads: int = 1,
) -> dict:
  """img2dataset's output_format=parquet: NNNNN.parquet with the metadata columns and the image bytes in "jpg"
  (null for a failed download: `failed_downloads` rows per file, which are no samples), row groups of 100."""
  os.makedirs(out_dir, exist_ok=True)
  expected = _new_expected()
  expected["not_downloaded"] = 0
  samples = _samples(num_files * per_file, seed, broken, zoo, image_size, quality, pool_size)
  schema = META_SCHEMA.append(pa.field("jpg", pa.binary()))
  digits = _key_digits(per_file + failed_downloads)
  rows_per_file = per_file + failed_downloads
  failed_at = {1 + j * rows_per_file // max(failed_downloads, 1) for j in range(failed_downloads)}
  for n in range(num_files):
    name = f"{n:05d}"
    rows = []
    for i in range(rows_per_file):
      key = f"{name}{i:0{digits}d}"
      url = f"https://example.com/{seed}/{key}.jpg"
      if i in failed_at:
        rows.append({**_meta(key, url, "gone", None, None, "failed_to_download"), "jpg": None})
        expected["not_downloaded"] += 1
        continue
      kind, what, data, caption, size = next(samples)
      rows.append({**_meta(key, url, caption, size, data), "jpg": data})
      _expect(expected, name, key, kind, what, data, caption, size, {"url": url})
    _write_parquet(os.path.join(out_dir, f"{name}.parquet"), rows, schema)
  return expected


def _write_image(path: str, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def make_coco(root: str, num_images: int = 16, seed: int = 0, broken: bool = True, layout: str = "official") -> dict:
  """COCO: root/train2017/<id:012d>.jpg and root/annotations/captions_train2017.json (layout "official") or
  root/annotations/coco_karpathy_train.json ("karpathy": LAVIS's list of {"image", "caption", "image_id"}),
  1-6 captions per image. broken=True adds the BROKEN samples and an image the annotations name that is not on
  disk (missing_image). Returns the expected outcome (module docstring; keys: the image id, "coco_<id>" for
  karpathy) and "annotations": the annotation file."""
  rng = np.random.default_rng(seed)
  expected = _new_expected()
  images, annotations, entries = [], [], []
  total = num_images + (1 if broken else 0)
  samples = _samples(num_images, seed, broken, True, (64, 48), 85, 64)
  for n in range(total):
    image_id = 1000 + n
    file_name = f"{image_id:012d}.jpg"
    rel = f"train2017/{file_name}"
    key = str(image_id) if layout == "official" else f"coco_{image_id}"
    if n == num_images:  # named, not on disk
      kind, what, data, caption, size = "missing", None, None, "a missing image", None
    else:
      kind, what, data, caption, size = next(samples)
      _write_image(os.path.join(root, rel), data)
    captions = [caption] + [_caption(rng, 10_000 * (j + 1) + n) for j in range(int(rng.integers(0, 6)))]
    if kind == "broken" and what == "empty_caption":
      captions = [] if layout == "official" else [""]
    images.append({"id": image_id, "file_name": file_name, "height": 0, "width": 0})
    for j, c in enumerate(captions):
      annotations.append({"image_id": image_id, "id": image_id * 10 + j, "caption": c})
      entries.append({"caption": c, "image": rel, "image_id": key})
    if kind == "missing":
      expected["skipped"]["missing_image"] = expected["skipped"].get("missing_image", 0) + 1
      expected["skipped_keys"][key] = "missing_image"
      continue
    _expect(expected, None, key, kind, what, data, captions[0] if captions else "", size, {"image": rel})
    if key in expected["samples"]:
      expected["samples"][key]["captions"] = captions
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  if layout == "official":
    path = os.path.join(root, "annotations", "captions_train2017.json")
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
  else:
    path = os.path.join(root, "annotations", "coco_karpathy_train.json")
    data = entries
  with open(path, "w") as f:
    json.dump(data, f)
  expected["annotations"] = path
  return expected


def make_vg(root: str, num_images: int = 12, seed: int = 0, layout: str = "regions", broken: bool = True) -> dict:
  """Visual Genome: root/images/VG_100K/<id>.jpg and VG_100K_2/<id>.jpg (alternating) and either
  root/region_descriptions.json (layout "regions", keys the image ids) or LAVIS's root/vg_caption.json ("lavis":
  [{"image": "VG_100K/<id>.jpg", "caption", "image_id": "vg_<id>"}], several per image, keys "vg_<id>").
  broken=True adds a truncated image and one not on disk. Returns the expected outcome and "annotations"."""
  rng = np.random.default_rng(seed)
  expected = _new_expected()
  pool = image_pool(8, (64, 48), 85, seed)
  regions, entries = [], []
  total = num_images + (2 if broken else 0)
  for n in range(total):
    image_id = n + 1
    rel = f"{'VG_100K' if n % 2 == 0 else 'VG_100K_2'}/{image_id}.jpg"
    key = str(image_id) if layout == "regions" else f"vg_{image_id}"
    phrases = [_caption(rng, 100 * image_id + j) for j in range(int(rng.integers(1, 5)))]
    regions.append(
      {
        "id": image_id,
        "regions": [
          {"region_id": 10 * image_id + j, "image_id": image_id, "phrase": p, "x": 0, "y": 0, "width": 5, "height": 5}
          for j, p in enumerate(phrases)
        ],
      }
    )
    entries += [{"image": rel, "caption": p, "image_id": key} for p in phrases]
    if n == num_images + 1:  # named, not on disk
      expected["skipped"]["missing_image"] = 1
      expected["skipped_keys"][key] = "missing_image"
      continue
    if n == num_images:
      data = broken_images()["truncated_jpeg"]
      _write_image(os.path.join(root, "images", rel), data)
      _expect(expected, None, key, "broken", "truncated_jpeg", data, "", None, {})
      continue
    data, size = pool[n % len(pool)]
    _write_image(os.path.join(root, "images", rel), data)
    _expect(expected, None, key, "pool", None, data, phrases[0], size, {"image": rel})
    expected["samples"][key]["captions"] = phrases
  path = os.path.join(root, "region_descriptions.json" if layout == "regions" else "vg_caption.json")
  with open(path, "w") as f:
    json.dump(regions if layout == "regions" else entries, f)
  expected["annotations"] = path
  expected["images"] = os.path.join(root, "images")
  return expected


def make_folder(root: str, num_images: int = 10, seed: int = 0, captions: str = "sidecar") -> dict:
  """A folder of images (root/ and root/more/), captions in NAME.txt beside each (captions="sidecar", one per
  line) or in a Hugging Face ImageFolder root/metadata.jsonl ("metadata": {"file_name", "text"}, every other
  entry with "caption" instead). The last image has no caption. Keys: the path without extension."""
  rng = np.random.default_rng(seed)
  expected = _new_expected()
  pool = image_pool(8, (64, 48), 85, seed)
  metadata = []
  for n in range(num_images):
    rel = f"img_{n:03d}.jpg" if n % 2 == 0 else f"more/img_{n:03d}.jpg"
    key = rel[:-4]
    data, size = pool[n % len(pool)]
    _write_image(os.path.join(root, rel), data)
    lines = [_caption(rng, 10 * n + j) for j in range(1 + n % 2)] if n < num_images - 1 else []
    if captions == "sidecar" and lines:
      with open(os.path.join(root, key + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    elif lines:
      metadata.append({"file_name": rel, ("text" if n % 4 < 2 else "caption"): lines[0] if n % 2 == 0 else lines})
    if not lines:
      expected["skipped"]["missing_caption"] = 1
      expected["skipped_keys"][key] = "missing_caption"
      continue
    _expect(expected, None, key, "pool", None, data, lines[0], size, {"image": rel})
    expected["samples"][key]["captions"] = lines
  if captions == "metadata":
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in metadata)
  return expected


def make_synthetic_captions(path: str, expected: dict, match: str = "url", seed: int = 0) -> dict:
  """BLIP's synthetic captions file ([{"url" (or "image"), "caption"}]) for every other sample of `expected`
  (and for some skipped or unknown ones): one caption, or a list of two, or two entries for the same url, and
  once a repeat of the web caption (which prepare leaves out). Returns {key: the captions prepare appends}."""
  rng = np.random.default_rng(seed)
  entries, added = [], {}
  for n, (key, sample) in enumerate(sorted(expected["samples"].items())):
    if n % 2:
      continue
    first, second = f"synthetic {key} one {rng.integers(1000)}", f"synthetic {key} two"
    if n % 6 == 0:
      entries.append({match: sample[match], "caption": first})
      added[key] = [first]
    elif n % 6 == 2:
      entries.append({match: sample[match], "caption": [first, second]})
      added[key] = [first, second]
    else:
      entries += [{match: sample[match], "caption": first}, {match: sample[match], "caption": sample["captions"][0]}]
      entries.append({match: sample[match], "caption": second})
      added[key] = [first, second]
  entries.append(
    {match: "https://example.com/never-downloaded.jpg" if match == "url" else "nowhere.jpg", "caption": "x"}
  )
  with open(path, "w") as f:
    json.dump(entries, f)
  return added
