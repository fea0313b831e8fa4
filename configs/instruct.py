r"""Instruction tuning (InstructBLIP): a BLIP-2 stage-2 model, its Q-Former made instruction-aware, trained on a
mixture of tasks, each example under one of its task's instruction templates.

Sources: the InstructBLIP paper (Dai et al. 2023), Sec. 2-3 and its implementation details, as we know them (no
stored copy of the paper could be read for this file: the values marked [paper] are "as reported in the paper; not
re-verified here"). Where the paper is silent the choice is ours and says so.
- The model: BLIP-2's, initialised from a stage-2 checkpoint (init.checkpoint: a stage-2 workdir or a HF BLIP-2
  directory; a HF InstructBLIP directory continues one). The instruction goes to the Q-Former with the queries
  (model.qformer_text_input: [queries; instruction] in self-attention, only the queries go on) and to the LLM after
  the soft prompt; the loss is the LM loss of the answer. [paper] Only the Q-Former trains: the ViT and the LLM stay
  frozen. A stage-2 model has no Q-Former text side (word and position embeddings, the text FFN): name a stage-1
  workdir or a HF BLIP-2 directory in init.qformer_weights to start it from BLIP-2's (docs/finetune.md), as the
  paper does; left empty it starts from its random initialisation.
- The data: config.data.tasks, each a TFDS dataset of captions or of VQA questions with its instruction templates
  (data/pipeline.py instruct_tasks). [paper] Datasets are sampled in proportion to the square root of their sizes
  (weight -1). The templates below are a few of the paper's appendix table's (the "<Image>" placeholder dropped: the
  image's soft prompt always comes first); give a task more by listing them. Each example draws one template;
  evaluation uses each task's first.
- [paper] At most 60K steps with a validation every 3K; batch 192 for Flan-T5-XL (128 for Vicuna-7B, 64 for the
  11B/13B LLMs); AdamW (0.9, 0.999), weight decay 0.05; the lr warms up linearly from 1e-8 to 1e-5 over 1,000
  steps, then a cosine decay to 0; images of 224 px.
- Ours: the Q-Former reads at most 128 tokens of instruction, the LLM at most 128 (prompt and answer together).
  Evaluation: captions with 5 beams and 8-30 new tokens (BLIP-2's), answers with 5 beams, 1-10 new tokens and
  length penalty -1 (BLIP-2's VQA settings).

  python -m blip2_jax.train --config=configs/instruct.py --workdir=gs://bucket/instructblip_t5 \
      --config.init.checkpoint=/ckpt/blip2-flan-t5-xl --config.init.llm_weights=/ckpt/blip2-flan-t5-xl \
      --config.init.qformer_weights=/ckpt/blip2-itm-vit-g --config.qformer_tokenizer=/ckpt/bert-base-uncased \
      --config.data.data_dir=/data/tfds

Its tasks read the TFDS datasets `coco_captions` and `vqav2` (docs/finetune.md#vqa for the VQA format); add tasks
in a config of your own that calls get_config() and sets config.data.tasks.<name>. Variants: `vicuna7b` (Vicuna-7B,
batch 128 [paper]; init.llm_weights a Vicuna directory, init.checkpoint a BLIP-2 stage-2 model with that LLM, or
an InstructBLIP-Vicuna directory to continue), `opt` (the same recipe with OPT-2.7B, ours: InstructBLIP released
Flan-T5 and Vicuna models), `demo`, `tiny` (tests), `t5_tiny` (tests).

Built-in demo (docs/finetune.md): from the stage-2 OPT demo's workdir, on synthetic_shapes captions and
synthetic_vqa questions, every task's held-out score before the first step and at the end:

  python -m blip2_jax.train --config=configs/instruct.py:demo --workdir=workdirs/instruct_demo
"""

import importlib.util
import os

import ml_collections

VARIANTS = ("paper", "vicuna7b", "opt", "demo", "tiny", "t5_tiny")
# LLaMA-7B's sizes (Vicuna-7B v1.1's config.json, as we know it): the LLM when config.init.llm_weights is empty (e.g.
# `python -m blip2_jax.compile`); a weights directory's own config.json wins otherwise.
VICUNA_7B = dict(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=32,
  max_position_embeddings=2048,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=False,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)

# [paper] A few of the appendix table's templates (image captioning; VQA).
CAPTION_TEMPLATES = (
  "A short image caption:",
  "A short image description:",
  "A photo of",
  "Write a short description for the image.",
  "Briefly describe the content of the image.",
)
VQA_TEMPLATES = (
  "Question: {} Short answer:",
  "{}",
  "Q: {} A:",
  "{} A short answer to the question is",
  "Given the image, answer the following question with no more than three words. {}",
)
# The demo's: the words of the tiny demo LLM's vocabulary only (blip2_jax.demo_llm: the captions', BLIP-2's
# captioning and VQA prompts', the synthetic questions'), so that no instruction reaches it as <unk>.
DEMO_CAPTION_TEMPLATES = ("a photo of", "Question: what is the photo of? Answer:")
DEMO_VQA_TEMPLATES = ("Question: {} Answer:", "Question: {} Short answer:", "{}")
CAPTION_EVAL = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0)
VQA_EVAL = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def _stage2(kind: str, variant: str):
  spec = importlib.util.spec_from_file_location(
    "blip2_stage2_opt_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage2_opt.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.stage2_config(kind, variant)


def task(dataset: str, format: str, templates, weight: float = -1.0, **eval_settings) -> dict:
  """One entry of config.data.tasks (data/pipeline.py instruct_tasks)."""
  return dict(dataset=dataset, format=format, templates=tuple(templates), weight=weight, eval=eval_settings)


def get_config(arg: str | None = None):
  variant = arg or "paper"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/instruct.py; choose {', '.join(VARIANTS)}.")
  kind = "opt" if variant in ("opt", "demo", "tiny", "vicuna7b") else "t5"
  size = {"t5_tiny": "tiny", "opt": "paper", "vicuna7b": "paper"}.get(variant, variant)
  c = _stage2(kind, size)
  c.variant = variant
  if variant == "vicuna7b":  # InstructBLIP-Vicuna-7B: a LLaMA-family LLM (models/llama.py)
    llm = dict(kind="llama", dtype="bfloat16", remat_policy="none", lora=dict(c.model.llm.lora.to_dict()), **VICUNA_7B)
    c.model.llm = ml_collections.ConfigDict(llm)
  c.seed = 42  # ours

  c.frozen_params = ("visual_encoder/.*", "language_model/.*")  # [paper] only the Q-Former trains
  c.model.qformer_text_input = True  # the instruction-aware Q-Former
  c.model.qformer.vocab_size = 0  # the Q-Former tokenizer's size (30,523 for bert-base-uncased + [DEC])
  c.qformer_tokenizer = ""  # a local bert-base-uncased directory (required)
  c.data.update(
    dict(
      task="instruct",  # the datasets are the tasks' (data.name is read only by the demo LLM, from its captions)
      prompt="",
      prompt_fraction=0.0,
      max_text_len=128,  # ours
      max_question_len=128,  # ours: the Q-Former's instruction
    )
  )
  c.data.tasks = ml_collections.ConfigDict(
    {
      "coco_caption": task("coco_captions", "caption", CAPTION_TEMPLATES, **CAPTION_EVAL),
      "vqav2": task("vqav2", "vqa", VQA_TEMPLATES, **VQA_EVAL),
    }
  )
  # [paper] lr 1e-5 after a linear warmup from 1e-8 over 1,000 steps, cosine to 0; AdamW (0.9, 0.999), wd 0.05.
  c.optimizer.update(dict(lr=1e-5, warmup_steps=1_000, warmup_lr=1e-8, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05))
  c.global_batch_size = 128 if variant == "vicuna7b" else 192  # [paper] Vicuna-7B; Flan-T5-XL
  c.total_steps = 60_000  # [paper] at most
  c.checkpoint_every = c.eval_every = 3_000  # [paper] a validation every 3K steps
  c.eval.update(dict(batch_size=64, prompt=""))  # each task's first template; its `eval` fields
  c.eval_at_start = False  # the demo turns this on
  c.collapse_patience = 0  # starts from a model that already reads the image

  if size in ("demo", "tiny"):
    _demo(c, kind, tiny=size == "tiny")
  return c


def _demo(c, kind: str, tiny: bool):
  """The stage-2 demo's model and its demo LLM (read from that workdir), on synthetic_shapes and synthetic_vqa."""
  source = "" if tiny else f"workdirs/stage2_{kind}_demo"
  c.init.checkpoint = source
  c.init.llm_weights = "demo" if tiny else os.path.join(source, "demo_llm")
  c.qformer_tokenizer = "demo_instruct"  # demo_vqa's words plus the demo templates'
  builder = {"num_train": 256, "num_test": 32} if tiny else {}
  greedy = dict(num_beams=1, min_new_tokens=1, length_penalty=1.0)
  c.data.tasks = ml_collections.ConfigDict(
    {
      "caption": task("synthetic_shapes", "caption", DEMO_CAPTION_TEMPLATES, **greedy, max_new_tokens=30),
      "vqa": task("synthetic_vqa", "vqa", DEMO_VQA_TEMPLATES, **greedy, max_new_tokens=5),
    }
  )
  c.data.builder_kwargs = builder
  c.data.update(dict(image_size=48, max_text_len=32, max_question_len=24))
  c.global_batch_size = 16 if tiny else 64
  c.total_steps = 8 if tiny else 900
  c.checkpoint_every = 4 if tiny else 450
  c.eval_every = 0 if tiny else 300
  c.log_every = 4 if tiny else 25
  c.optimizer.update(dict(lr=1e-3, warmup_steps=2 if tiny else 30, warmup_lr=1e-6, min_lr=1e-6))
  c.eval.update(dict(batch_size=32 if tiny else 500, during_training_images=0 if tiny else 250))
  c.data.eval_max_examples = 32 if tiny else None
  c.eval_at_start = True
