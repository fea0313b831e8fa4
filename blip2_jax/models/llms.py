"""The LLM registry: everything that differs between the frozen LLM families BLIP-2 can prompt.

Stage 2 puts the Q-Former's projected query outputs in front of a frozen LLM. What the rest of the package needs
to know about that LLM is one `LLMFamily` entry here: its Flax module and decoding adapter, how its HF config
and weights are named, which side prompts are padded on, what ends a caption, and whether it is decoder-only
(the soft prompt and the text form one sequence, OPT) or an encoder-decoder (the soft prompt and a text prefix
are the encoder's input, the decoder predicts the rest, Flan-T5). Adding a family means its model file and one
entry in FAMILIES; LLaMA (2, 3, Vicuna) and Qwen2 share models/llama.py.

One name says which kind of BLIP-2 model something is, everywhere (configs, the data pipeline, `Blip2.kind`):
RETRIEVAL for the stage-1 model (ViT + Q-Former with ITC/ITM/ITG heads; HF Blip2ForImageTextRetrieval), else the
name of the LLM family of a stage-2 model (HF Blip2ForConditionalGeneration).
"""

from collections.abc import Callable
import dataclasses

import ml_collections

from blip2_jax.models import llama
from blip2_jax.models import opt
from blip2_jax.models import t5

RETRIEVAL = "retrieval"


@dataclasses.dataclass(frozen=True)
class LLMFamily:
  """One LLM family: what BLIP-2's stage 2 and its inference need to know about it."""

  name: str  # HF's `model_type`
  module: Callable  # cfg -> the frozen LLM's Flax module
  decoder: type  # its adapter for blip2_jax.generation: `create(module, params)`
  # (hf dict, dtype, remat_policy, tensor_names) -> our config. tensor_names: the checkpoint's tensor names
  # relative to the LLM, or None without a checkpoint; they tell what a config.json does not say.
  config_from_hf: Callable
  weight_map: Callable  # cfg -> (our path, HF name, kind) rows for weights.tree_from_hf / hf_tensors
  width: Callable  # cfg -> the embedding width the soft prompt is projected to
  encoder_decoder: bool  # see the module docstring
  # Where prompts are padded for generation: a decoder-only model's last prompt position must be a real token.
  padding_side: str
  # The text that ends a caption in training and whose token ends generation; None: the tokenizer's EOS (the
  # data pipeline appends its text, data.pipeline._tokenize_batch; T5's tokenizer appends it itself).
  caption_end: str | None
  vqa_prompt: str  # the paper's zero-shot VQA template
  vocab_tables: tuple[str, ...]  # HF names of the tensors with a row per token (export adds HF's <image> row)

  def text_keys(self) -> tuple[str, ...]:
    """The text fields of a stage-2 training batch (data.pipeline writes them, Blip2LLM.losses reads them)."""
    if self.encoder_decoder:
      return ("text_ids", "text_mask", "target_ids", "target_mask")
    return ("text_ids", "text_mask", "label_mask")

  def eos_token_id(self, tokenizer) -> int:
    """The token that ends generation: caption_end's single token, else the tokenizer's EOS."""
    if self.caption_end is None:
      return tokenizer.eos_token_id
    ids = tokenizer(self.caption_end, add_special_tokens=False).input_ids
    if len(ids) != 1:
      raise ValueError(
        f"The {self.name} tokenizer splits {self.caption_end!r} into {ids}; BLIP-2 needs it as one "
        "token (its end of caption)."
      )
    return ids[0]


def _opt_config(hf, *, dtype, remat_policy, tensor_names=None):
  del tensor_names  # OPT's head is always the tied table
  return opt.config_from_hf(hf, dtype=dtype, remat_policy=remat_policy)


def _llama_config(hf, *, dtype, remat_policy, tensor_names=None):
  del tensor_names  # config.json's tie_word_embeddings says whether lm_head.weight is stored
  return llama.config_from_hf(hf, dtype=dtype, remat_policy=remat_policy)


def _t5_config(hf, *, dtype, remat_policy, tensor_names=None):
  # Whether the head is the shared table shows in the tensors only (transformers >= 5 configs say "tied").
  has_lm_head = None if tensor_names is None else "lm_head.weight" in tensor_names
  return t5.config_from_hf(hf, dtype=dtype, remat_policy=remat_policy, has_lm_head=has_lm_head)


def _llama_family(name: str) -> LLMFamily:
  """LLaMA (2, 3, Vicuna) and Qwen2: one model file (models/llama.py), told apart by cfg.model_type."""
  return LLMFamily(
    name=name,
    module=llama.LlamaForCausalLM,
    decoder=llama.LlamaDecoder,
    config_from_hf=_llama_config,
    weight_map=llama.weight_map,
    width=lambda cfg: cfg.hidden_size,
    encoder_decoder=False,
    padding_side="left",
    # The tokenizer's EOS: LAVIS Blip2VicunaInstruct ends each training text with it ("</s>" for Vicuna).
    caption_end=None,
    vqa_prompt="Question: {} Answer:",
    vocab_tables=("model.embed_tokens.weight", "lm_head.weight"),  # lm_head.weight: when untied
  )


FAMILIES = {
  "opt": LLMFamily(
    name="opt",
    module=opt.OPTForCausalLM,
    decoder=opt.OPTDecoder,
    config_from_hf=_opt_config,
    weight_map=opt.weight_map,
    width=lambda cfg: cfg.hidden_size,
    encoder_decoder=False,
    padding_side="left",
    caption_end="\n",  # BLIP-2 OPT ends every caption with "\n" (LAVIS Blip2OPT)
    vqa_prompt="Question: {} Answer:",
    vocab_tables=("model.decoder.embed_tokens.weight",),
  ),
  "llama": _llama_family("llama"),
  "qwen2": _llama_family("qwen2"),
  "t5": LLMFamily(
    name="t5",
    module=t5.T5ForConditionalGeneration,
    decoder=t5.T5Decoder,
    config_from_hf=_t5_config,
    weight_map=t5.weight_map,
    width=lambda cfg: cfg.d_model,
    encoder_decoder=True,
    padding_side="right",
    caption_end=None,
    vqa_prompt="Question: {} Short answer:",
    vocab_tables=("shared.weight", "lm_head.weight"),
  ),
}


def family(name: str) -> LLMFamily:
  if name not in FAMILIES:
    raise ValueError(f"The LLM family {name!r} is not supported: blip2_jax has {', '.join(FAMILIES)}.")
  return FAMILIES[name]


def kind_of(model_cfg) -> str:
  """The model kind of a model config: RETRIEVAL (stage 1), or the LLM family of its `llm` section (stage 2)."""
  return model_cfg.llm.kind if "llm" in model_cfg else RETRIEVAL


def llm_config(
  hf: dict, *, dtype: str = "float32", remat_policy: str = "none", tensor_names=None, attention: str = "xla"
) -> ml_collections.ConfigDict:
  """The frozen LLM's config from its HF config dict (a config.json, or BLIP-2's text_config), with `kind` set.
  tensor_names: the checkpoint's tensor names relative to the LLM, when there is a checkpoint. attention: where
  its self-attention runs over more than one new token (layers.ATTENTION_IMPLEMENTATIONS; decoder-only LLMs)."""
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    raise ValueError(f"The LLM's model_type {kind!r} is not supported: blip2_jax has {', '.join(FAMILIES)}.")
  if attention != "xla" and FAMILIES[kind].encoder_decoder:
    raise ValueError(
      f"config.model.llm.attention={attention!r}: a {kind} LLM's attention adds a relative position bias that the "
      "fused kernels do not take here; use 'xla'."
    )
  cfg = FAMILIES[kind].config_from_hf(hf, dtype=dtype, remat_policy=remat_policy, tensor_names=tensor_names)
  cfg.kind = kind
  cfg.attention = attention
  return cfg
