r"""Captioning fine-tuning (BLIP-2 paper Sec. 4.2): the LM loss with the prompt "a photo of", image encoder trained too.

Every value below cites its source: LAVIS `lavis/projects/blip2/train/caption_coco_ft.yaml` (run config),
`lavis/configs/models/blip2/blip2_caption_opt2.7b.yaml` (model config) and `run_scripts/blip2/train/
train_caption_coco.sh` (16 GPUs), and LAVIS's runner defaults where the yaml is silent.
- The LLM stays frozen; the ViT trains (freeze_vit False) with fp32 master weights (vit_precision fp32; compute in
  bfloat16 here, LAVIS's amp), gradient checkpointing (remat "full"), no drop path, no per-layer lr decay (the
  runner's default 1).
- Text: "</s>a photo of " + caption + "\n" for OPT, the loss on the caption only (the prompt "a photo of ").
- 364 px images: the 224 px checkpoint's position embeddings are resized bicubically on load (init.checkpoint).
- AdamW lr 1e-5, betas (0.9, 0.999) (runner default), weight decay 0.05, 1,000 warmup steps from 1e-8, cosine to 0;
  batch 16 x 16 GPUs = 256; 5 epochs of COCO Karpathy train's 566,747 (image, caption) pairs = 11,070 steps.
- Evaluation as the paper: beam search with 5 beams, 8 to 30 new tokens, prompt "a photo of", on the Karpathy test
  split; NoCaps zero-shot with `python -m blip2_jax.evaluate --task=caption` (docs/evaluation.md).

  python -m blip2_jax.train --config=configs/finetune_caption.py --workdir=gs://bucket/blip2_caption_coco \
      --config.init.checkpoint=/ckpt/blip2-opt-2.7b --config.init.llm_weights=/ckpt/blip2-opt-2.7b \
      --config.data.data_dir=/data/tfds --config.data.builder_kwargs.image_dir=/data/coco/images ...

`init.checkpoint`: a stage-2 workdir or a HF BLIP-2 directory (every parameter); `init.llm_weights` names the LLM's
config.json and tokenizer (a BLIP-2 directory works; its weights are not read twice). Variants `t5`, `t5_demo`,
`t5_tiny`: the same recipe with Flan-T5 (LAVIS blip2_caption_flant5xl.yaml: every example is prompt -> caption).

Built-in demo (docs/finetune.md): from the stage-2 OPT demo's workdir, the demo's ViT unfrozen; the held-out
captions are scored before the first step and at the end:

  python -m blip2_jax.train --config=configs/finetune_caption.py:demo --workdir=workdirs/finetune_caption_demo
"""

import importlib.util
import os

VARIANTS = ("paper", "demo", "tiny", "t5", "t5_demo", "t5_tiny")


def _stage2(kind: str, variant: str):
  spec = importlib.util.spec_from_file_location(
    "blip2_stage2_opt_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage2_opt.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.stage2_config(kind, variant)


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/finetune_caption.py; choose {', '.join(VARIANTS)}.")
  kind = "t5" if variant.startswith("t5") else "opt"
  size = variant.removeprefix("t5").removeprefix("_") or "paper"
  c = _stage2(kind, size)
  c.variant = variant
  c.seed = 42  # LAVIS run config

  c.frozen_params = ("language_model/.*",)  # the ViT trains (freeze_vit: False), the LLM stays frozen
  c.model.vit.update(dict(image_size=364, remat_policy="full", drop_path_rate=0.0))
  c.data.image_size = 364
  c.data.prompt = "a photo of"
  if kind == "t5":
    c.data.prompt_fraction = 1.0  # every example: the prompt to the encoder, the whole caption from the decoder
  c.optimizer.update(dict(lr=1e-5, warmup_steps=1_000, warmup_lr=1e-8, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05))
  c.optimizer.vit_layer_decay = 1.0
  c.global_batch_size = 256
  c.total_steps = 11_070
  c.checkpoint_every = c.eval_every = 2_214  # once per epoch
  c.eval.update(dict(prompt="a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8))
  c.eval_at_start = False  # the paper's starting point is known; the demo turns this on
  c.collapse_patience = 0  # fine-tuning starts from a model that already reads the image

  if size in ("demo", "tiny"):
    _demo(c, kind, tiny=size == "tiny")
  return c


def _demo(c, kind: str, tiny: bool):
  """The stage-2 demo's model and data (and its demo LLM, read from that workdir), the ViT now trained."""
  source = "" if tiny else f"workdirs/stage2_{kind}_demo"
  c.init.checkpoint = source
  c.init.llm_weights = "demo" if tiny else os.path.join(source, "demo_llm")
  c.model.vit.update(dict(image_size=48, remat_policy="none"))
  c.data.image_size = 48
  c.global_batch_size = 16 if tiny else 64
  c.total_steps = 8 if tiny else 300
  c.checkpoint_every = 4 if tiny else 150
  c.eval_every = 0 if tiny else 150
  c.log_every = 4 if tiny else 25
  # The demo model's own scale: the stage-2 demo trained at 3e-3; fine-tuning continues at a tenth of it.
  c.optimizer.update(dict(lr=3e-4, warmup_steps=2 if tiny else 30, warmup_lr=1e-6, min_lr=1e-6))
  # The stage-2 demo's evaluation (greedy, as its own log reports it), before the first step and at the end.
  c.eval.update(dict(num_beams=1, max_new_tokens=30, min_new_tokens=0))
  c.eval_at_start = True
