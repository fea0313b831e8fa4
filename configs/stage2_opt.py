r"""BLIP-2 stage 2 with a frozen OPT: the Q-Former's query outputs become soft prompts of the LLM (LM loss).

Paper recipe (default; ViT-g/14 at 224px + OPT-2.7B, global batch 1920, 80k steps; BLIP-2 reports < 3 days on
16 x A100-40G for stage 2). Needs real weights and data, given by config:

  python -m blip2_jax.train --config=configs/stage2_opt.py --workdir=gs://bucket/blip2_stage2_opt \
      --config.init.vision_weights=/ckpt/blip2-opt-2.7b --config.init.llm_weights=/ckpt/opt-2.7b \
      --config.init.qformer_weights=gs://bucket/blip2_stage1 --config.data.name=coco_captions \
      --config.data.data_dir=/data/tfds

(`llm_weights` may also be a BLIP-2 directory: its language_model.* is used; `qformer_weights` a stage-1 workdir
or a HF BLIP-2 directory.)

Built-in demo (no downloads): synthetic shapes, a small random ViT and Q-Former of the stage-1 demo's sizes with
the paper's 32 queries, and a tiny OPT first trained on the training captions' text (blip2_jax.demo_llm; text
only, so the image must come through the Q-Former). docs/demo.md has the measured time and held-out caption scores:

  python -m blip2_jax.train --config=configs/stage2_opt.py:demo --workdir=workdirs/stage2_opt_demo

Variants: `demo`, `tiny` (tests). The demo starts from a random Q-Former: the stage-1 demo's has 8 queries, and
the demo LLM reads a context of 32. `opt2.7b` (the default's LLM) and `opt6.7b`: the paper recipe with that OPT's
sizes in config.model.llm, so that it builds without weights (`python -m blip2_jax.compile`, docs/compile.md).
"""

import ml_collections

# OPT-2.7B (facebook/opt-2.7b config.json), used for random-weight runs (benchmarks) when no llm_weights given.
OPT_2_7B = dict(
  vocab_size=50272,
  hidden_size=2560,
  num_hidden_layers=32,
  ffn_dim=10240,
  num_attention_heads=32,
  max_position_embeddings=2048,
  word_embed_proj_dim=2560,
  do_layer_norm_before=True,
  activation_function="relu",
  enable_bias=True,
  pad_token_id=1,
  bos_token_id=2,
  eos_token_id=2,
)
# OPT-6.7B (facebook/opt-6.7b config.json): the paper's larger OPT.
OPT_6_7B = dict(OPT_2_7B, hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096)
# google/flan-t5-xl, with the exact GELU BLIP-2 uses.
FLAN_T5_XL = dict(
  vocab_size=32128,
  d_model=2048,
  d_kv=64,
  d_ff=5120,
  num_layers=24,
  num_decoder_layers=24,
  num_heads=32,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj="gated-gelu",
  dense_act_fn="gelu",
  tie_word_embeddings=False,
  layer_norm_epsilon=1e-6,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
)
# google/flan-t5-xxl (config.json): the paper's larger Flan-T5.
FLAN_T5_XXL = dict(FLAN_T5_XL, d_model=4096, d_ff=10240, num_heads=64)
# Variants that name the paper's frozen LLM: the paper recipe with that LLM's sizes (random weights unless
# init.llm_weights is given), e.g. for `python -m blip2_jax.compile` (docs/compile.md) and the benchmark.
LLM_VARIANTS = {
  "opt": {"opt2.7b": OPT_2_7B, "opt6.7b": OPT_6_7B},
  "t5": {"flant5xl": FLAN_T5_XL, "flant5xxl": FLAN_T5_XXL},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return stage2_config("opt", arg or "paper")


def stage2_config(kind: str, variant: str) -> ml_collections.ConfigDict:
  """The stage-2 config of either LLM kind ('opt', 't5'); configs/stage2_t5.py calls this too."""
  variants = ("paper", "demo", "tiny", *LLM_VARIANTS[kind])
  if variant not in variants:
    raise ValueError(f"Unknown variant {variant!r} of configs/stage2_{kind}.py; choose {', '.join(variants)}.")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # --- schedule and logging -------------------------------------------------------------------------------
  c.total_steps = 80_000
  c.global_batch_size = 1920 if kind == "opt" else 1520  # paper
  c.log_every = 50
  c.eval_every = 10_000  # 0 = only at the end
  # Logged steps in a row, after warmup, where the LM loss is no lower with the right image than with another
  # one of the batch before the trainer warns that the Q-Former looks collapsed (blip2_jax/collapse.py); 0 = never.
  c.collapse_patience = 10
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3

  # --- optimizer (paper: as stage 1, min lr 5e-5) -------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict(
    dict(lr=1e-4, warmup_steps=2_000, warmup_lr=1e-6, min_lr=5e-5, b1=0.9, b2=0.98, weight_decay=0.05, grad_clip=0.0)
  )
  c.optimizer.vit_layer_decay = 1.0  # per-layer lr decay of a trainable ViT (fine-tuning); 1 = off

  # --- model ------------------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict(
    dict(
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
      # The query side of the stage-1 Q-Former (its text parts are dropped).
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
        dtype="bfloat16",
        # A fused kernel ("cudnn", "tpu_flash") runs where no attention dropout is drawn (evaluation, or
        # dropout_rate=0); training with dropout takes the "xla" path.
        attention="xla",
      ),
      num_query_tokens=32,
      ln_vision_eps=1e-5,
      # VQA fine-tuning (paper Sec. 4.3; InstructBLIP): the Q-Former also reads the question, batch keys
      # qformer_ids / qformer_mask (its own tokenizer; qformer.vocab_size its size), and keeps its text side.
      qformer_text_input=False,
      # The frozen LLM. With init.llm_weights its sizes come from that directory's config.json; the fields
      # here are used only without weights (random init, e.g. benchmarks). dtype: compute dtype.
      llm=dict(
        kind=kind,
        dtype="bfloat16",
        remat_policy="none",
        # Self-attention over more than one new token (training, the prompt's prefill; decoding reads the KV
        # cache with "xla"). Decoder-only LLMs (OPT, LLaMA); T5 takes "xla" only.
        attention="xla",
        # LoRA adapters on the frozen LLM's projections (models/lora.py, docs/finetune.md), with or without
        # llm_weights; rank 0 = off (the paper trains none). targets: HF / PEFT module names. Common practice
        # for BLIP-2 with PEFT (e.g. PEFT's BLIP-2 fine-tuning examples) is rank=16, alpha=32, dropout=0.05 on
        # q_proj / v_proj (T5: q / v).
        lora=dict(rank=0, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj") if kind == "opt" else ("q", "v")),
        **(OPT_2_7B if kind == "opt" else FLAN_T5_XL),
      ),
    )
  )
  c.frozen_params = ("visual_encoder/.*", "language_model/.*")
  c.frozen_dtype = "bfloat16"

  c.init = ml_collections.ConfigDict(
    dict(
      vision_weights="",  # HF BLIP-2 dir (vision_model.*)
      llm_weights="",  # HF OPT / T5 dir, or a BLIP-2 dir (language_model.*); "demo" = blip2_jax.demo_llm
      qformer_weights="",  # stage-1 workdir, or HF BLIP-2 dir (query side)
      # Fine-tuning: every parameter from a training workdir's latest checkpoint or a HF BLIP-2 directory (ViT
      # position embeddings resized to data.image_size). It wins over the sources above, which fill only what it
      # lacks (e.g. bert_weights for a text side a stage-2 checkpoint does not have).
      checkpoint="",
    )
  )
  # llm_weights="demo": pretraining steps of the tiny caption LLM (None: blip2_jax.demo_llm.DEFAULT_STEPS).
  c.init.demo_llm_steps = ml_collections.config_dict.placeholder(int)
  c.tokenizer = ""  # the LLM's tokenizer dir; '' = init.llm_weights
  # model.qformer_text_input: the Q-Former's own BERT tokenizer (a local bert-base-uncased dir, a WordPiece .txt, or
  # "demo" / "demo_vqa", the vocabularies shipped for the demos); state.load_qformer_tokenizer.
  c.qformer_tokenizer = ""

  # --- data -------------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict(
    dict(
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
      prompt="",
      # OPT: data.prompt goes before every caption. T5: the share of examples that are data.prompt -> the whole
      # caption (the captioning fine-tune format) instead of a prefix-LM split (paper: 0, no prompt).
      prompt_fraction=0.0,
      # "caption", or "vqa": (image, question, answer) examples (configs/finetune_vqa.py; data.prompt is then a
      # template with {} for the question, "" = the LLM family's VQA prompt).
      task="caption",
      # VQA with model.qformer_text_input: the question's length in Q-Former tokens (None = max_text_len).
      max_question_len=ml_collections.config_dict.placeholder(int),
    )
  )

  # --- captioning evaluation (paper: beams 5, max 30, min 8 new tokens, prompt "a photo of") ---------------
  # during_training_images: evaluations before the last step caption the split's first N images only (logged as
  # eval_N/...), 0 = the whole split every time; the last step always evaluates the whole split (eval/...).
  c.eval = ml_collections.ConfigDict(
    dict(
      batch_size=64,
      prompt="a photo of",
      num_beams=5,
      max_new_tokens=30,
      min_new_tokens=8,
      length_penalty=1.0,
      during_training_images=0,
    )
  )

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
        ("layers", None),
        ("norm", None),
      ),
    )
  )

  if variant in LLM_VARIANTS[kind]:  # the paper recipe (its batch size) with this LLM
    c.model.llm.update(LLM_VARIANTS[kind][variant])
  if variant in ("demo", "tiny"):
    _demo(c, kind, tiny=variant == "tiny")
  return c


def _demo(c, kind: str, tiny: bool):
  """Sized for a 2-core CPU: the stage-1 demo's ViT and Q-Former, a tiny caption-trained LLM."""
  c.total_steps = 12 if tiny else 1000
  c.global_batch_size = 16 if tiny else 64
  c.log_every = 4 if tiny else 25
  c.eval_every = 0 if tiny else 250
  c.checkpoint_every = 6 if tiny else 250
  c.keep_checkpoints = 2
  c.optimizer.update(dict(lr=3e-3, warmup_steps=2 if tiny else 50, min_lr=1e-5))
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
  # The paper's 32 queries: the demo LLM reads a context of 32 positions (blip2_jax.demo_llm). The stage-1 demo
  # has 8, so its Q-Former does not fit here.
  c.model.num_query_tokens = 32
  c.model.llm.dtype = "float32"
  c.frozen_dtype = "float32"
  c.init.llm_weights = "demo"
  c.data.update(
    dict(
      name="synthetic_shapes",
      image_size=48,
      max_text_len=32,
      num_threads=2,
      prefetch=2,
      crop_scale=(0.8, 1.0),
      prompt="a photo of",
    )
  )
  if kind == "t5":
    # Half the examples in the evaluation's format (prompt -> whole caption): with prefix-LM splits alone the
    # demo's Q-Former learns to continue a caption, and writes whole ones with objects out of order.
    c.data.prompt_fraction = 0.5
  # During training: the first 250 images (one batch, the final evaluation's compiled program).
  c.eval.update(dict(batch_size=250, num_beams=1, max_new_tokens=30, min_new_tokens=0, during_training_images=250))
  if tiny:
    c.model.vit.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    c.model.qformer.update(dict(hidden_size=32, num_heads=2, intermediate_size=64))
    c.model.num_query_tokens = 4
    c.data.builder_kwargs = {"num_train": 256, "num_test": 64}
    c.eval.batch_size = 32
    c.init.demo_llm_steps = 30
    c.data.eval_max_examples = 32
