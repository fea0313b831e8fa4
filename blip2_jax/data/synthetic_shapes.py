"""synthetic_shapes: a tiny, generated image-caption dataset for the demo and the tests.

Each image is black with `num_objects` objects (4 by default: one per quadrant; 1 to 4), each in its own
quadrant. An object is a (size, colour, shape), and the caption names every object and its quadrant in a
fixed order, so the caption is a complete, unique description of the picture:

    "large red circle top left, small blue square top right, small green triangle bottom left,
     large white circle bottom right"

With 4 objects there are 36^4 = 1,679,616 distinct captions (3 objects: 186,624; 2 objects: 7,776). Two of a
random 1,000 rarely differ in only one or two attributes, so retrieval over them asks a model to see every
object, without hinging on the finest single-attribute differences from the first steps. The `test` split is
`num_test` of them, each used once; `train` samples its images from the other combinations only, so every
test caption is a combination never seen in training (a check of compositional generalisation, not of
memorisation).

Nothing is downloaded: the data is drawn with PIL from `seed`, deterministically. The builder is not
registered in TFDS's global registry (that raises on a second import of the module); `pipeline.get_source`
constructs it by name. Different generation arguments get different config names, so they never share a
folder under `data_dir`.

A note for configs: a small random crop can cut an object out of the picture (and then the caption is
wrong), so keep `crop_scale` near 1 for this data (at >= 0.8 an object loses a few pixels at most).
A horizontal flip keeps the caption true (the pipeline swaps left/right), but of two objects in the same
row it puts their clauses out of the canonical order.
"""

import dataclasses
import io
import itertools

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

SIZES = ("small", "large")
COLOURS = {  # far apart in RGB, so a colour is never ambiguous even after resizing
  "red": (255, 0, 0),
  "green": (0, 255, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 255, 0),
  "white": (255, 255, 255),
  "purple": (160, 0, 255),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # also the caption order

OBJECTS = list(itertools.product(SIZES, COLOURS, SHAPES))  # 36


def quadrant_sets(num_objects: int) -> list[tuple[int, ...]]:
  """Which quadrants hold objects, each tuple in caption order."""
  if not 1 <= num_objects <= len(QUADRANTS):
    raise ValueError(f"num_objects must be in [1, {len(QUADRANTS)}]; got {num_objects}.")
  return list(itertools.combinations(range(len(QUADRANTS)), num_objects))


def num_combinations(num_objects: int) -> int:
  return len(quadrant_sets(num_objects)) * len(OBJECTS) ** num_objects


def vocabulary() -> list[str]:
  """Every word and punctuation mark a caption can use (demo_vocab.txt lists these)."""
  words = ["a", *SIZES, *COLOURS, *SHAPES]
  for quadrant in QUADRANTS:
    words += [w for w in quadrant.split() if w not in words]
  return words + [","]


def combination(index: int, num_objects: int) -> list[tuple[int, tuple[str, str, str]]]:
  """The scene numbered `index` in [0, num_combinations): [(quadrant, (size, colour, shape)), ...]."""
  where, rest = divmod(index, len(OBJECTS) ** num_objects)
  objects = []
  for _ in range(num_objects):
    rest, o = divmod(rest, len(OBJECTS))
    objects.append(OBJECTS[o])
  return list(zip(quadrant_sets(num_objects)[where], objects))


def caption(scene) -> str:
  return ", ".join(f"{size} {colour} {shape} {QUADRANTS[q]}" for q, (size, colour, shape) in scene)


def draw(scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Draws the scene as uint8 [S, S, 3]; the only randomness is a jitter of each object's position."""
  half = image_size // 2
  # Large is twice small (16 vs 8 px across at 48 px), and the jitter keeps even a large object 2 px or
  # more inside its quadrant, so objects never touch and each quadrant holds at most one.
  extent = {"small": image_size // 6, "large": image_size // 3}
  jitter = max(1, image_size // 24)
  image = Image.new("RGB", (image_size, image_size))
  canvas = ImageDraw.Draw(image)
  for q, (size, colour, shape) in scene:
    side = extent[size]
    dy, dx = rng.integers(-jitter, jitter + 1, size=2)
    x0 = (q % 2) * half + (half - side) // 2 + int(dx)
    y0 = (q // 2) * half + (half - side) // 2 + int(dy)
    x1, y1 = x0 + side - 1, y0 + side - 1
    fill = COLOURS[colour]
    if shape == "circle":
      canvas.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
      canvas.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle pointing up
      canvas.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
  return np.asarray(image)


def split_combinations(num_test: int, seed: int, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
  """(test, train) scene numbers: a seeded random `num_test` are held out for test, the rest train."""
  total = num_combinations(num_objects)
  if not 0 < num_test <= total // 2:
    raise ValueError(
      f"num_test must be in [1, {total // 2}] so that every test caption is "
      f"distinct and enough combinations are left for train; got {num_test}."
    )
  order = np.random.default_rng(seed).permutation(total)
  return order[:num_test], order[num_test:]


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 48
  num_train: int = 20_000
  num_test: int = 1_000
  num_objects: int = 4
  seed: int = 0


class SyntheticShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Coloured shapes on black, with a caption that describes them exactly."""

  name = "synthetic_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # TFDS would find this file through the `importlib_resources` backport, an optional extra of etils that
  # is not installed; naming it directly avoids that import.
  code_path = epath.Path(__file__)

  def __init__(
    self,
    *,
    image_size: int = 48,
    num_train: int = 20_000,
    num_test: int = 1_000,
    num_objects: int = 4,
    seed: int = 0,
    **kwargs,
  ):
    config = SyntheticShapesConfig(
      name=f"size{image_size}_obj{num_objects}_train{num_train}_test{num_test}_seed{seed}",
      image_size=image_size,
      num_train=num_train,
      num_test=num_test,
      num_objects=num_objects,
      seed=seed,
    )
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
          "caption": tfds.features.Text(),
          "image_id": tfds.features.Scalar(np.int64),
        }
      ),
      # Keep examples in generation order: image_id == position in the split, which makes the
      # data easy to inspect and the split files identical for every run with the same seed.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    test, train = split_combinations(cfg.num_test, cfg.seed, cfg.num_objects)
    train = np.random.default_rng([cfg.seed, 1]).choice(train, size=cfg.num_train)
    return {
      "train": self._generate_examples(train, first_id=0, stream=0),
      "test": self._generate_examples(test, first_id=cfg.num_train, stream=1),
    }

  def _generate_examples(self, scenes: np.ndarray, first_id: int, stream: int):
    cfg = self.builder_config
    for i, scene_index in enumerate(scenes):
      scene = combination(int(scene_index), cfg.num_objects)
      # One generator per example: example i is the same however many examples are drawn.
      rng = np.random.default_rng([cfg.seed, stream, i])
      png = io.BytesIO()
      Image.fromarray(draw(scene, cfg.image_size, rng)).save(png, format="PNG")
      # Encoded bytes, not an array: TFDS would otherwise encode with TensorFlow, which we don't ship.
      png.seek(0)
      yield i, {"image": png, "caption": caption(scene), "image_id": first_id + i}
