r"""VQA fine-tuning (BLIP-2 paper Sec. 4.3): the question-conditioned Q-Former, open-ended answer generation.

Sources: the paper's Sec. 4.3 (what is trained and how) and its appendix table of fine-tuning hyperparameters for
VQAv2 ("as reported in the paper's appendix table; not re-verified here": no stored copy of that table could be
read for this file, so those values are as the paper reports them to our knowledge, and are marked [table] below).
LAVIS released no BLIP-2 VQA fine-tuning config; where the paper is silent the choice is ours and says so.
- Sec. 4.3: the question goes to the Q-Former as well as to the LLM (model.qformer_text_input: [queries; question]
  through the Q-Former, docs/finetune.md), so the queries extract the image features the question asks about; the
  ViT and the Q-Former train, the LLM stays frozen; the loss is the open-ended generation (LM) loss of the answer.
  The data (Sec. 4.3, following BLIP): VQAv2's train and val questions, plus Visual Genome's QA.
- Text: OPT "</s>Question: {question} Answer: {answer}\n", the loss on the answer and "\n"; Flan-T5 "Question:
  {question} Short answer:" to the encoder, the answer from the decoder [table: the prompts]. The Q-Former reads
  "[CLS] question [SEP]" in its BERT tokenizer (config.qformer_tokenizer: a bert-base-uncased directory).
- Each step draws one of a question's 10 human answers (each distinct answer with probability count / 10): the
  expected loss is the answer-weighted loss of BLIP / LAVIS (data/pipeline.py).
- [table] 5 epochs, 1,000 warmup steps, lr 1e-5, batch 128, AdamW betas (0.9, 0.999), weight decay 0.05, drop path
  0, images of 490 px, ViT layer-wise lr decay 0.95, inference with 5 beams. Cosine decay to 0 and a warmup from
  1e-8, as the captioning recipe (LAVIS's runner), are ours. 5 epochs of VQAv2 train + val (443,757 + 214,354
  questions) at batch 128 = 25,708 steps; with Visual Genome's QA added set total_steps to 5 x questions / 128.
- The ViT trains with fp32 master weights, computes in bfloat16 and rematerialises its blocks (as the captioning
  recipe, LAVIS's amp and gradient checkpointing); the 224 px checkpoint's position embeddings are resized to 490 px
  on load. Text lengths (ours): the LLM text at most 64 tokens, the question at most 32 Q-Former tokens.
- Evaluation as LAVIS's VQA evaluation configs: 5 beams, 1 to 10 new tokens, length penalty -1, the family's prompt;
  VQAv2 accuracy (metrics.vqa_accuracy) on the eval split; test-dev answers with `python -m blip2_jax.evaluate
  --task=vqa` (docs/evaluation.md).

  python -m blip2_jax.train --config=configs/finetune_vqa.py --workdir=gs://bucket/blip2_vqa \
      --config.init.checkpoint=/ckpt/blip2-opt-2.7b --config.init.llm_weights=/ckpt/blip2-opt-2.7b \
      --config.qformer_tokenizer=/ckpt/bert-base-uncased --config.data.name=vqav2 --config.data.data_dir=/data/tfds

`init.checkpoint`: a stage-2 workdir, a HF BLIP-2 directory or a HF InstructBLIP one (every parameter it has). A
stage-2 model has no Q-Former text side (word and position embeddings, the text FFN): that keeps its initialisation
unless `init.qformer_weights` names a stage-1 workdir or a HF BLIP-2 retrieval directory to read it from
(docs/finetune.md). The data: a TFDS dataset of the VQA format (docs/finetune.md#vqa). Variants `t5`, `t5_demo`,
`t5_tiny`: the same recipe with Flan-T5.

Built-in demo (docs/finetune.md): from the stage-2 OPT demo's workdir, on synthetic_vqa (questions about the
synthetic_shapes scenes), the held-out questions answered before the first step and at the end:

  python -m blip2_jax.train --config=configs/finetune_vqa.py:demo --workdir=workdirs/finetune_vqa_demo
"""

import importlib.util
import os

VARIANTS = ("paper", "demo", "tiny", "t5", "t5_demo", "t5_tiny")
PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}  # [table]; models/llms.py vqa_prompt


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
    raise ValueError(f"Unknown variant {variant!r} of configs/finetune_vqa.py; choose {', '.join(VARIANTS)}.")
  kind = "t5" if variant.startswith("t5") else "opt"
  size = variant.removeprefix("t5").removeprefix("_") or "paper"
  c = _stage2(kind, size)
  c.variant = variant
  c.seed = 42  # ours (LAVIS's run configs use 42)

  c.frozen_params = ("language_model/.*",)  # Sec. 4.3: the ViT and the Q-Former train, the LLM stays frozen
  c.model.qformer_text_input = True  # Sec. 4.3: the question goes to the Q-Former too
  c.model.qformer.vocab_size = 0  # the Q-Former tokenizer's size (30,523 for bert-base-uncased + [DEC])
  c.qformer_tokenizer = ""  # a local bert-base-uncased directory (required)
  c.model.vit.update(dict(image_size=490, remat_policy="full", drop_path_rate=0.0))  # [table] 490 px, drop path 0
  c.data.update(
    dict(
      task="vqa",
      image_size=490,
      prompt=PROMPTS[kind],
      prompt_fraction=0.0,  # every T5 example is prompt -> answer
      max_text_len=64,
      max_question_len=32,
    )
  )
  # [table] lr 1e-5, 1,000 warmup steps, AdamW (0.9, 0.999), weight decay 0.05; warmup from 1e-8, cosine to 0: ours.
  c.optimizer.update(dict(lr=1e-5, warmup_steps=1_000, warmup_lr=1e-8, min_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05))
  c.optimizer.vit_layer_decay = 0.95  # [table]
  c.global_batch_size = 128  # [table]
  c.total_steps = 25_708  # [table] 5 epochs of VQAv2 train + val: 5 x 658,111 / 128
  c.checkpoint_every = c.eval_every = 5_142  # once per epoch
  # LAVIS's VQA evaluation configs (and tasks.VQA_SETTINGS): 5 beams, 1 to 10 new tokens, length penalty -1.
  c.eval.update(
    dict(prompt=PROMPTS[kind], num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, batch_size=64)
  )
  c.eval_at_start = False  # the demo turns this on
  c.collapse_patience = 0  # fine-tuning starts from a model that already reads the image

  if size in ("demo", "tiny"):
    _demo(c, kind, tiny=size == "tiny")
  return c


def _demo(c, kind: str, tiny: bool):
  """The stage-2 demo's model (and its demo LLM, read from that workdir), the ViT now trained, on synthetic_vqa."""
  source = "" if tiny else f"workdirs/stage2_{kind}_demo"
  c.init.checkpoint = source
  c.init.llm_weights = "demo" if tiny else os.path.join(source, "demo_llm")
  c.qformer_tokenizer = "demo_vqa"  # demo_vocab.txt's words plus synthetic_vqa's
  c.model.vit.update(dict(image_size=48, remat_policy="none"))
  c.data.update(
    dict(
      name="synthetic_vqa",
      image_size=48,
      max_text_len=32,
      max_question_len=16,  # the longest question is 13 Q-Former tokens; the demo Q-Former has 32 positions
      builder_kwargs={"num_train": 256, "num_test": 32} if tiny else {},
    )
  )
  c.global_batch_size = 16 if tiny else 64
  c.total_steps = 8 if tiny else 900
  c.checkpoint_every = 4 if tiny else 450
  c.eval_every = 0 if tiny else 300
  c.log_every = 4 if tiny else 25
  # The demo model's own scale: the stage-2 demo trained at 3e-3; fine-tuning continues at a third of it (measured,
  # docs/finetune.md: 3e-4 rose half as fast over 300 steps).
  c.optimizer.update(dict(lr=1e-3, warmup_steps=2 if tiny else 30, warmup_lr=1e-6, min_lr=1e-6))
  c.optimizer.vit_layer_decay = 1.0  # the demo ViT has one block
  # Greedy decoding, before the first step and at the end; during training the first 250 images' questions.
  c.eval.update(
    dict(num_beams=1, max_new_tokens=5, min_new_tokens=1, length_penalty=1.0, during_training_images=0 if tiny else 250)
  )
  c.eval.batch_size = 32 if tiny else 500
  c.data.eval_max_examples = 32 if tiny else None
  c.eval_at_start = True
