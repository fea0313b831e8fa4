r"""Generate text for images: `python -m blip2_jax.generate --model=PATH_OR_WORKDIR --image=IMG [--prompt=...]`.

  python -m blip2_jax.generate --model=/ckpt/blip2-opt-2.7b --image=cat.jpg
  python -m blip2_jax.generate --model=/ckpt/blip2-opt-2.7b --image=cat.jpg --question="how many cats are there?"
  python -m blip2_jax.generate --model=workdirs/stage2_opt_demo --images=DIR --out=captions.jsonl

`--model` is a Hugging Face BLIP-2 directory (Blip2ForConditionalGeneration) or a blip2_jax stage-2 workdir.
Without --prompt or --question it captions with the paper's settings (prompt "a photo of", beams 5, 8-30 new
tokens); --question uses the zero-shot VQA prompt; --prompt is free text ("Question: ... Answer:", a chat turn).
`--images=DIR` processes every image file of a folder in batches, with a progress bar, and writes one JSON line
per image to --out; an image that cannot be decoded is reported and skipped. Images are resized to the model's
input size (bicubic) and CLIP-normalised, as BLIP-2's processors do.
"""

import json
import logging
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np
import tqdm

from blip2_jax.api import Blip2
from blip2_jax.data import images as images_lib

flags.DEFINE_string("model", None, "HF BLIP-2 directory or blip2_jax stage-2 workdir.")
flags.DEFINE_string("image", None, "One image file.")
flags.DEFINE_string("images", None, "A folder of images (with --out).")
flags.DEFINE_string("out", None, "JSON-lines output for --images.")
flags.DEFINE_string("prompt", None, "Free-text prompt; default: caption with 'a photo of'.")
flags.DEFINE_string("question", None, "A question: zero-shot VQA prompt.")
flags.DEFINE_integer("batch_size", 8, "Images per batch for --images.")
flags.DEFINE_integer("num_beams", None, "Beams (default: the task's, 5).")
flags.DEFINE_integer("max_new_tokens", None, "At most this many new tokens (default: the task's).")
flags.DEFINE_integer("min_new_tokens", None, "At least this many new tokens (default: the task's).")
flags.DEFINE_string("dtype", "float32", "dtype of the frozen ViT and LLM (bfloat16 halves their memory).")
FLAGS = flags.FLAGS


def run(model, images: np.ndarray, prompt: str | None, question: str | None, settings: dict) -> list[str]:
  if question is not None:
    return model.answer(images, question, **settings)
  if prompt is not None:
    return model.generate(images, prompt, **settings)
  return model.caption(images, **settings)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("blip2_jax").setLevel(logging.WARNING)
  if not FLAGS.model or bool(FLAGS.image) == bool(FLAGS.images):
    raise app.UsageError("Give --model and one of --image=FILE or --images=DIR.")
  if FLAGS.images and not FLAGS.out:
    raise app.UsageError("--images needs --out=FILE.jsonl.")
  settings = {
    k: getattr(FLAGS, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens") if getattr(FLAGS, k) is not None
  }
  try:
    # Input errors first, before the model is read.
    if FLAGS.prompt is not None and not FLAGS.prompt.strip():
      raise ValueError("--prompt is empty: leave it out to caption, or give the text the answer should follow.")
    if FLAGS.image:
      images_lib.load_image(FLAGS.image, 8)
    model = Blip2.load(FLAGS.model, dtype=FLAGS.dtype)
    size = model.cfg.vit.image_size
    if FLAGS.image:
      print(run(model, images_lib.load_image(FLAGS.image, size)[None], FLAGS.prompt, FLAGS.question, settings)[0])
      return
    _folder(model, size, settings)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


def _folder(model, size: int, settings: dict):
  suffixes = images_lib.IMAGE_SUFFIXES
  files = sorted(f for f in os.listdir(FLAGS.images) if f.lower().endswith(suffixes))
  if not files:
    raise FileNotFoundError(f"No image files ({', '.join(suffixes)}) in {FLAGS.images}.")
  bs, done, skipped = FLAGS.batch_size, 0, 0
  with open(FLAGS.out, "w", encoding="utf-8") as out, tqdm.tqdm(total=len(files), unit="img") as bar:
    for start in range(0, len(files), bs):
      names, arrays = [], []
      for name in files[start : start + bs]:
        try:
          arrays.append(images_lib.load_image(os.path.join(FLAGS.images, name), size))
          names.append(name)
        except ValueError as e:
          skipped += 1
          logging.warning("%s; skipped.", e)
      if arrays:
        n = len(arrays)
        batch = images_lib.pad_rows(np.stack(arrays), bs)  # a full batch: one compiled program for every batch
        for name, text in zip(names, run(model, batch, FLAGS.prompt, FLAGS.question, settings)[:n]):
          out.write(json.dumps({"image": name, "text": text}) + "\n")
          done += 1
      bar.update(len(files[start : start + bs]))
  print(f"wrote {done} results to {FLAGS.out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""))


if __name__ == "__main__":
  app.run(main)
