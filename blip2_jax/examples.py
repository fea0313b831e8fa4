"""A picture of what a model does on held-out examples: a grid of images, each with lines of text under it.

The trainer writes one at the end of a run as WORKDIR/examples.png (and the same image to TensorBoard):
stage 1, each image's top retrieved caption, green where it is one of the image's own captions, red where not;
stage 2, the generated caption (green where it equals a reference after cleaning) above the reference (grey);
VQA, the question (grey), the answer given (green where it scores, red where not) and the most common human answer;
instruction tuning, one such grid per task, one above the other.
"""

import collections
import textwrap

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from blip2_jax.data import images as images_lib
from blip2_jax.data import tokenizer as tokenizer_lib

RIGHT, WRONG, NEUTRAL = (40, 170, 60), (210, 40, 40), (110, 110, 110)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """CLIP-normalised float images [N, S, S, 3] (the pipeline's) back to uint8 RGB."""
  pixels = np.asarray(images, np.float32) * images_lib.CLIP_STD + images_lib.CLIP_MEAN
  return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def grid(
  images: np.ndarray,
  texts: list[list[tuple[str, tuple[int, int, int]]]],
  *,
  columns: int = 4,
  cell: int = 224,
  font_size: int = 12,
) -> Image.Image:
  """images: uint8 [N, S, S, 3]; texts[i]: (text, RGB colour) lines shown under image i, wrapped to the cell.
  -> one RGB image, `columns` cells a row, each image scaled to cell x cell (nearest neighbour)."""
  if len(images) != len(texts):
    raise ValueError(f"{len(images)} images but {len(texts)} texts.")
  if not len(images):
    raise ValueError("No images to draw.")
  font = ImageFont.load_default(size=font_size)
  line_height = font_size + 3
  chars = max(8, int(cell / (0.55 * font_size)))  # characters a line holds, for this font's average width
  wrapped = [
    [(part, colour) for text, colour in lines for part in textwrap.wrap(text, chars) or [""]] for lines in texts
  ]
  text_height = line_height * max(len(w) for w in wrapped) + 6
  pad = 8
  rows = -(-len(images) // columns)
  canvas = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_height + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    x = pad + (i % columns) * (cell + pad)
    y = pad + (i // columns) * (cell + text_height + pad)
    canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
    for j, (line, colour) in enumerate(lines):
      draw.text((x, y + cell + 3 + j * line_height), line, fill=colour, font=font)
  return canvas


def stack(pictures: list[Image.Image], titles: list[str], font_size: int = 14) -> Image.Image:
  """Pictures one above the other, each under its title (an instruction-tuning run: one grid per task)."""
  if len(pictures) != len(titles) or not pictures:
    raise ValueError(f"{len(pictures)} pictures and {len(titles)} titles: give one title per picture, at least one.")
  font = ImageFont.load_default(size=font_size)
  title_height = font_size + 10
  width = max(p.width for p in pictures)
  canvas = Image.new("RGB", (width, sum(p.height + title_height for p in pictures)), "white")
  draw = ImageDraw.Draw(canvas)
  y = 0
  for picture, title in zip(pictures, titles):
    draw.text((8, y + 4), title, fill=(0, 0, 0), font=font)
    canvas.paste(picture, (0, y + title_height))
    y += picture.height + title_height
  return canvas


def retrieval_texts(captions: list[str], i2t: np.ndarray, img2txt: list, n: int) -> list:
  """Stage 1: for each of the first n images, its top-ranked caption, coloured by whether it is its own."""
  out = []
  for i in range(min(n, len(i2t))):
    best = int(np.argmax(i2t[i]))
    ok = best in set(img2txt[i])
    out.append([(("right: " if ok else "wrong: ") + captions[best], RIGHT if ok else WRONG)])
  return out


def caption_texts(predictions: list[str], references: list[list[str]], n: int) -> list:
  """Stage 2: for each of the first n images, the generated caption (green if it equals a reference after
  LAVIS's cleaning) and the first reference."""
  clean = tokenizer_lib.clean_caption
  out = []
  for pred, refs in list(zip(predictions, references))[:n]:
    ok = clean(pred) in {clean(r) for r in refs}
    out.append([("model: " + pred, RIGHT if ok else WRONG), ("reference: " + refs[0], NEUTRAL)])
  return out


def vqa_texts(questions: list[str], predictions: list[str], answers: list[list[str]], scores: list[float], n: int):
  """VQA: for each of the first n questions, the question, the answer given with its VQA accuracy (green if it
  scores, red if not) and the most common of the human answers."""
  out = []
  for question, pred, humans, score in list(zip(questions, predictions, answers, scores))[:n]:
    common = collections.Counter(humans).most_common(1)[0][0] if humans else ""
    out.append(
      [
        ("Q: " + question, NEUTRAL),
        (f"model: {pred} ({score:.1f})", RIGHT if score > 0 else WRONG),
        ("answer: " + common, NEUTRAL),
      ]
    )
  return out
