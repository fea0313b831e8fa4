"""coco_captions: converts local COCO-format caption files and their images into TFDS array_record.

Builder kwargs (in `config.data.builder_kwargs`):
  image_dir:          folder that the annotations' `file_name`s are relative to.
  train_annotations, val_annotations, test_annotations: COCO-format JSON files
      {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]};
      each one given becomes that split (e.g. the Karpathy splits converted to this format).

One example per (image, caption), so a training batch samples captions like LAVIS does; the eval reader
groups an image's captions back together by `image_id`. Image bytes are stored exactly as they are on disk
(no re-encoding), and decoded by the pipeline with PIL.

Not registered with TFDS: TFDS's own catalog already has a (TensorFlow-based) `coco_captions`, and
`pipeline.get_source` constructs this class by name.
"""

import dataclasses
import hashlib
import json
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(eq=False, kw_only=True)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
  image_dir: str = ""
  annotations: dict = dataclasses.field(default_factory=dict)  # split -> annotation file


class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """COCO-style captions from local files."""

  name = "coco_captions"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  code_path = epath.Path(__file__)  # see SyntheticShapes.code_path

  def __init__(
    self,
    *,
    image_dir: str,
    train_annotations: str | None = None,
    val_annotations: str | None = None,
    test_annotations: str | None = None,
    **kwargs,
  ):
    given = dict(zip(SPLITS, (train_annotations, val_annotations, test_annotations)))
    annotations = {split: os.path.abspath(path) for split, path in given.items() if path}
    if not annotations:
      raise ValueError(
        "coco_captions needs at least one of train_annotations, val_annotations, "
        "test_annotations in data.builder_kwargs."
      )
    # The config name hashes the inputs, so converting other files never reuses stale output.
    digest = hashlib.sha1(json.dumps([os.path.abspath(image_dir), annotations], sort_keys=True).encode())
    config = CocoCaptionsConfig(
      name=f"files_{digest.hexdigest()[:10]}", image_dir=os.path.abspath(image_dir), annotations=annotations
    )
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          # Stored as the bytes on disk; the format flag is only a label, nothing re-encodes them.
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "caption": tfds.features.Text(),
          "image_id": tfds.features.Scalar(np.int64),
        }
      ),
      # Keep the annotation order, so "example i" in a warning is annotation i of the file.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    for path in [cfg.image_dir, *cfg.annotations.values()]:
      if not os.path.exists(path):
        raise FileNotFoundError(
          f"coco_captions input {path!r} does not exist; check image_dir and the "
          f"*_annotations paths in data.builder_kwargs."
        )
    return {split: self._generate_examples(path) for split, path in cfg.annotations.items()}

  def _generate_examples(self, annotation_path: str):
    with open(annotation_path, encoding="utf-8") as f:
      coco = json.load(f)
    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    for k, ann in enumerate(coco["annotations"]):
      path = os.path.join(self.builder_config.image_dir, file_names[ann["image_id"]])
      if not os.path.isfile(path):
        raise FileNotFoundError(
          f"Image {path!r} (image_id {ann['image_id']} in {annotation_path!r}) does not exist; check image_dir."
        )
      with open(path, "rb") as f:
        data = f.read()
      yield k, {"image": data, "caption": ann["caption"], "image_id": ann["image_id"]}
