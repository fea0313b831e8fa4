r"""BLIP-2 stage 1: Q-Former pre-training on a frozen image encoder (ITC + ITM + ITG).

Paper recipe (default; ViT-g/14 at 224px, global batch 1680, 250k steps; BLIP-2 reports < 6 days on
16 x A100-40G). Needs real weights and data, given by config:

  python -m blip2_jax.train --config=configs/stage1.py --workdir=gs://bucket/blip2_stage1 \
      --config.init.vision_weights=/ckpt/blip2-itm-vit-g --config.init.bert_weights=/ckpt/bert-base-uncased \
      --config.tokenizer=/ckpt/bert-base-uncased --config.data.name=coco_captions \
      --config.data.data_dir=/data/tfds

Built-in demo (no downloads; synthetic shapes, a small random frozen ViT and a small Q-Former): 800 steps of
batch 64, evaluated every 200 steps on 200 held-out images and at the end on 1,000 distinct unseen captions.
Over seeds 0-4 and on 8 fake devices it reached held-out R@1 0.96-0.99 both ways after the ITM rerank; the
whole first run (install, data generation, training, evaluation) took 6 min 18 s on a 2-core x86_64 CPU
(docs/demo.md has the table):

  python -m blip2_jax.train --config=configs/stage1.py:demo --workdir=workdirs/stage1_demo

Variants: `demo`, and `tiny` (a few steps; used by tests). Any field can be overridden with
`--config.a.b=value`; the config is locked, so a misspelt key is an error that names it.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "paper"
  if variant not in ("paper", "demo", "tiny"):
    raise ValueError(f"Unknown variant {variant!r} of configs/stage1.py; choose paper, demo or tiny.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # --- schedule and logging -------------------------------------------------------------------------------
  c.total_steps = 250_000
  c.global_batch_size = 1680  # ViT-g (paper); ViT-L used 2320
  c.log_every = 50
  c.eval_every = 10_000  # 0 = only at the end
  # Logged steps in a row with loss_itc within 1% of log(global batch), after warmup, before the trainer warns
  # that the Q-Former looks collapsed (blip2_jax/collapse.py); 0 = never.
  c.collapse_patience = 10
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3

  # --- optimizer (LAVIS pretrain config / paper) ------------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      warmup_steps=2_000,
      warmup_lr=1e-6,
      min_lr=1e-5,
      b1=0.9,
      b2=0.98,
      weight_decay=0.05,
      grad_clip=0.0,
      vit_layer_decay=1.0,
    )
  )  # grad_clip 0 = off (LAVIS does not clip); vit_layer_decay: per-layer lr decay of a trainable ViT (1 = off)

  # --- model ------------------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict(
    dict(
      # EVA-CLIP ViT-g/14 as BLIP-2 uses it: 39 of the 40 blocks.
      vit=dict(
        image_size=224,
        patch_size=14,
        width=1408,
        depth=39,
        num_heads=16,
        mlp_dim=6144,
        layer_norm_eps=1e-6,
        act="gelu",
        dtype="bfloat16",
        # Where attention runs: "xla" (everywhere), "cudnn" (cuDNN's fused kernel: NVIDIA GPUs, bfloat16) or
        # "tpu_flash" (the Pallas flash-attention kernel: TPUs). The same for qformer and llm below.
        attention="xla",
        # What a block keeps for a backward pass through the ViT (none while it is frozen): "none", "full",
        # "dots", "dots_no_batch".
        remat_policy="none",
        # Stochastic depth while the ViT trains (fine-tuning: frozen_params without visual_encoder), rising
        # linearly over the blocks to this rate; 0 = off, and the frozen ViT of pre-training never drops.
        drop_path_rate=0.0,
      ),
      # BERT-base with cross-attention every 2nd layer; vocab = bert-base-uncased + [DEC].
      qformer=dict(
        vocab_size=30523,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        cross_attention_freq=2,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        dropout_rate=0.1,
        dtype="bfloat16",  # fp32 master weights, bf16 compute
        # A fused kernel ("cudnn", "tpu_flash") runs where no attention dropout is drawn (evaluation, or
        # dropout_rate=0); training with dropout takes the "xla" path.
        attention="xla",
        # std of the randomly initialised weights (BERT's; the cross-attention and heads start so
        # in LAVIS, the rest comes from bert-base-uncased)
        init_std=0.02,
      ),
      num_query_tokens=32,
      embed_dim=256,
      ln_vision_eps=1e-5,
      itc_label_smoothing=0.1,
      itg_label_smoothing=0.1,
      bos_token_id=-1,  # filled from the tokenizer's [DEC] at start-up
    )
  )
  # Regexes over parameter paths; a pattern matching nothing is an error. The optimizer never sees these.
  c.frozen_params = ("visual_encoder/.*",)
  c.frozen_dtype = "bfloat16"

  # Where weights come from when there is no checkpoint in the workdir yet ('' = random init).
  c.init = ml_collections.ConfigDict(
    dict(
      vision_weights="",  # local HF BLIP-2 checkpoint dir (vision_model.* in safetensors)
      bert_weights="",  # local bert-base-uncased dir (HF layout, safetensors) for the Q-Former
      lavis_weights="",  # or a LAVIS stage-1 checkpoint (blip2_pretrained.pth) to continue stage 1 from
      # Fine-tuning: every parameter from a training workdir's latest checkpoint or a HF BLIP-2 directory (ViT
      # position embeddings resized to data.image_size). It wins over the sources above, which fill only what it
      # lacks (e.g. bert_weights for a text side a stage-2 checkpoint does not have).
      checkpoint="",
    )
  )
  c.tokenizer = ""  # local bert-base-uncased dir, or a WordPiece vocab .txt

  # --- data -------------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict(
    dict(
      # TFDS builder name, read as array_record through grain; data_dir None = the TFDS default.
      name="coco_captions",
      data_dir=ml_collections.config_dict.placeholder(str),
      builder_kwargs={},
      train_split="train",
      eval_split="test",
      image_size=224,
      crop_scale=(0.5, 1.0),
      flip=True,
      max_text_len=32,
      num_threads=16,
      prefetch=32,  # at least num_threads, or grain cannot keep every thread busy
      eval_max_examples=ml_collections.config_dict.placeholder(int),
      # Training on a mixture of prepared folders (`python -m blip2_jax.data.prepare`, docs/data.md), BLIP-2's six
      # sources: set the path of each you have (`--config.data.sources.cc3m.path=/data/cc3m_prepared`); one with
      # no path is left out, and with none set training reads `name`'s train_split. weight: sampling
      # proportion; -1 = by size (LAVIS concatenates its datasets: each image once per pass); 0 = off.
      sources={s: dict(path="", weight=-1.0) for s in ("coco", "vg", "cc3m", "cc12m", "sbu", "laion")},
      clean_captions=True,  # BLIP-2's cleaning: lower case, strip [.!"()*#:;~], at most max_caption_words words
      max_caption_words=50,
      fast_decode=True,  # JPEGs decoded at the smallest DCT scale that keeps the crop's resolution (images.py)
      max_pixels=89_478_485,  # images with more pixels are skipped as decompression bombs (PIL's own limit)
    )
  )

  # --- retrieval evaluation (ITC top-k, then ITM rerank) ------------------------------------------------------
  # during_training_images: evaluations before the last step use the split's first N images only (logged as
  # eval_N/...), 0 = the whole split every time; the last step always evaluates the whole split (eval/...).
  c.eval = ml_collections.ConfigDict(dict(k_test=128, batch_size=256, during_training_images=0))

  # --- sharding: mesh axes (-1 = fill) and logical-axis rules -------------------------------------------------
  c.sharding = ml_collections.ConfigDict(
    dict(
      mesh={"data": -1, "fsdp": 1, "tensor": 1},
      rules=(
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vit_embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("norm", None),
      ),
    )
  )

  if variant in ("demo", "tiny"):
    _demo(c, tiny=variant == "tiny")
  return c


def _demo(c, tiny: bool):
  """Sized for a 2-core CPU: 800 steps of batch 64 on a small random frozen ViT and a small Q-Former."""
  c.total_steps = 16 if tiny else 800
  c.global_batch_size = 16 if tiny else 64
  c.log_every = 4 if tiny else 25
  c.eval_every = 0 if tiny else 200
  c.checkpoint_every = 8 if tiny else 200
  c.keep_checkpoints = 2
  # Small models, few steps: a larger peak lr than the paper's.
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 2 if tiny else 100
  c.optimizer.min_lr = 1e-5
  c.model.vit.update(dict(image_size=48, patch_size=8, width=96, depth=1, num_heads=4, mlp_dim=192, dtype="float32"))
  c.model.qformer.update(
    dict(
      vocab_size=0,
      hidden_size=96,
      num_layers=2,
      num_heads=4,
      intermediate_size=192,
      cross_attention_freq=1,
      max_position_embeddings=32,
      dropout_rate=0.0,
      dtype="float32",
    )
  )
  # BERT's init std 0.02 belongs to width 768. At width 96 it makes every projection ~sqrt(8) times too small:
  # the Q-Former starts input-independent (queries and text [CLS] the same for every input) and ITC's gradient
  # is ~1000x below ITG's, so runs escaped chance or not by luck. Keeping BERT-base's activation scale
  # (std x sqrt(768 / width)) starts every run with input-dependent features (docs/demo.md, "Stability").
  c.model.qformer.init_std = 0.02 * (768 / c.model.qformer.hidden_size) ** 0.5
  c.model.num_query_tokens = 8
  c.model.embed_dim = 64
  c.frozen_dtype = "float32"
  c.tokenizer = "demo"  # the packaged WordPiece vocab of the synthetic captions
  # Every synthetic caption (4 objects) is 25 tokens with [CLS]/[SEP]; 32 is the paper's text length. (A run
  # with max_text_len=25 is not bit-identical and, on this recipe, stalled at chance: see docs/demo.md.)
  c.data.update(
    dict(name="synthetic_shapes", image_size=48, max_text_len=32, num_threads=2, prefetch=2, crop_scale=(0.8, 1.0))
  )
  if tiny:  # seconds to compile and run: for tests
    c.model.vit.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    c.model.qformer.update(dict(hidden_size=32, num_heads=2, intermediate_size=64))
    c.model.num_query_tokens = 4
    c.model.embed_dim = 16
    c.data.builder_kwargs = {"num_train": 256, "num_test": 64}
  c.eval.k_test = 8 if tiny else 16
  c.eval.during_training_images = 200
  c.eval.batch_size = 64 if tiny else 256
