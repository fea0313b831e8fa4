r"""Downloaded image-text data -> a prepared folder (prepared.py): array_record shards of checked records.

  python -m blip2_jax.data.prepare --format=webdataset --input=/data/cc3m --output=/data/prepared/cc3m
  python -m blip2_jax.data.prepare --format=webdataset --input='/data/laion/{00000..11499}.tar' \
      --synthetic_captions=laion_synthetic_filtered_large.json --output=/data/prepared/laion
  python -m blip2_jax.data.prepare --format=parquet --input='/data/sbu/*.parquet' --output=/data/prepared/sbu
  python -m blip2_jax.data.prepare --format=coco --input=coco_karpathy_train.json --images=/data/coco \
      --output=/data/prepared/coco
  python -m blip2_jax.data.prepare --format=vg --input=vg_caption.json --images=/data/vg/images \
      --output=/data/prepared/vg
  python -m blip2_jax.data.prepare --format=folder --input=/data/my_images --output=/data/prepared/mine

Formats (docs/data.md gives the download commands of each of BLIP-2's sources):
- webdataset: tar files as img2dataset writes them: KEY.jpg (or .png, .webp, ...), KEY.txt (the caption),
  KEY.json ({"url", "caption", "key", "status", "width", ...}); members grouped by key (the name up to the first
  dot of its base name, webdataset's rule), consecutive ones as one sample.
- parquet: img2dataset's output_format=parquet: columns key, the image bytes (jpg, or png / webp after
  --encode_format), caption, url, status, ...; a row whose download failed (no image, status not "success") is
  not a sample: the report counts it as not_downloaded.
- coco: an official COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}) or a list of {"image", "caption"} entries (LAVIS's coco_karpathy_train.json), images in --images.
- vg: Visual Genome's region_descriptions.json ([{"id", "regions": [{"phrase", "image_id"}]}]; images
  --images/VG_100K*/<id>.jpg) or BLIP / LAVIS's vg_caption.json ([{"image": "VG_100K/1.jpg", "caption"}]).
- folder: images under --input (any depth) with captions in NAME.txt beside NAME.jpg (one caption per line) or
  in a Hugging Face ImageFolder metadata.jsonl ({"file_name", "text" or "caption"}).
The layout of an annotation file is told by its structure; one of another layout is an error naming it.
Annotation formats give one record per image, with all of its captions.

--input: a file, a folder (its *.tar / *.parquet files), a glob, a brace range ('/data/cc3m/{00000..00331}.tar')
or a comma-separated list of these.

Every image is decoded in full (images.decode) and skipped, counted by reason, if broken: zero_size, undecodable,
truncated, decompression_bomb (more than --max_pixels), missing_image (a file an annotation names that does not
exist, or a sample with no image member), missing_caption (no non-empty caption). A record stores the original
bytes (EXIF orientation is applied when read, images.py), or with --max_side=N an image whose longer upright side
exceeds N resized (aspect kept, bicubic) and re-encoded as JPEG quality 95 (web images are often far larger than
the 224-pixel input). Its width and height are the upright size of the stored image.

--synthetic_captions: BLIP's released CapFilt captions ([{"url", "caption"}], e.g.
laion_synthetic_filtered_large.json; "image" instead of "url" for the annotation formats; "caption" a string or
a list), matched by url (webdataset, parquet) or image path (others) and appended after the web caption(s). The
file is indexed once into a SQLite file in --output (it may hold 100M entries), removed at the end.

Units and resume: one unit per input file (webdataset, parquet) or per --chunk_size images (the others), done in
--workers processes. A unit writes its shard (under a temporary name, renamed when complete), then its report
DIR/shards/NAME.json, whose presence marks it finished. A rerun does only the unfinished units (a leftover
temporary file of a killed run is removed), and when all are finished writes DIR/dataset_info.json. A unit's
records depend only on its input and the options, so an interrupted and resumed run writes the same records as
an uninterrupted one. A folder prepared from other inputs or options is refused, not mixed.
"""

import collections
from concurrent import futures
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import sqlite3
import sys
import tarfile
import time

from absl import app
from absl import flags
from PIL import Image
import pyarrow.parquet as pq
import tqdm

from blip2_jax import cli
from blip2_jax.data import annotations
from blip2_jax.data import images as images_lib
from blip2_jax.data import prepared

FORMATS = ("webdataset", "parquet", "coco", "vg", "folder")
FILE_FORMATS = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
MISSING_IMAGE = "missing_image"
SKIP_REASONS = images_lib.SKIP_REASONS + (MISSING_IMAGE,)
RESIZE_QUALITY = 95  # JPEG quality of a resized image
REPORT_EXAMPLES = 5  # skipped keys listed per reason in a unit's report
REPORT_LINES = 20  # inputs listed in the printed report
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")  # img2dataset's --encode_format names the column
PARQUET_CAPTION_COLUMNS = ("caption", "txt")
PARQUET_BATCH = 256  # rows read at once from a parquet file
SYNTHETIC_INDEX = "synthetic_captions.sqlite"
JSON_READ_CHUNK = 1 << 24  # characters read at once from a synthetic captions file
MAX_JSON_ENTRY = 1 << 26  # characters; an entry that does not parse within this many is broken
# webdataset's key rule: the path up to the first dot of the base name, and the rest as the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_IMAGE_EXTS = tuple(s[1:] for s in images_lib.IMAGE_SUFFIXES)
COCO_LAYOUTS = (
  'an official COCO captions file ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}) '
  'or a list of {"image", "caption"} entries (LAVIS\'s coco_karpathy_train.json)'
)
VG_LAYOUTS = (
  'Visual Genome\'s region_descriptions.json ([{"id", "regions": [{"phrase", "image_id"}]}]) or BLIP / LAVIS\'s '
  'vg_caption.json ([{"image", "caption"}])'
)
SYNTHETIC_LAYOUT = 'BLIP\'s synthetic captions layout ([{"url" or "image", "caption": text or [texts]}])'


# ------------------------------------------------------------------------------------------- inputs and units


def _split_commas(spec: str) -> list[str]:
  """Splits at commas outside braces ('a/{0,1}.tar,b.tar' -> ['a/{0,1}.tar', 'b.tar'])."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(spec):
    depth += {"{": 1, "}": -1}.get(c, 0)
    if c == "," and depth == 0:
      parts.append(spec[start:i])
      start = i + 1
  parts.append(spec[start:])
  return [p.strip() for p in parts if p.strip()]


def _expand_braces(pattern: str) -> list[str]:
  """Brace expansion as the shell and webdataset do it: {00000..00331} (zero-padded as written) and {a,b}."""
  m = re.search(r"\{([^{}]*)\}", pattern)
  if not m:
    return [pattern]
  head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    lo, hi = int(r.group(1)), int(r.group(2))
    width = len(r.group(1)) if r.group(1).startswith("0") else 0
    items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
  else:
    items = body.split(",")
  return [p for item in items for p in _expand_braces(head + item + tail)]


def expand_inputs(spec, suffixes: tuple[str, ...]) -> list[str]:
  """--input (a string as the flag takes it, or a list of them) -> absolute file paths: a folder gives its files
  ending in one of `suffixes` (sorted), a glob its matches (sorted); order otherwise as given, without repeats."""
  specs = [spec] if isinstance(spec, str) else list(spec)
  paths = []
  for part in (p for s in specs for p in _split_commas(s)):
    for pattern in _expand_braces(part):
      if os.path.isdir(pattern):
        found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.endswith(suffixes))
        if not found:
          raise FileNotFoundError(f"The folder {pattern} (--input) has no {' / '.join(suffixes)} file.")
      elif glob.has_magic(pattern):
        found = sorted(glob.glob(pattern))
        if not found:
          raise FileNotFoundError(f"No file matches {pattern} (--input).")
      elif os.path.exists(pattern):
        found = [pattern]
      else:
        raise FileNotFoundError(f"{pattern} (--input) does not exist.")
      paths += [os.path.abspath(p) for p in found if not os.path.isdir(p)]
  paths = list(dict.fromkeys(paths))
  if not paths:
    raise ValueError(f"--input={spec} names no file.")
  return paths


def _file_stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return os.path.splitext(name)[0]


def _unit_names(paths: list[str]) -> list[str]:
  """A shard name per input file: its stem ("00000"), or where stems repeat (cc3m/00000.tar, cc12m/00000.tar) its
  path below the folder the inputs share, with "_" for "/" ("cc3m_00000")."""
  names = [_file_stem(p) for p in paths]
  if len(set(names)) != len(names):
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = [os.path.join(os.path.dirname(os.path.relpath(p, root)), _file_stem(p)).replace(os.sep, "_") for p in paths]
  if len(set(names)) != len(names):
    dup = next(n for n in names if names.count(n) > 1)
    same = ", ".join(p for p, n in zip(paths, names) if n == dup)
    raise ValueError(f"Two inputs would make the same shard {dup!r}: {same}.")
  return names


def _file_identity(path: str) -> dict:
  return {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}


def _check_parquet(path: str) -> None:
  try:
    names = pq.read_schema(path).names
  except Exception as e:  # noqa: BLE001  (pyarrow's errors for a file that is no parquet file)
    raise ValueError(f"{path} is not a parquet file ({type(e).__name__}: {e}).") from None
  if not any(c in names for c in PARQUET_IMAGE_COLUMNS):
    hint = (
      " It looks like the metadata file img2dataset writes beside each tar of a webdataset: use --format=webdataset."
      if "url" in names and "status" in names
      else ""
    )
    raise ValueError(
      f"{path} has no image column ({' / '.join(PARQUET_IMAGE_COLUMNS)}), so it is not img2dataset's "
      f"output_format=parquet; its columns are {', '.join(names)}.{hint}"
    )


def _captions(value) -> list[str]:
  """A caption field (text, a list of texts, or missing) -> its non-empty captions, stripped."""
  values = value if isinstance(value, list) else [value]
  return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _caption_list(data, path: str, expected: str, key_of) -> list[tuple[str, str, list[str]]]:
  """[{"image", "caption"}, ...], several entries per image -> (key, image path, captions) per image, in order
  of first appearance."""
  by_image = {}
  for entry in data:
    if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
      raise ValueError(f"{path} is not {expected}: an entry is {str(entry)[:80]}.")
    image = entry["image"]
    if image not in by_image:
      by_image[image] = (key_of(entry), image, [])
    by_image[image][2].extend(_captions(entry["caption"]))
  return list(by_image.values())


def _coco_images(path: str) -> list[tuple[str, str, list[str]]]:
  data = annotations.read_json(path, COCO_LAYOUTS)
  if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
    captions = collections.defaultdict(list)
    try:
      for ann in data["annotations"]:
        captions[ann["image_id"]] += _captions(ann["caption"])
      # An image without annotations stays: it is counted as missing_caption.
      return [(str(image["id"]), image["file_name"], captions.get(image["id"], [])) for image in data["images"]]
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path} is not {COCO_LAYOUTS}: an entry has no {e}.") from None
  if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
    key_of = lambda e: str(e.get("image_id", os.path.splitext(e["image"])[0]))
    return _caption_list(data, path, COCO_LAYOUTS, key_of)
  raise ValueError(f"{path} is not {COCO_LAYOUTS}.")


def _vg_images(path: str) -> list[tuple[str, str, list[str]]]:
  data = annotations.read_json(path, VG_LAYOUTS)
  if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
    try:
      # The image of a region is <image_id>.jpg in VG_100K/ or VG_100K_2/: found by name (_ImageFinder).
      return [
        (str(image["id"]), f"{image['id']}.jpg", [c for r in image["regions"] for c in _captions(r["phrase"])])
        for image in data
      ]
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path} is not {VG_LAYOUTS}: an entry has no {e}.") from None
  if isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
    key_of = lambda e: str(e.get("image_id", os.path.splitext(os.path.basename(e["image"]))[0]))
    return _caption_list(data, path, VG_LAYOUTS, key_of)
  raise ValueError(f"{path} is not {VG_LAYOUTS}.")


class _ImageFinder:
  """An image path of an annotation file -> the file under --images: the path as given, else the one file of that
  name anywhere below (VG_100K/1.jpg for 1.jpg, train2017/x.jpg for x.jpg), else None."""

  def __init__(self, images_dir: str):
    self.root = images_dir
    self._by_name = None

  def __call__(self, image: str) -> str | None:
    path = os.path.join(self.root, image)
    if os.path.isfile(path):
      return path
    if self._by_name is None:
      self._by_name = {}
      for folder, _, files in os.walk(self.root):
        for f in files:
          self._by_name.setdefault(f, os.path.join(folder, f))
    return self._by_name.get(os.path.basename(image))


def _folder_images(root: str) -> list[tuple[str, str, str, list[str]]]:
  """A folder of images -> (key, path relative to it, absolute path, captions) per image, sorted by path."""
  metadata = {}
  for folder, _, files in os.walk(root):
    if "metadata.jsonl" in files:
      meta_path = os.path.join(folder, "metadata.jsonl")
      with open(meta_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            entry = json.loads(line)
            name = entry["file_name"]
          except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
              f'{meta_path}, line {n}, is not a Hugging Face ImageFolder entry ({{"file_name", "text"}}).'
            ) from None
          rel = os.path.relpath(os.path.join(folder, name), root)
          metadata[rel] = _captions(entry.get("text", entry.get("caption")))
  out = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for f in sorted(files):
      if not f.lower().endswith(images_lib.IMAGE_SUFFIXES):
        continue
      path = os.path.join(folder, f)
      rel = os.path.relpath(path, root)
      sidecar = os.path.splitext(path)[0] + ".txt"
      if rel in metadata:
        captions = metadata[rel]
      elif os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8", errors="replace") as t:
          captions = _captions(t.read().splitlines())
      else:
        captions = []
      out.append((os.path.splitext(rel)[0].replace(os.sep, "/"), rel.replace(os.sep, "/"), path, captions))
  if not out:
    raise ValueError(f"The folder {root} (--input) holds no image ({', '.join(images_lib.IMAGE_SUFFIXES)}).")
  return out


def _plan(source_format: str, input_spec, images_dir, chunk_size: int) -> tuple[list[str], list[dict]]:
  """(input files, units): each unit {"name", "kind", "source": a file or a list of (key, path, captions, match),
  "input": what identifies its input in its report}."""
  if source_format in FILE_FORMATS:
    paths = expand_inputs(input_spec, FILE_FORMATS[source_format])
    if source_format == "parquet":
      for p in paths:
        _check_parquet(p)
    units = [
      {"name": n, "kind": source_format, "source": p, "input": _file_identity(p)}
      for n, p in zip(_unit_names(paths), paths)
    ]
    return paths, units

  if source_format == "folder":
    spec = input_spec if isinstance(input_spec, str) else ",".join(input_spec)
    root = os.path.abspath(spec)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{spec} (--input) is not a folder; --format=folder takes one folder of images.")
    items = [(key, path, captions, rel) for key, rel, path, captions in _folder_images(root)]
    stem, paths = os.path.basename(root) or "folder", [root]
  else:
    paths = expand_inputs(input_spec, (".json",))
    if len(paths) != 1:
      raise ValueError(f"--format={source_format} takes one annotation file as --input; got {len(paths)}.")
    if not images_dir:
      raise ValueError(f"--format={source_format} needs --images, the folder of the images {paths[0]} names.")
    if not os.path.isdir(images_dir):
      raise FileNotFoundError(f"The image folder {images_dir} (--images) does not exist.")
    entries = (_coco_images if source_format == "coco" else _vg_images)(paths[0])
    find = _ImageFinder(images_dir)
    items = [(key, find(image), captions, image) for key, image, captions in entries]
    if not entries:
      raise ValueError(f"{paths[0]} names no image.")
    sample = items[:50]
    if not any(path for _, path, _, _ in sample):
      raise FileNotFoundError(
        f"None of the first {len(sample)} images {paths[0]} names is in {images_dir} (--images), e.g. "
        f"{entries[0][1]}: give the folder they are in."
      )
    stem = _file_stem(paths[0])
  units = []
  for i, start in enumerate(range(0, len(items), chunk_size)):
    chunk = items[start : start + chunk_size]
    digest = hashlib.sha256(json.dumps(chunk).encode()).hexdigest()
    name = f"{stem}-{i:05d}"
    units.append({"name": name, "kind": "files", "source": chunk, "input": {"files": paths, "sha256": digest}})
  return paths, units


# ------------------------------------------------------------------------------------------- synthetic captions


def _iter_json_list(path: str):
  """The entries of a JSON file holding one list, read in pieces (BLIP's LAION file has 100M+ entries)."""
  decoder = json.JSONDecoder()
  with open(path, encoding="utf-8") as f:
    buf, pos, eof = "", 0, False

    def read_more():
      nonlocal buf, pos, eof
      more = f.read(JSON_READ_CHUNK)
      eof = not more
      buf, pos = buf[pos:] + more, 0

    def next_char() -> str:  # the next non-space character ("" at the end of the file)
      nonlocal pos
      while True:
        while pos < len(buf) and buf[pos].isspace():
          pos += 1
        if pos < len(buf) or eof:
          return buf[pos : pos + 1]
        read_more()

    if next_char() != "[":
      raise ValueError(f"{path} is not {SYNTHETIC_LAYOUT}: it does not hold a list.")
    pos += 1
    while True:
      c = next_char()
      if c == "]":
        return
      if not c:
        raise ValueError(f"{path} ends before its list does.")
      try:
        entry, end = decoder.raw_decode(buf, pos)
      except json.JSONDecodeError as e:
        if eof or len(buf) - pos > MAX_JSON_ENTRY:  # no entry is that long: the file is broken here
          raise ValueError(f"{path} is not JSON ({e}).") from None
        read_more()
        continue
      yield entry
      pos = end
      if next_char() == ",":
        pos += 1


def _synthetic_identity(path: str | None) -> dict | None:
  if path is None:
    return None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} (--synthetic_captions) does not exist.")
  return _file_identity(path)


def _build_synthetic_index(path: str, out_dir: str, match: str) -> str:
  """Indexes BLIP's synthetic captions by `match` ("url" or "image") into a SQLite file in out_dir, once: a
  finished index (renamed into place when complete) of the same file is reused by a resumed run."""
  index = os.path.join(out_dir, SYNTHETIC_INDEX)
  identity = json.dumps({**_file_identity(path), "match": match})
  if os.path.isfile(index):
    with sqlite3.connect(index) as db:
      if db.execute("SELECT value FROM meta WHERE name = 'source'").fetchone() == (identity,):
        return index
    os.remove(index)
  tmp = f"{index}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    os.remove(tmp)

  def rows():
    for entry in _iter_json_list(path):
      if not isinstance(entry, dict) or match not in entry or "caption" not in entry:
        raise ValueError(
          f"{path} is not {SYNTHETIC_LAYOUT} with {match!r} keys (which --format needs): an entry is {str(entry)[:80]}."
        )
      k = _match_key(entry[match], match)
      name = os.path.basename(k) if match == "image" else None
      for caption in _captions(entry["caption"]):
        yield k, name, caption

  db = sqlite3.connect(tmp)
  try:
    db.executescript(
      "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
      "CREATE TABLE captions (k TEXT, name TEXT, caption TEXT); CREATE TABLE meta (name TEXT, value TEXT);"
    )
    db.executemany("INSERT INTO captions VALUES (?, ?, ?)", rows())
    db.execute("CREATE INDEX by_key ON captions (k)")
    if match == "image":
      db.execute("CREATE INDEX by_name ON captions (name)")
    db.execute("INSERT INTO meta VALUES ('source', ?)", (identity,))
    db.commit()
  except BaseException:
    db.close()
    os.remove(tmp)
    raise
  db.close()
  os.replace(tmp, index)
  return index


def _match_key(value: str, match: str) -> str:
  return value if match == "url" else os.path.normpath(value).replace(os.sep, "/")


class _SyntheticCaptions:
  """Lookups in the index _build_synthetic_index writes: by url, or by image path (the annotation's, or the path
  in the folder), else by the image's file name."""

  def __init__(self, index: str | None, match: str):
    self._db = sqlite3.connect(f"file:{index}?mode=ro", uri=True) if index else None
    self._match = match

  def __call__(self, value: str | None) -> list[str]:
    if self._db is None or not value:
      return []
    k = _match_key(value, self._match)
    rows = self._db.execute("SELECT caption FROM captions WHERE k = ? ORDER BY rowid", (k,)).fetchall()
    if not rows and self._match == "image":
      q = "SELECT caption FROM captions WHERE name = ? ORDER BY rowid"
      rows = self._db.execute(q, (os.path.basename(k),)).fetchall()
    return [r[0] for r in rows]

  def close(self):
    if self._db is not None:
      self._db.close()


# ------------------------------------------------------------------------------------------- reading samples
# Each yields (key, image bytes or None when there is none, captions, what synthetic captions match by).


def _webdataset_samples(path: str, counts: dict):
  def sample(key, files):
    exts = {ext.lower(): data for ext, data in files.items()}
    image = next((exts[e] for e in _IMAGE_EXTS if e in exts), None)
    meta = {}
    if "json" in exts:
      try:
        meta = json.loads(exts["json"])
      except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    if "txt" in exts:
      captions = _captions(exts["txt"].decode("utf-8", errors="replace"))
    else:
      captions = _captions(meta.get("caption"))
    return key, image, captions, meta.get("url")

  key, files = None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        m = _KEY_EXT.match(member.name) if member.isfile() else None
        if m is None:
          continue
        if m.group(1) != key and files:
          yield sample(key, files)
          files = {}
        key = m.group(1)
        files[m.group(2)] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError) as e:
    # A tar cut short (a killed download) keeps the samples before the cut; the report names the file.
    counts["input_error"] = f"{type(e).__name__}: {e}"
    return
  if files:
    yield sample(key, files)


def _parquet_samples(path: str, counts: dict):
  schema = pq.read_schema(path).names
  image_col = next(c for c in PARQUET_IMAGE_COLUMNS if c in schema)
  caption_col = next((c for c in PARQUET_CAPTION_COLUMNS if c in schema), None)
  columns = [c for c in ("key", image_col, caption_col, "url", "status") if c in schema]
  row = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH, columns=columns):
    cols = {c: batch.column(c).to_pylist() for c in columns}
    for i in range(batch.num_rows):
      status = cols["status"][i] if "status" in cols else None
      image = cols[image_col][i]
      key = str(cols["key"][i]) if "key" in cols and cols["key"][i] is not None else f"{row + i:09d}"
      if image is None and status not in (None, "success"):
        counts["not_downloaded"] += 1  # img2dataset's own failure (its stats count it): not a sample
        continue
      captions = _captions(cols[caption_col][i]) if caption_col else []
      yield key, (image if image is not None else b""), captions, cols["url"][i] if "url" in cols else None
    row += batch.num_rows


def _file_samples(items):
  for key, path, captions, match in items:
    if path is None:
      yield key, None, captions, match
      continue
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      data = None
    yield key, data, captions, match


# ------------------------------------------------------------------------------------------- one unit

_progress = None  # a shared sample counter (multiprocessing.Value) of the running prepare, for its progress bar


def _init_worker(counter):
  global _progress
  _progress = counter


def _count_progress(n: int):
  if _progress is not None:
    with _progress.get_lock():
      _progress.value += n


def _stored_image(data: bytes, max_side: int, max_pixels: int) -> tuple[bytes, int, int]:
  """(bytes to store, upright width, height) of an image, decoded in full to check it; BadImage if broken."""
  image = images_lib.decode(data, max_pixels)
  w, h = image.size
  if not max_side or max(w, h) <= max_side:
    return data, w, h
  scale = max_side / max(w, h)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  out = io.BytesIO()
  image.resize(size, Image.BICUBIC, reducing_gap=3.0).save(out, "JPEG", quality=RESIZE_QUALITY)
  return out.getvalue(), size[0], size[1]


def _write_json(path: str, data: dict):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def _run_unit(task: dict) -> dict:
  """Prepares one unit: its shard, then its report (which marks it finished). Runs in a worker process."""
  start = time.time()
  out, unit, options = task["output"], task["unit"], task["options"]
  counts = {"not_downloaded": 0}
  if unit["kind"] == "webdataset":
    samples = _webdataset_samples(unit["source"], counts)
  elif unit["kind"] == "parquet":
    samples = _parquet_samples(unit["source"], counts)
  else:
    samples = _file_samples(unit["source"])
  synthetic = _SyntheticCaptions(task["synthetic_index"], "url" if unit["kind"] in FILE_FORMATS else "image")
  skipped = {r: 0 for r in SKIP_REASONS}
  examples = collections.defaultdict(list)
  pending = 0
  try:
    with prepared.ShardWriter(out, unit["name"]) as writer:
      for key, data, captions, match in samples:
        captions = captions + [c for c in synthetic(match) if c not in captions]
        try:
          if data is None:
            raise images_lib.BadImage(MISSING_IMAGE, "no image")
          if not captions:  # before decoding, which costs far more
            raise images_lib.BadImage("missing_caption", "no caption")
          stored, w, h = _stored_image(data, options["max_side"], options["max_pixels"])
        except images_lib.BadImage as e:
          skipped[e.reason] += 1
          if len(examples[e.reason]) < REPORT_EXAMPLES:
            examples[e.reason].append(key)
        else:
          writer.write(prepared.encode_record(key, stored, captions, w, h))
        pending += 1
        if pending == 64:
          _count_progress(pending)
          pending = 0
      writer.commit()
  finally:
    synthetic.close()
  _count_progress(pending)
  report = {
    "name": unit["name"],
    "format": task["format"],
    "input": unit["input"],
    "options": options,
    "num_samples": writer.count,
    "skipped": {r: n for r, n in skipped.items() if n},
    "skipped_examples": dict(examples),
    "seconds": round(time.time() - start, 2),
  }
  if unit["kind"] == "parquet":
    report["not_downloaded"] = counts["not_downloaded"]
  if "input_error" in counts:
    report["input_error"] = counts["input_error"]
  _write_json(prepared.report_path(out, unit["name"]), report)
  return report


# ------------------------------------------------------------------------------------------- the whole run


def _finished_report(out: str, unit: dict, fmt: str, options: dict) -> dict | None:
  """The report of a finished unit, None if unfinished; an error if it was prepared from other input/options."""
  path = prepared.report_path(out, unit["name"])
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  was = {k: report.get(k) for k in ("format", "input", "options")}
  now = {"format": fmt, "input": unit["input"], "options": options}
  if was != now:
    diff = next(k for k in now if was[k] != now[k])
    raise ValueError(
      f"{out} holds a dataset prepared from other inputs or options: its unit {unit['name']} was made with "
      f"{diff} {json.dumps(was[diff])}, now {json.dumps(now[diff])}. Give another --output, or delete {out} to "
      "start over."
    )
  if not os.path.isfile(prepared.shard_path(out, unit["name"])):
    return None
  return report


def _clear_unit(out: str, name: str):
  """Removes what an unfinished unit may have left: its shard without a report, temporary files of killed runs."""
  shard, report = prepared.shard_path(out, name), prepared.report_path(out, name)
  for path in [shard, *glob.glob(glob.escape(shard) + ".tmp-*"), *glob.glob(glob.escape(report) + ".tmp-*")]:
    if os.path.exists(path):
      os.remove(path)


def _check_output(out: str, unit_names: set, info_fields: dict) -> dict | None:
  """The dataset_info of a finished folder prepared alike (nothing to do), None to go on; an error for a folder
  holding something else."""
  info_path = os.path.join(out, prepared.INFO_FILE)
  if os.path.isfile(info_path):
    info = prepared.read_info(out)
    was = {k: info.get(k) for k in info_fields}
    if was != info_fields:
      diff = next(k for k in info_fields if was[k] != info_fields[k])
      raise ValueError(
        f"{out} holds a dataset prepared from other inputs or options ({diff} was {json.dumps(was[diff])}, now "
        f"{json.dumps(info_fields[diff])}). Give another --output, or delete {out} to start over."
      )
    return info
  if os.path.isdir(out):
    shards = os.path.join(out, prepared.SHARDS_DIR)
    others = set(os.listdir(out)) - {prepared.SHARDS_DIR, SYNTHETIC_INDEX}
    others = {o for o in others if not o.startswith(SYNTHETIC_INDEX + ".tmp-")}
    if others and not os.path.isdir(shards):
      raise ValueError(f"--output={out} is a folder that holds other files ({sorted(others)[0]}, ...): give a new one.")
    if os.path.isdir(shards):
      strangers = [f[:-5] for f in os.listdir(shards) if f.endswith(".json") and f[:-5] not in unit_names]
      if strangers:
        raise ValueError(
          f"{out} holds a dataset prepared from other inputs: its shard {sorted(strangers)[0]} is none of this "
          f"--input's. Give another --output, or delete {out} to start over."
        )
  return None


def prepare(
  format: str,  # noqa: A002  (the --format flag's name)
  inputs,
  output: str,
  *,
  images: str | None = None,
  synthetic_captions: str | None = None,
  max_side: int = 0,
  workers: int | None = None,
  max_pixels: int = images_lib.MAX_PIXELS,
  chunk_size: int = 10_000,
  progress: bool = True,
) -> dict:
  """Prepares `inputs` (--input: a string or a list of them) of `format` (FORMATS) as the folder `output` (module
  docstring); returns its dataset_info. Resumes a folder left unfinished; a folder already finished from the same
  inputs and options is returned as it is. `workers` processes (default: the CPUs; 1 runs in this process)."""
  source_format = format
  if source_format not in FORMATS:
    raise ValueError(f"Unknown format {source_format!r}: give one of {', '.join(FORMATS)}.")
  if max_side < 0 or max_pixels < 1 or chunk_size < 1 or (workers is not None and workers < 1):
    raise ValueError("--max_side must be at least 0, and --max_pixels, --chunk_size and --workers at least 1.")
  if images is not None and source_format not in ("coco", "vg"):
    raise ValueError(
      f"--images applies to --format=coco and vg only; --format={source_format} reads the images from --input."
    )
  output = os.path.abspath(output)
  synthetic = _synthetic_identity(synthetic_captions)
  paths, units = _plan(source_format, inputs, images, chunk_size)
  options = {"max_side": max_side, "max_pixels": max_pixels, "synthetic_captions": synthetic}
  info_fields = {
    "source_format": source_format,
    "inputs": paths,
    "images": os.path.abspath(images) if images else None,
    "options": {**options, "chunk_size": chunk_size} if source_format not in FILE_FORMATS else options,
  }
  done = _check_output(output, {u["name"] for u in units}, info_fields)
  if done is not None:
    return done

  os.makedirs(os.path.join(output, prepared.SHARDS_DIR), exist_ok=True)
  reports = {u["name"]: _finished_report(output, u, source_format, options) for u in units}
  todo = [u for u in units if reports[u["name"]] is None]
  for u in todo:
    _clear_unit(output, u["name"])
  if todo:
    index = None
    if synthetic_captions:
      index = _build_synthetic_index(synthetic_captions, output, "url" if source_format in FILE_FORMATS else "image")
    tasks = [
      {"output": output, "unit": u, "options": options, "format": source_format, "synthetic_index": index} for u in todo
    ]
    for report in _run_units(tasks, workers or os.cpu_count() or 1, len(units), progress):
      reports[report["name"]] = report

  info = {"format_version": prepared.FORMAT_VERSION, **info_fields}
  info["shards"] = [u["name"] for u in units]
  info["num_samples"] = {u["name"]: reports[u["name"]]["num_samples"] for u in units}
  info["total_samples"] = sum(info["num_samples"].values())
  skipped = collections.Counter()
  for r in reports.values():
    skipped.update(r["skipped"])
  info["skipped"] = {r: skipped[r] for r in SKIP_REASONS}
  info["skipped_per_input"] = {n: r["skipped"] for n, r in reports.items() if r["skipped"]}
  if source_format == "parquet":
    info["not_downloaded"] = sum(r["not_downloaded"] for r in reports.values())
  errors = {n: r["input_error"] for n, r in reports.items() if "input_error" in r}
  if errors:
    info["input_errors"] = errors
  _write_json(os.path.join(output, prepared.INFO_FILE), info)
  if os.path.exists(os.path.join(output, SYNTHETIC_INDEX)):
    os.remove(os.path.join(output, SYNTHETIC_INDEX))
  return info


def _run_units(tasks: list[dict], workers: int, num_units: int, progress: bool):
  """Runs the tasks (in this process for one worker), yielding each report as its unit finishes, with a
  progress bar of units and samples."""
  workers = min(workers, len(tasks))
  # "spawn": images.py imports JAX, which is multithreaded, so a forked child could inherit a held lock.
  ctx = multiprocessing.get_context("spawn")
  counter = ctx.Value("q", 0)
  bar = tqdm.tqdm(
    total=num_units, initial=num_units - len(tasks), unit="unit", desc="prepare", disable=None if progress else True
  )
  start = time.time()

  def done(report):
    n = counter.value
    bar.set_postfix_str(f"{n} samples, {n / max(time.time() - start, 1e-9):.0f}/s", refresh=False)
    bar.update(1 if report else 0)
    return report

  try:
    if workers <= 1:
      _init_worker(counter)
      try:
        for task in tasks:
          yield done(_run_unit(task))
      finally:
        _init_worker(None)
      return
    # A worker that dies (killed for memory, say) fails the run with BrokenProcessPool rather than hanging it.
    with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
      running = {pool.submit(_run_unit, task) for task in tasks}
      try:
        while running:
          finished, running = futures.wait(running, timeout=0.5, return_when=futures.FIRST_COMPLETED)
          done(None)
          for f in finished:
            yield done(f.result())
      finally:
        for f in running:
          f.cancel()
  finally:
    bar.close()


# ------------------------------------------------------------------------------------------- the report


def _reasons(skipped: dict) -> str:
  return ", ".join(f"{r} {n}" for r, n in skipped.items() if n)


def format_report(info: dict, output: str) -> str:
  """The end-of-run summary: totals, then the inputs with skipped samples (the most first, at most REPORT_LINES)."""
  total_skipped = sum(info["skipped"].values())
  lines = [
    f"{output}: {info['total_samples']} samples in {len(info['shards'])} shards from {len(info['inputs'])} "
    f"{info['source_format']} input{'s' if len(info['inputs']) != 1 else ''}; skipped {total_skipped}"
    + (f" ({_reasons(info['skipped'])})" if total_skipped else "")
    + (f"; {info['not_downloaded']} rows whose download had failed" if info.get("not_downloaded") else "")
  ]
  per_input = info["skipped_per_input"]
  if per_input:
    unit = "inputs" if info["source_format"] in FILE_FORMATS else "chunks"
    lines.append(
      f"{unit} with skipped samples: {len(per_input)} of {len(info['shards'])} (the keys of the first few of each "
      f"reason: {os.path.join(output, prepared.SHARDS_DIR, 'NAME.json')})"
    )
    ranked = sorted(per_input.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    for name, skipped in ranked[:REPORT_LINES]:
      lines.append(f"  {name}: {sum(skipped.values())} ({_reasons(skipped)})")
    if len(ranked) > REPORT_LINES:
      lines.append(f"  ... and {len(ranked) - REPORT_LINES} more")
  for name, error in sorted(info.get("input_errors", {}).items()):
    lines.append(f"  {name}: read only in part: {error}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------- command line


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}; pass everything as --flags.")
  f = flags.FLAGS
  missing = [f"--{n}" for n in ("format", "input", "output") if not f[n].value]
  if missing:
    sys.exit(f"error: give {', '.join(missing)} (python -m blip2_jax.data.prepare --helpshort lists the flags).")
  try:
    info = prepare(
      f.format,
      f.input,
      f.output,
      images=f.images,
      synthetic_captions=f.synthetic_captions,
      max_side=f.max_side,
      workers=f.workers,
      max_pixels=f.max_pixels,
      chunk_size=f.chunk_size,
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(format_report(info, os.path.abspath(f.output)))


if __name__ == "__main__":
  # Tests import this module: its flags exist only when it is the program (evaluate.py has an --images too).
  # A string, not an enum, so that an unknown format is prepare()'s one-line error.
  flags.DEFINE_string("format", None, f"The layout of --input: {', '.join(FORMATS)} (module docstring).")
  flags.DEFINE_string(
    "input",
    None,
    "webdataset / parquet: files, a folder, a glob, a brace range or a comma-separated list; coco / vg: the "
    "annotation file; folder: the folder.",
  )
  flags.DEFINE_string("output", None, "The prepared folder to write (or to resume).")
  flags.DEFINE_string("images", None, "coco / vg: the folder of the images the annotation file names.")
  flags.DEFINE_string(
    "synthetic_captions", None, 'BLIP\'s synthetic captions JSON ([{"url" or "image", "caption"}]) to append.'
  )
  flags.DEFINE_integer("max_side", 0, "Resize images whose longer side exceeds this (JPEG q95); 0 keeps the bytes.")
  flags.DEFINE_integer("workers", None, "Worker processes (default: the number of CPUs; 1: no worker processes).")
  flags.DEFINE_integer("max_pixels", images_lib.MAX_PIXELS, "Images of more pixels are skipped (decompression bombs).")
  flags.DEFINE_integer("chunk_size", 10_000, "coco / vg / folder: images per unit (shard).")
  app.run(main, flags_parser=cli.parse_flags)
