r"""Retrieval fine-tuning (BLIP-2 paper Sec. 4.4): stage 1's ITC + ITM + ITG on COCO with the image encoder trained too.

Every value below cites its source: LAVIS `lavis/projects/blip2/train/retrieval_coco_ft.yaml` (run config),
`lavis/configs/models/blip2/blip2_coco.yaml` (model config) and `run_scripts/blip2/train/train_retrieval_coco.sh`
(16 GPUs), and LAVIS's runner defaults where the yaml is silent.
- The ViT trains (freeze_vit False) with fp32 master weights (vit_precision fp32; compute in bfloat16 here, LAVIS's
  amp), gradient checkpointing (remat "full"), no drop path, per-layer lr decay 0.95 (lr_layer_decay).
- Captions of the same image are positives of each other in ITC and never hard negatives in ITM (LAVIS's
  `image_id` branch of Blip2Qformer.forward): data.image_ids.
- 364 px images: the 224 px checkpoint's position embeddings are resized bicubically on load (init.checkpoint).
- AdamW lr 1e-5, betas (0.9, 0.999) (runner default), weight decay 0.05, 1,000 warmup steps from 1e-8, cosine to 0;
  batch 14 x 16 GPUs = 224; 5 epochs of COCO Karpathy train's 566,747 (image, caption) pairs = 12,650 steps.
- Evaluation: ITC top-128 (k_test) reranked by ITM, on the Karpathy test split (COCO 5k); Flickr30k 1k zero-shot
  with `python -m blip2_jax.evaluate --task=retrieval` (docs/evaluation.md).

  python -m blip2_jax.train --config=configs/finetune_retrieval.py --workdir=gs://bucket/blip2_retrieval_coco \
      --config.init.checkpoint=gs://bucket/blip2_stage1 --config.tokenizer=/ckpt/bert-base-uncased \
      --config.data.data_dir=/data/tfds --config.data.builder_kwargs.image_dir=/data/coco/images ...

(`init.checkpoint`: a stage-1 workdir or a HF BLIP-2 retrieval directory, e.g. blip2-itm-vit-g.) With COCO from
`python -m blip2_jax.data.prepare --format=coco` (one record per image with its ~5 captions) set
`--config.data.sources.coco.path=... --config.data.captions_per_image=5`: each image is then seen once per caption
per epoch, as LAVIS's per-pair dataset does.

Built-in demo (docs/finetune.md): from the stage-1 demo's workdir, the demo's ViT unfrozen; the held-out retrieval
is evaluated before the first step and at the end:

  python -m blip2_jax.train --config=configs/finetune_retrieval.py:demo --workdir=workdirs/finetune_retrieval_demo

Variants: `demo`, `tiny` (tests; init.checkpoint must then be given).
"""

import importlib.util
import os


def _stage1(variant: str):
  spec = importlib.util.spec_from_file_location(
    "blip2_stage1_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in ("paper", "demo", "tiny"):
    raise ValueError(f"Unknown variant {variant!r} of configs/finetune_retrieval.py; choose paper, demo or tiny.")
  c = _stage1(variant)
  c.variant = variant
  c.seed = 42  # LAVIS run config

  c.frozen_params = ()  # freeze_vit: False; nothing else was frozen in stage 1
  c.model.vit.update(dict(image_size=364, remat_policy="full", drop_path_rate=0.0))
  c.data.image_size = 364
  c.data.image_ids = True
  c.data.captions_per_image = 1  # TFDS coco_captions has one example per (image, caption) already
  c.optimizer.update(dict(lr=1e-5, warmup_steps=1_000, warmup_lr=1e-8, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05))
  c.optimizer.vit_layer_decay = 0.95
  c.global_batch_size = 224
  c.total_steps = 12_650
  c.checkpoint_every = c.eval_every = 2_530  # once per epoch
  c.eval.k_test = 128
  c.eval_at_start = False  # the paper's starting point is known; the demo turns this on
  c.collapse_patience = 0  # fine-tuning starts far from chance: the stage-1 collapse check does not apply

  if variant in ("demo", "tiny"):
    _demo(c, tiny=variant == "tiny")
  return c


def _demo(c, tiny: bool):
  """The stage-1 demo's model and data, its ViT now trained: a short fine-tune on a 2-core CPU."""
  c.init.checkpoint = "" if tiny else "workdirs/stage1_demo"
  if not tiny:
    # The task's own data, as COCO is to BLIP-2's web pre-training: scenes of 3 objects (captions of 3 clauses, a
    # quadrant left empty), which the stage-1 demo never saw; trained on and evaluated on (1,000 held-out captions).
    c.data.builder_kwargs = {"num_objects": 3}
  c.model.vit.update(dict(image_size=48, remat_policy="none"))
  c.data.image_size = 48
  # The demo's images have one caption each: two visits per epoch put the same image twice in some batches, where
  # it must count as a positive, not a negative, of itself.
  c.data.captions_per_image = 2
  c.global_batch_size = 16 if tiny else 64
  c.total_steps = 8 if tiny else 400
  c.checkpoint_every = 4 if tiny else 200
  c.eval_every = 0 if tiny else 200
  c.log_every = 4 if tiny else 25
  # The demo model's own scale: the stage-1 demo trained at 3e-3; fine-tuning continues at a tenth of it.
  c.optimizer.update(dict(lr=3e-4, warmup_steps=2 if tiny else 50, warmup_lr=1e-6, min_lr=1e-6))
  c.eval_at_start = True
  c.eval.k_test = 8 if tiny else 16
