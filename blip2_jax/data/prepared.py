"""Prepared datasets: image-text records in array_record files, written by `python -m blip2_jax.data.prepare`.

A prepared dataset is a folder:

  DIR/dataset_info.json          written last: its presence means the folder is complete
  DIR/shards/NAME.array_record   one per unit of input (a tar or parquet file, or a chunk of an annotation file)
  DIR/shards/NAME.json           that unit's report; written after its shard, so it marks the shard finished

Each record is a msgpack map {"key": str, "image": bytes, "captions": [str, ...], "width": int, "height": int}:
the image as its original encoded bytes (or re-encoded smaller, see prepare.py), upright size in pixels, and
every caption of the image (the web caption first, then any synthetic ones). Records are read at random by grain
(PreparedSource), so a mixture of such folders can be shuffled globally, split across hosts and resumed exactly.
"""

import json
import os

from array_record.python import array_record_module
import grain
import msgpack

INFO_FILE = "dataset_info.json"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1
# One record per chunk: random access reads one record, not a group (grain's advice for shuffled reading).
WRITER_OPTIONS = "group_size:1"


def encode_record(key: str, image: bytes, captions: list[str], width: int, height: int) -> bytes:
  return msgpack.packb(
    {"key": key, "image": image, "captions": list(captions), "width": width, "height": height}, use_bin_type=True
  )


def decode_record(data: bytes) -> dict:
  return msgpack.unpackb(data, raw=False)


def shard_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, SHARDS_DIR, f"{name}.array_record")


def report_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, SHARDS_DIR, f"{name}.json")


class ShardWriter:
  """Writes one shard to a temporary name; `commit()` moves it into place, so a killed write is never taken for a
  finished shard. Use as a context manager: leaving it by an exception removes the temporary file."""

  def __init__(self, out_dir: str, name: str):
    self.path = shard_path(out_dir, name)
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._tmp = f"{self.path}.tmp-{os.getpid()}"
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self.count = 0

  def write(self, record: bytes):
    self._writer.write(record)
    self.count += 1

  def commit(self):
    self._writer.close()
    self._writer = None
    os.replace(self._tmp, self.path)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      if os.path.exists(self._tmp):
        os.remove(self._tmp)


def read_info(path: str) -> dict:
  """The dataset_info.json of a prepared folder; one clear error if the folder is not a finished prepared dataset."""
  info_path = os.path.join(path, INFO_FILE)
  if not os.path.isfile(info_path):
    if os.path.isdir(os.path.join(path, SHARDS_DIR)):
      raise FileNotFoundError(
        f"{path} is an unfinished prepared dataset (no {INFO_FILE}): rerun `python -m blip2_jax.data.prepare` "
        "with the same --output to finish it."
      )
    raise FileNotFoundError(
      f"{path} is not a prepared dataset (no {INFO_FILE}); make one with `python -m blip2_jax.data.prepare "
      f"--format=... --input=... --output={path}`."
    )
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{info_path} has format_version {info.get('format_version')!r}; this blip2_jax reads {FORMAT_VERSION}."
    )
  return info


class PreparedSource(grain.sources.RandomAccessDataSource):
  """A prepared folder as a random-access source of decoded records (dicts, see the module docstring)."""

  def __init__(self, path: str):
    self.path = path
    self.info = read_info(path)
    shards = [shard_path(path, name) for name in self.info["shards"] if self.info["num_samples"][name]]
    for shard in shards:
      if not os.path.isfile(shard):
        raise FileNotFoundError(f"{shard}, listed in {os.path.join(path, INFO_FILE)}, does not exist.")
    self._records = grain.sources.ArrayRecordDataSource(shards) if shards else []

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._records[index])

  def __repr__(self) -> str:
    return f"PreparedSource({self.path!r}, {len(self)} records)"
