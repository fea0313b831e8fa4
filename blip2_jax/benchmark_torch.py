"""transformers' PyTorch BLIP-2 at a config's sizes, timed as `python -m blip2_jax.benchmark --compare=transformers`
times ours: the reference side of the benchmark (see benchmark.py's docstring for what is timed and how).

torch is an optional dependency (the [test] extra): it is imported where it is used.
"""

import gc
import time

import numpy as np
import transformers

from blip2_jax import hf
from blip2_jax import state
from blip2_jax.models import llms


def compare_transformers(
  config,
  mode: str,
  steps: int,
  new_tokens: int,
  *,
  batch: dict,
  prompt: tuple,
  special_ids: dict,
  warmup: int,
  num_beams: int = 1,
) -> dict:
  """transformers' Blip2ForConditionalGeneration at this config's sizes (random init), timed like ours: a training
  step (mode 'train') on `batch` (host arrays with the training batch's keys) or greedy generation of exactly
  new_tokens tokens (mode 'generate'; beam search with num_beams > 1) after `prompt` (ids, mask); see the module
  docstring. special_ids: the LLM's 'eos', 'pad' and 'vocab_size'. Frees the model and torch's cached GPU memory
  before returning."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: the [test] extra)

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  try:
    return _time_transformers(config, mode, steps, new_tokens, device, batch, prompt, special_ids, warmup, num_beams)
  finally:  # the model, optimizer and batch died with _time_transformers' frame
    gc.collect()
    if device.type == "cuda":
      torch.cuda.empty_cache()


def _time_transformers(config, mode, steps, new_tokens, device, host, prompt, special, warmup, num_beams) -> dict:
  import torch  # pylint: disable=g-import-not-at-top  (optional: the [test] extra)

  cfg = state.model_config(config, None)
  if not cfg.qformer.vocab_size:  # 0 = "the tokenizer's"; unused in stage 2 (no Q-Former text side)
    cfg.qformer.vocab_size = 30523
  image_token = special["vocab_size"] - 1  # a valid id that the benchmark's random batch and prompt never hold
  hf_config = transformers.Blip2Config.from_dict(
    hf.hf_config_from_ours(cfg, cfg.llm.kind, hf.llm_hf_config(config), image_token)
  )
  frozen_dtype = getattr(torch, config.frozen_dtype)
  compute_dtype = getattr(torch, config.model.qformer.dtype)

  # Built in float32 on the device; the frozen towers then go to config.frozen_dtype, while the Q-Former, query
  # tokens and projection keep fp32 master weights and compute in the config's Q-Former dtype (autocast).
  with torch.device(device):
    model = transformers.Blip2ForConditionalGeneration(hf_config)
  model.vision_model.to(frozen_dtype).requires_grad_(False).eval()
  model.language_model.to(frozen_dtype).requires_grad_(False).eval()
  model.qformer.train(mode == "train")
  model.language_projection.train(mode == "train")
  if compute_dtype != torch.float32:
    for m in (model.qformer, model.language_projection):
      m.forward = torch.autocast(device.type, dtype=compute_dtype)(m.forward)
  else:  # HF casts the query output to the ViT's dtype before the projection
    model.language_projection.register_forward_pre_hook(lambda m, args: tuple(a.float() for a in args))

  b, q = config.global_batch_size, cfg.num_query_tokens
  encoder_decoder = llms.family(cfg.llm.kind).encoder_decoder
  pixels = torch.from_numpy(host["image"]).permute(0, 3, 1, 2).to(device, frozen_dtype)
  placeholders = torch.full((b, q), image_token, dtype=torch.long, device=device)

  def with_queries(ids, mask):  # transformers >= 4.47: one image placeholder per query, first
    ids = torch.cat([placeholders, torch.from_numpy(ids).long().to(device)], dim=1)
    return ids, torch.cat([torch.ones_like(placeholders), torch.from_numpy(mask).long().to(device)], dim=1)

  if mode == "train":
    input_ids, attention_mask = with_queries(host["text_ids"], host["text_mask"])
    targets, target_mask = (
      (host["target_ids"], host["target_mask"]) if encoder_decoder else (host["text_ids"], host["label_mask"])
    )
    labels = torch.from_numpy(np.where(target_mask > 0, targets, -100)).long().to(device)
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
      [p for p in model.parameters() if p.requires_grad],
      lr=opt.lr,
      betas=(opt.b1, opt.b2),
      weight_decay=opt.weight_decay,
    )

    def loss_fn():
      inputs = dict(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
      if encoder_decoder:
        return model(**inputs, labels=labels).loss
      # HF's own OPT loss, written out: transformers 5.24's ForCausalLMLoss .view()s the text positions' logits,
      # which fails when they are a non-contiguous slice (an fp32 LLM; bf16 ones are copied by its .float()).
      logits = model(**inputs).logits
      logits = logits[:, -labels.shape[1] : -1].float()
      return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
      )

    def call():
      loss = loss_fn()
      loss.backward()
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss.detach()
  else:
    input_ids, attention_mask = with_queries(*prompt)

    def call():
      with torch.inference_mode():
        return model.generate(
          pixel_values=pixels,
          input_ids=input_ids,
          attention_mask=attention_mask,
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          do_sample=False,
          num_beams=num_beams,
          pad_token_id=special["pad"],
          eos_token_id=special["eos"],
        )

  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  for _ in range(warmup):
    out = call()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    out = call()
  sync()
  seconds = (time.perf_counter() - t0) / steps

  if mode == "train":  # the image encoder's share, as ours reports it
    with torch.no_grad():
      model.vision_model(pixel_values=pixels)
      sync()
      t0 = time.perf_counter()
      for _ in range(steps):
        model.vision_model(pixel_values=pixels)
      sync()
    vit_seconds = (time.perf_counter() - t0) / steps

  attention = model.language_model.config._attn_implementation  # pylint: disable=protected-access
  result = {
    "transformers_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    "transformers_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
    "transformers_attention": attention,
  }
  if mode == "train":
    return dict(
      result,
      transformers_step_s=round(seconds, 4),
      transformers_samples_per_s=round(b / seconds, 1),
      transformers_loss=round(float(out), 4),
      transformers_vit_forward_s=round(vit_seconds, 4),
      transformers_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
  generated = out.shape[1] - (1 if encoder_decoder else input_ids.shape[1])  # T5: + decoder start token
  if generated != new_tokens:
    raise AssertionError(f"transformers generated {generated} tokens, expected {new_tokens}.")
  return dict(
    result,
    transformers_batch_s=round(seconds, 4),
    transformers_images_per_s=round(b / seconds, 1),
    transformers_tokens_per_s=round(b * new_tokens / seconds, 1),
  )
