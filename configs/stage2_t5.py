r"""BLIP-2 stage 2 with a frozen Flan-T5 (prefix-LM): the soft prompts and a caption prefix go to the encoder, the
decoder generates the rest of the caption.

Paper recipe (default; ViT-g/14 + FlanT5-XL, global batch 1520, 80k steps):

  python -m blip2_jax.train --config=configs/stage2_t5.py --workdir=gs://bucket/blip2_stage2_t5 \
      --config.init.vision_weights=/ckpt/blip2-flan-t5-xl --config.init.llm_weights=/ckpt/flan-t5-xl \
      --config.init.qformer_weights=gs://bucket/blip2_stage1 --config.data.name=coco_captions \
      --config.data.data_dir=/data/tfds

Built-in demo (no downloads; a tiny T5 first trained on the training captions' text, see configs/stage2_opt.py).
Half its examples are data.prompt ("a photo of") followed by the whole caption, the captioning format it is
evaluated in (data.prompt_fraction=0.5), half are prefix-LM splits:

  python -m blip2_jax.train --config=configs/stage2_t5.py:demo --workdir=workdirs/stage2_t5_demo

Every field is shared with configs/stage2_opt.py (one definition, `stage2_config`), except the LLM and the text
format ('t5': prefix-LM). Variants: `demo`, `tiny`, and `flant5xl` (the default's LLM) and `flant5xxl`: the paper
recipe with that Flan-T5's sizes in config.model.llm, so that it builds without weights (docs/compile.md).
"""

import importlib.util
import os


def get_config(arg: str | None = None):
  spec = importlib.util.spec_from_file_location(
    "blip2_stage2_opt_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage2_opt.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.stage2_config("t5", arg or "paper")
