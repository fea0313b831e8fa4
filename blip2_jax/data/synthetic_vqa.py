"""synthetic_vqa: questions and answers about the synthetic_shapes scenes, for the VQA fine-tuning demo.

The images are synthetic_shapes' (blip2_jax/data/synthetic_shapes.py): the same scenes, drawn the same way, split
the same way (no test scene is ever a training scene). With the same generation arguments, image `image_id` here
is pixel for pixel synthetic_shapes' image `image_id`, and its caption describes it. Each image gets
`questions_per_image` questions (1 to 5), one example per question, from five templates (all lower case):

    colour    "what colour is the object at the top left?"     -> "red"
    shape     "what shape is the object at the bottom right?"  -> "circle"
    size      "what size is the object at the top right?"      -> "small"
    position  "where is the large red circle?"                 -> "top left"
    count     "how many circles are there?", "how many red objects are there?"  -> "0" ... "4"

The quadrant of a colour, shape or size question holds an object; a position question asks about an object that
occurs once in its scene (so the answer is unambiguous); a count question counts a shape or a colour (one or the
other with equal chance), present or not. Counts are answered in digits, as VQAv2's annotations write them: the
official evaluation (metrics.vqa_accuracy) turns a predicted "two" into "2" but leaves the human answers as
written, so an answer "two" would score 0 even when predicted exactly.

`answers` holds 10 copies of the one true answer (VQAv2 has 10 human answers per question), so that
metrics.vqa_accuracy scores each question 1.0 or 0.0. The question types come in equal shares: the images are
taken in blocks of 5, each block draws a permutation of the 5 types, and the m-th image of a block gets the types
at positions m, m + 1, ... (mod 5) of it, so an image never has two questions of one type and every type occurs
`questions_per_image` times per block. Where a scene has no object that occurs once (about 0.2% of 4-object
scenes, e.g. two large red circles and two small blue squares) its position question becomes a question of a type
the image has not had yet. Everything is drawn from `seed` and the example's index alone, so an example is the
same however many are generated.

A note for configs: a horizontal flip keeps a question true only if "left" and "right" are swapped in both the
question and the answer (pipeline.swap_left_right).
"""

import dataclasses
import io

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from blip2_jax.data import synthetic_shapes as shapes

QUESTION_TYPES = ("colour", "shape", "size", "position", "count")
COUNTS = ("0", "1", "2", "3", "4")  # VQAv2 writes numbers in digits (see the module docstring)
NUM_ANSWERS = 10  # human answers per question, as in VQAv2
MAX_QUESTIONS_PER_IMAGE = len(QUESTION_TYPES)

_ATTRIBUTE = {"size": 0, "colour": 1, "shape": 2}  # index in an object's (size, colour, shape)


def vocabulary() -> list[str]:
  """Every word and punctuation mark of the questions and answers that synthetic_shapes.vocabulary() lacks, in a
  fixed order (demo_vqa_vocab.txt appends these to demo_vocab.txt)."""
  known = set(shapes.vocabulary())
  words = []
  texts = [
    question("colour", 0),
    question("shape", 0),
    question("size", 0),
    question("position", shapes.OBJECTS[0]),
    *(question("count", s) for s in shapes.SHAPES),
    question("count", "red"),
    *COUNTS,
  ]
  for text in texts:
    for word in text.replace("?", " ?").split():
      if word not in known and word not in words:
        words.append(word)
  return [w for w in words if w != "?"] + ["?"]


def question(question_type: str, subject) -> str:
  """The question of `question_type` about `subject`: a quadrant index (colour, shape, size), an object (size,
  colour, shape) (position), or a shape or colour name (count)."""
  if question_type in _ATTRIBUTE:
    return f"what {question_type} is the object at the {shapes.QUADRANTS[subject]}?"
  if question_type == "position":
    return f"where is the {' '.join(subject)}?"
  if question_type == "count":
    noun = f"{subject}s" if subject in shapes.SHAPES else f"{subject} objects"
    return f"how many {noun} are there?"
  raise ValueError(f"Unknown question type {question_type!r}; choose one of {', '.join(QUESTION_TYPES)}.")


def answer(scene, question_type: str, subject) -> str:
  """The true answer to question(question_type, subject) about `scene` ([(quadrant, (size, colour, shape)), ...])."""
  if question_type in _ATTRIBUTE:
    (obj,) = [obj for q, obj in scene if q == subject]
    return obj[_ATTRIBUTE[question_type]]
  if question_type == "position":
    (quadrant,) = [q for q, obj in scene if obj == tuple(subject)]  # one: position questions are unambiguous
    return shapes.QUADRANTS[quadrant]
  if question_type == "count":
    return COUNTS[sum(subject in obj for _, obj in scene)]
  raise ValueError(f"Unknown question type {question_type!r}; choose one of {', '.join(QUESTION_TYPES)}.")


def all_questions() -> list[str]:
  """Every question the templates can ask (about one scene or another)."""
  subjects = {
    "colour": range(len(shapes.QUADRANTS)),
    "shape": range(len(shapes.QUADRANTS)),
    "size": range(len(shapes.QUADRANTS)),
    "position": shapes.OBJECTS,
    "count": (*shapes.SHAPES, *shapes.COLOURS),
  }
  return [question(t, subject) for t in QUESTION_TYPES for subject in subjects[t]]


def all_answers() -> list[str]:
  """Every answer a question can have."""
  return [*shapes.SIZES, *shapes.COLOURS, *shapes.SHAPES, *shapes.QUADRANTS, *COUNTS]


def unique_objects(scene) -> list[tuple[str, str, str]]:
  """The scene's objects that occur in it once, in caption order: those a position question may ask about."""
  objects = [obj for _, obj in scene]
  return [obj for obj in objects if objects.count(obj) == 1]


def can_ask(scene, question_type: str) -> bool:
  return question_type != "position" or bool(unique_objects(scene))


def draw_subject(scene, question_type: str, rng: np.random.Generator):
  """A random subject of a `question_type` question about `scene` (see `question`); the type must be askable."""
  if question_type in _ATTRIBUTE:
    return int(rng.choice([q for q, _ in scene]))
  if question_type == "position":
    candidates = unique_objects(scene)
    if not candidates:
      raise ValueError(f"No object occurs once in {shapes.caption(scene)!r}: no position question to ask.")
    return candidates[int(rng.integers(len(candidates)))]
  if question_type == "count":
    names = shapes.SHAPES if rng.random() < 0.5 else tuple(shapes.COLOURS)
    return names[int(rng.integers(len(names)))]
  raise ValueError(f"Unknown question type {question_type!r}; choose one of {', '.join(QUESTION_TYPES)}.")


def random_question(scene, question_type: str, rng: np.random.Generator) -> tuple[str, str]:
  """(question, answer): a random question of `question_type` about `scene` and its true answer."""
  subject = draw_subject(scene, question_type, rng)
  return question(question_type, subject), answer(scene, question_type, subject)


def question_types(image_index: int, scene, questions_per_image: int, seed: int, stream: int) -> list[str]:
  """The types of the questions of image `image_index` of a split (see the module docstring)."""
  block, m = divmod(image_index, len(QUESTION_TYPES))
  order = np.random.default_rng([seed, stream, block, 2]).permutation(len(QUESTION_TYPES))
  types = [QUESTION_TYPES[order[(m + j) % len(order)]] for j in range(questions_per_image)]
  if not can_ask(scene, "position") and "position" in types:
    unused = [QUESTION_TYPES[order[(m + j) % len(order)]] for j in range(questions_per_image, len(order))]
    types[types.index("position")] = unused[0] if unused else types[types.index("position") - 1]
  return types


def image_questions(scene, image_index: int, questions_per_image: int, seed: int, stream: int):
  """[(question_type, question, answer), ...]: the distinct questions of image `image_index` of a split."""
  rng = np.random.default_rng([seed, stream, image_index, 1])
  out = []
  for question_type in question_types(image_index, scene, questions_per_image, seed, stream):
    while True:  # a type can repeat only when a position question was replaced; then redraw until new
      text, truth = random_question(scene, question_type, rng)
      if text not in [q for _, q, _ in out]:
        break
    out.append((question_type, text, truth))
  return out


def split_scenes(num_train: int, num_test: int, num_objects: int, seed: int) -> dict[str, np.ndarray]:
  """{'train': ..., 'test': ...}: each split's scene numbers in example order, as synthetic_shapes draws them."""
  test, train = shapes.split_combinations(num_test, seed, num_objects)
  train = np.random.default_rng([seed, 1]).choice(train, size=num_train)
  return {"train": train, "test": test}


def parse_caption(text: str):
  """The scene a synthetic_shapes caption describes: [(quadrant, (size, colour, shape)), ...] (the inverse of
  synthetic_shapes.caption)."""
  scene = []
  for clause in text.split(","):
    words = clause.split()
    quadrant = " ".join(words[3:])
    if len(words) < 4 or words[0] not in shapes.SIZES or words[1] not in shapes.COLOURS:
      raise ValueError(f"Not a synthetic_shapes caption: {text!r}.")
    if words[2] not in shapes.SHAPES or quadrant not in shapes.QUADRANTS:
      raise ValueError(f"Not a synthetic_shapes caption: {text!r}.")
    scene.append((shapes.QUADRANTS.index(quadrant), tuple(words[:3])))
  return scene


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticVqaConfig(tfds.core.BuilderConfig):
  image_size: int = 48
  num_train: int = 20_000
  num_test: int = 1_000
  num_objects: int = 4
  seed: int = 0
  questions_per_image: int = 2


class SyntheticVqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Questions about the synthetic_shapes images, each with 10 copies of its one true answer.

  num_train and num_test count images (scenes), as in synthetic_shapes; each split has questions_per_image
  examples per image.
  """

  name = "synthetic_vqa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  code_path = epath.Path(__file__)  # see SyntheticShapes.code_path

  def __init__(
    self,
    *,
    image_size: int = 48,
    num_train: int = 20_000,
    num_test: int = 1_000,
    num_objects: int = 4,
    seed: int = 0,
    questions_per_image: int = 2,
    **kwargs,
  ):
    if not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
      raise ValueError(
        f"questions_per_image must be in [1, {MAX_QUESTIONS_PER_IMAGE}] (one question of each type at most); "
        f"got {questions_per_image}."
      )
    config = SyntheticVqaConfig(
      name=f"size{image_size}_obj{num_objects}_train{num_train}_test{num_test}_seed{seed}_q{questions_per_image}",
      image_size=image_size,
      num_train=num_train,
      num_test=num_test,
      num_objects=num_objects,
      seed=seed,
      questions_per_image=questions_per_image,
    )
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
          "question": tfds.features.Text(),
          "answers": tfds.features.Sequence(tfds.features.Text()),
          "question_type": tfds.features.Text(),
          "image_id": tfds.features.Scalar(np.int64),
          "question_id": tfds.features.Scalar(np.int64),
        }
      ),
      disable_shuffling=True,  # generation order: an image's questions are consecutive
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    scenes = split_scenes(cfg.num_train, cfg.num_test, cfg.num_objects, cfg.seed)
    return {
      "train": self._generate_examples(scenes["train"], first_id=0, stream=0),
      "test": self._generate_examples(scenes["test"], first_id=cfg.num_train, stream=1),
    }

  def _generate_examples(self, scenes: np.ndarray, first_id: int, stream: int):
    cfg = self.builder_config
    k = cfg.questions_per_image
    for i, scene_index in enumerate(scenes):
      scene = shapes.combination(int(scene_index), cfg.num_objects)
      # synthetic_shapes' generator for example i: the same picture as its image i.
      pixels = shapes.draw(scene, cfg.image_size, np.random.default_rng([cfg.seed, stream, i]))
      png = io.BytesIO()
      Image.fromarray(pixels).save(png, format="PNG")
      png = png.getvalue()  # encoded bytes, as synthetic_shapes stores them
      image_id = first_id + i
      for j, (question_type, text, truth) in enumerate(image_questions(scene, i, k, cfg.seed, stream)):
        yield (
          i * k + j,
          {
            "image": png,
            "question": text,
            "answers": [truth] * NUM_ANSWERS,
            "question_type": question_type,
            "image_id": image_id,
            "question_id": image_id * k + j,
          },
        )
