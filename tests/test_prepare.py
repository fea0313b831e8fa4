"""blip2_jax.data.prepare: every source format to prepared records, the report of what was skipped and why, resume
after a failure or a kill (identical output), and one-line errors for bad input."""

import concurrent.futures
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import img2dataset_fixtures as fixtures
from PIL import Image
import pytest

from blip2_jax.data import images as images_lib
from blip2_jax.data import prepare
from blip2_jax.data import prepared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(out: str) -> list[dict]:
  source = prepared.PreparedSource(out)
  return [source[i] for i in range(len(source))]


def check_records(records: list[dict], expected: dict, synthetic: dict | None = None):
  """Each record is an expected sample: its captions (web, then synthetic), original bytes, upright size."""
  assert sorted(r["key"] for r in records) == sorted(expected["samples"])
  for r in records:
    want = expected["samples"][r["key"]]
    assert r["captions"] == want["captions"] + (synthetic or {}).get(r["key"], []), r["key"]
    assert hashlib.sha256(r["image"]).hexdigest() == want["sha256"], r["key"]
    assert (r["width"], r["height"]) == (want["width"], want["height"]), r["key"]
    assert images_lib.decode(r["image"]).size == (r["width"], r["height"])


def check_counts(info: dict, expected: dict):
  assert info["total_samples"] == expected["num_samples"] == sum(info["num_samples"].values())
  assert {k: v for k, v in info["skipped"].items() if v} == expected["skipped"]
  assert set(info["skipped"]) == set(prepare.SKIP_REASONS)


def unit_report(out: str, name: str) -> dict:
  with open(prepared.report_path(out, name)) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------- formats


def test_webdataset_records_report_and_synthetic_captions(tmp_path):
  expected = fixtures.make_webdataset(str(tmp_path / "wds"), num_shards=3, per_shard=12)
  synthetic = fixtures.make_synthetic_captions(str(tmp_path / "syn.json"), expected, match="url")
  out = str(tmp_path / "out")
  info = prepare.prepare(
    "webdataset", str(tmp_path / "wds"), out, synthetic_captions=str(tmp_path / "syn.json"), workers=1, progress=False
  )
  check_counts(info, expected)
  assert info["shards"] == ["00000", "00001", "00002"]  # the tars only, not img2dataset's .parquet beside them
  assert info["num_samples"] == {n: p["num_samples"] for n, p in expected["per_input"].items()}
  assert info["skipped_per_input"] == {n: p["skipped"] for n, p in expected["per_input"].items() if p["skipped"]}
  records = read_records(out)
  assert [r["key"] for r in records] == list(expected["samples"])  # shard order, then tar order
  check_records(records, expected, synthetic)
  assert any(len(s) == 2 for s in synthetic.values())  # a list of captions and repeated urls are both appended
  # Each unit's report names its skipped samples by reason.
  for name, per in expected["per_input"].items():
    report = unit_report(out, name)
    assert report["skipped"] == per["skipped"]
    for reason, keys in report["skipped_examples"].items():
      assert all(expected["skipped_keys"][k] == reason for k in keys)
  text = prepare.format_report(info, out)
  assert f"{expected['num_samples']} samples in 3 shards" in text
  for name, per in expected["per_input"].items():
    assert (f"  {name}: {sum(per['skipped'].values())} (" in text) == bool(per["skipped"])
  assert not os.path.exists(os.path.join(out, prepare.SYNTHETIC_INDEX))  # removed once finished


def test_parquet_in_worker_processes(tmp_path):
  expected = fixtures.make_parquet(str(tmp_path / "pq"), num_files=2, per_file=16)
  synthetic = fixtures.make_synthetic_captions(str(tmp_path / "syn.json"), expected, match="url")
  out = str(tmp_path / "out")
  info = prepare.prepare(
    "parquet", str(tmp_path / "pq"), out, synthetic_captions=str(tmp_path / "syn.json"), workers=2, progress=False
  )
  check_counts(info, expected)
  assert info["not_downloaded"] == expected["not_downloaded"] == 2  # failed downloads are not samples
  assert info["skipped_per_input"] == {n: p["skipped"] for n, p in expected["per_input"].items() if p["skipped"]}
  records = read_records(out)
  assert [r["key"] for r in records] == list(expected["samples"])
  check_records(records, expected, synthetic)


def test_max_side_reencodes_only_larger_images(tmp_path):
  expected = fixtures.make_webdataset(str(tmp_path / "wds"), num_shards=1, per_shard=20, broken=False)
  out = str(tmp_path / "out")
  prepare.prepare("webdataset", str(tmp_path / "wds"), out, max_side=100, workers=1, progress=False)
  resized = 0
  for r in read_records(out):
    want = expected["samples"][r["key"]]
    if max(want["width"], want["height"]) <= 100:
      assert hashlib.sha256(r["image"]).hexdigest() == want["sha256"]  # kept as it was
      continue
    resized += 1
    image = Image.open(io.BytesIO(r["image"]))
    assert image.format == "JPEG" and image.size == (r["width"], r["height"]) and max(image.size) == 100
    assert abs(r["width"] / r["height"] - want["width"] / want["height"]) < 0.02  # aspect kept
  assert resized == 2  # 640x480 -> 100x75 and 200x500 -> 40x100


@pytest.mark.parametrize("layout", ["official", "karpathy"])
def test_coco_one_record_per_image_in_chunks(tmp_path, layout):
  expected = fixtures.make_coco(str(tmp_path / "coco"), num_images=16, layout=layout)
  synthetic = fixtures.make_synthetic_captions(str(tmp_path / "syn.json"), expected, match="image")
  out = str(tmp_path / "out")
  # --images is the COCO root: the official file names no folder, so images are found by name (train2017/).
  info = prepare.prepare(
    "coco",
    expected["annotations"],
    out,
    images=str(tmp_path / "coco"),
    synthetic_captions=str(tmp_path / "syn.json"),
    chunk_size=5,
    workers=1,
    progress=False,
  )
  stem = os.path.splitext(os.path.basename(expected["annotations"]))[0]
  assert info["shards"] == [f"{stem}-{i:05d}" for i in range(4)]  # 17 images named, 5 per unit
  check_counts(info, expected)
  records = read_records(out)
  assert [r["key"] for r in records] == list(expected["samples"])  # the annotation file's order
  check_records(records, expected, synthetic)
  assert max(len(r["captions"]) for r in records) > 3


@pytest.mark.parametrize("layout", ["regions", "lavis"])
def test_visual_genome_layouts(tmp_path, layout):
  expected = fixtures.make_vg(str(tmp_path / "vg"), num_images=8, layout=layout)
  out = str(tmp_path / "out")
  info = prepare.prepare("vg", expected["annotations"], out, images=expected["images"], workers=1, progress=False)
  check_counts(info, expected)
  assert info["skipped"]["missing_image"] == info["skipped"]["truncated"] == 1
  check_records(read_records(out), expected)


@pytest.mark.parametrize("captions", ["sidecar", "metadata"])
def test_folder_of_images(tmp_path, captions):
  expected = fixtures.make_folder(str(tmp_path / "images"), num_images=9, captions=captions)
  synthetic = fixtures.make_synthetic_captions(str(tmp_path / "syn.json"), expected, match="image")
  out = str(tmp_path / "out")
  info = prepare.prepare(
    "folder", str(tmp_path / "images"), out, synthetic_captions=str(tmp_path / "syn.json"), workers=1, progress=False
  )
  check_counts(info, expected)
  records = read_records(out)
  check_records(records, expected, synthetic)
  assert any(len(r["captions"]) >= 2 for r in records)  # several lines / a list of captions


def test_a_tar_cut_short_keeps_the_samples_before_the_cut(tmp_path):
  expected = fixtures.make_webdataset(str(tmp_path / "wds"), num_shards=2, per_shard=16, broken=False, zoo=False)
  tar = tmp_path / "wds" / "00001.tar"
  tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # as a killed download leaves it
  out = str(tmp_path / "out")
  info = prepare.prepare("webdataset", str(tmp_path / "wds"), out, workers=1, progress=False)
  assert list(info["input_errors"]) == ["00001"] and "unexpected end of data" in info["input_errors"]["00001"]
  assert info["num_samples"]["00000"] == 16 and 0 < info["num_samples"]["00001"] < 16
  records = read_records(out)
  check_records(records, {"samples": {r["key"]: expected["samples"][r["key"]] for r in records}})
  assert "00001: read only in part" in prepare.format_report(info, out)


def test_input_specs(tmp_path):
  for sub in ("cc3m", "cc12m"):
    os.makedirs(tmp_path / sub)
    for i in range(3):
      (tmp_path / sub / f"{i:05d}.tar").write_bytes(b"")
  d, ext = str(tmp_path), (".tar",)
  cc3m = [f"{d}/cc3m/{i:05d}.tar" for i in range(3)]
  assert prepare.expand_inputs(f"{d}/cc3m", ext) == cc3m
  assert prepare.expand_inputs(f"{d}/cc3m/*.tar", ext) == cc3m
  assert prepare.expand_inputs(f"{d}/cc3m/{{00000..00002}}.tar", ext) == cc3m
  assert prepare.expand_inputs(f"{d}/cc3m/{{00002,00000}}.tar,{d}/cc3m/00000.tar", ext) == [cc3m[2], cc3m[0]]
  both = prepare.expand_inputs(f"{d}/cc3m,{d}/cc12m/0000[01].tar", ext)
  assert prepare._unit_names(both) == ["cc3m_00000", "cc3m_00001", "cc3m_00002", "cc12m_00000", "cc12m_00001"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prepare.expand_inputs(f"{d}/cc3m/{{00000..00003}}.tar", ext)


def test_synthetic_captions_json_is_read_in_pieces(tmp_path, monkeypatch):
  entries = [{"url": f"u{i}", "caption": ["a , ]", f"b {i}"] if i % 2 else "c {x}"} for i in range(50)]
  path = tmp_path / "syn.json"
  path.write_text(json.dumps(entries, indent=2))
  monkeypatch.setattr(prepare, "JSON_READ_CHUNK", 7)  # entries split across reads everywhere
  assert list(prepare._iter_json_list(str(path))) == entries
  path.write_text(json.dumps(entries)[:-30])
  with pytest.raises(ValueError, match="syn.json"):
    list(prepare._iter_json_list(str(path)))


# ------------------------------------------------------------------------------------------- resume

NUM_SHARDS = 6


@pytest.fixture(scope="module")
def webdataset_run(tmp_path_factory):
  """A webdataset of NUM_SHARDS tars with synthetic captions, and its uninterrupted preparation."""
  root = tmp_path_factory.mktemp("resume")
  wds, syn, ref = str(root / "wds"), str(root / "syn.json"), str(root / "reference")
  expected = fixtures.make_webdataset(wds, num_shards=NUM_SHARDS, per_shard=8)
  fixtures.make_synthetic_captions(syn, expected)
  info = prepare.prepare("webdataset", wds, ref, synthetic_captions=syn, workers=1, progress=False)
  return {"root": root, "wds": wds, "syn": syn, "reference": ref, "info": info}


def assert_same_dataset(out: str, reference: str):
  """Byte-identical shards and the same dataset_info (which holds no timings)."""
  assert prepared.read_info(out) == prepared.read_info(reference)
  for name in prepared.read_info(reference)["shards"]:
    with open(prepared.shard_path(out, name), "rb") as a, open(prepared.shard_path(reference, name), "rb") as b:
      assert a.read() == b.read(), name
  assert read_records(out) == read_records(reference)
  assert not glob.glob(os.path.join(out, prepared.SHARDS_DIR, "*.tmp-*"))


def test_resume_after_a_failure_is_identical(webdataset_run, tmp_path, monkeypatch):
  run = webdataset_run
  out = str(tmp_path / "out")
  calls, fail_at = [], [3]

  def fail_on_third(task):
    calls.append(task["unit"]["name"])
    if len(calls) in fail_at:
      raise RuntimeError("injected")
    return real(task)

  real = prepare._run_unit
  monkeypatch.setattr(prepare, "_run_unit", fail_on_third)
  with pytest.raises(RuntimeError, match="injected"):
    prepare.prepare("webdataset", run["wds"], out, synthetic_captions=run["syn"], workers=1, progress=False)
  with pytest.raises(FileNotFoundError, match="unfinished prepared dataset"):
    prepared.read_info(out)
  # What a killed run leaves: a temporary shard, and a renamed shard whose report was never written.
  shards = os.path.join(out, prepared.SHARDS_DIR)
  with open(os.path.join(shards, "00003.array_record.tmp-99999999"), "wb") as f:
    f.write(b"partial")
  with open(prepared.shard_path(out, "00004"), "wb") as f:
    f.write(b"no report")

  calls.clear()
  fail_at.clear()
  info = prepare.prepare("webdataset", run["wds"], out, synthetic_captions=run["syn"], workers=1, progress=False)
  assert calls == ["00002", "00003", "00004", "00005"]  # the finished units are not redone
  assert info == run["info"]
  assert_same_dataset(out, run["reference"])
  calls.clear()
  assert prepare.prepare("webdataset", run["wds"], out, synthetic_captions=run["syn"], workers=1) == info
  assert calls == []  # a finished folder prepared alike: nothing to do


def _feed_fifo(fifo: str, data: bytes, release: threading.Event):
  """Writes `data` into the named pipe `fifo` (the tar a worker reads), then holds it open until `release`."""
  try:
    with open(fifo, "wb") as f:
      f.write(data)
      f.flush()
      release.wait(120)
  except OSError:  # the reader was killed
    pass


def test_resume_after_kill_is_identical(webdataset_run, tmp_path):
  """The command line, killed (SIGKILL, workers and all) while one worker is inside a tar and the others have
  finished theirs, then run again: the same records and dataset_info as an uninterrupted run."""
  run = webdataset_run
  out = str(tmp_path / "out")
  tar = os.path.join(run["wds"], "00002.tar")
  with open(tar, "rb") as f:
    tar_bytes = f.read()
  os.rename(tar, tar + ".real")
  os.mkfifo(tar)  # the worker of this unit blocks reading it: the kill lands mid-unit, not by timing
  release = threading.Event()
  feeder = threading.Thread(target=_feed_fifo, args=(tar, tar_bytes[: len(tar_bytes) // 2], release), daemon=True)
  feeder.start()
  command = [sys.executable, "-m", "blip2_jax.data.prepare", "--format=webdataset", f"--input={run['wds']}"]
  command += [f"--output={out}", f"--synthetic_captions={run['syn']}"]
  try:
    proc = subprocess.Popen(
      command + ["--workers=2"], cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    others = [n for n in run["info"]["shards"] if n != "00002"]
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      reports = all(os.path.exists(prepared.report_path(out, n)) for n in others)
      if reports and glob.glob(prepared.shard_path(out, "00002") + ".tmp-*"):
        break
      time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    release.set()
    fd = os.open(tar, os.O_RDONLY | os.O_NONBLOCK)  # lets the feeder's open() return if no worker opened it
    os.close(fd)
    feeder.join(10)
    os.remove(tar)
    os.rename(tar + ".real", tar)
  assert not os.path.exists(os.path.join(out, prepared.INFO_FILE))
  assert not os.path.exists(prepared.report_path(out, "00002"))
  assert glob.glob(prepared.shard_path(out, "00002") + ".tmp-*")  # the killed worker's partial shard

  r = subprocess.run(command + ["--workers=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"{run['info']['total_samples']} samples in {NUM_SHARDS} shards" in r.stdout
  assert_same_dataset(out, run["reference"])


def test_other_inputs_or_options_are_refused(webdataset_run, tmp_path):
  run = webdataset_run
  with pytest.raises(ValueError, match="prepared from other inputs or options"):
    prepare.prepare("webdataset", run["wds"], run["reference"], synthetic_captions=run["syn"], max_side=64)
  # An unfinished folder: its unit reports say how they were made.
  out = str(tmp_path / "out")
  shutil.copytree(run["reference"], out)
  os.remove(os.path.join(out, prepared.INFO_FILE))
  with pytest.raises(ValueError, match="its unit 00000 was made with options"):
    prepare.prepare("webdataset", run["wds"], out, workers=1)
  with pytest.raises(ValueError, match="shard 00005 is none of this --input's"):
    prepare.prepare("webdataset", f"{run['wds']}/0000[0-4].tar", out, synthetic_captions=run["syn"], workers=1)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(tmp_path):
  wds = str(tmp_path / "wds")
  fixtures.make_webdataset(wds, num_shards=1, per_shard=16)
  vg = fixtures.make_vg(str(tmp_path / "vg"), num_images=2)
  out = str(tmp_path / "out")
  # The command line prints prepare()'s errors as they are, after "error: ".
  cases = {
    "unknown format": (["--format=tfrecord", f"--input={wds}"], "Unknown format 'tfrecord'"),
    "no input": (["--format=webdataset"], "give --input"),
    "missing input": (["--format=webdataset", f"--input={tmp_path}/nope.tar"], "nope.tar (--input) does not"),
    "vg file as coco": (
      ["--format=coco", f"--input={vg['annotations']}", f"--images={vg['images']}"],
      "is not an official COCO captions file",
    ),
  }

  def run(args):
    command = [sys.executable, "-m", "blip2_jax.data.prepare", "--workers=1", f"--output={out}", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(cases, pool.map(run, [args for args, _ in cases.values()])))
  for case, (_, message) in cases.items():
    r = results[case]
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (case, r.stderr[-2000:])
    assert message in lines[0], (case, lines[0])

  os.makedirs(tmp_path / "empty")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  api_cases = [
    (("webdataset", str(tmp_path / "empty"), out), {}, "has no .tar"),
    (("parquet", wds, out), {}, "use --format=webdataset"),  # img2dataset's metadata beside the tars
    (("vg", vg["annotations"], out), {}, "needs --images"),
    (("vg", vg["annotations"], out), {"images": str(tmp_path / "empty")}, "None of the first 4 images"),
    (("webdataset", wds, out), {"images": vg["images"]}, "--images applies to --format=coco and vg only"),
    (("webdataset", wds, str(tmp_path / "busy")), {}, "holds other files"),
    (("webdataset", wds, out), {"max_side": -1}, "--max_side must be at least 0"),
  ]
  for args, kwargs, message in api_cases:
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as e:
      prepare.prepare(*args, **kwargs, workers=1)
    assert "\n" not in str(e.value)
