r"""Export to the Hugging Face layout: `python -m blip2_jax.export --workdir=DIR --out=PATH`.

Writes a directory that transformers loads with `Blip2ForImageTextRetrieval.from_pretrained(PATH)` (a stage-1
workdir) or `Blip2ForConditionalGeneration.from_pretrained(PATH)` (a stage-2 workdir), with the same outputs:
config.json, model.safetensors (sharded past 5 GB) and the tokenizer. `temp` and the Q-Former's LM head are not
written: transformers' BLIP-2 has no place for them.
"""

import logging

from absl import app
from absl import flags
from absl import logging as absl_logging

from blip2_jax.api import Blip2

flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint is exported.")
flags.DEFINE_string("out", None, "Output directory (Hugging Face layout).")
flags.DEFINE_string("dtype", None, "Cast every tensor to this dtype (e.g. bfloat16); default: as trained.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required.")
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("blip2_jax").setLevel(logging.INFO)
  try:
    Blip2.from_workdir(FLAGS.workdir).save_pretrained(FLAGS.out, dtype=FLAGS.dtype)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
