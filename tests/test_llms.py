"""The LLM registry (blip2_jax.models.llms): one entry per family, and the data pipeline, the model and generation
agreeing on what it says."""

import ml_collections
import numpy as np
import pytest
import tokenizers
import transformers

from blip2_jax import demo_llm
from blip2_jax import tasks
from blip2_jax.data import pipeline
from blip2_jax.models import llama
from blip2_jax.models import llms
from blip2_jax.models import opt
from blip2_jax.models import t5

TINY = {
  "opt": dict(
    model_type="opt",
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    ffn_dim=32,
    num_attention_heads=2,
    max_position_embeddings=64,
    word_embed_proj_dim=16,
  ),
  "llama": dict(
    model_type="llama",
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
  ),
  "qwen2": dict(
    model_type="qwen2",
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
  ),
  "t5": dict(
    model_type="t5",
    vocab_size=40,
    d_model=24,
    d_kv=8,
    d_ff=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=3,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  ),
}


@pytest.mark.parametrize("kind", sorted(llms.FAMILIES))
def test_each_family_builds_its_module_and_decoder_from_its_hf_config(kind):
  family = llms.family(kind)
  cfg = llms.llm_config(TINY[kind])
  assert cfg.kind == kind and family.name == kind
  assert family.width(cfg) == (TINY[kind].get("hidden_size") or TINY[kind]["d_model"])
  module = family.module(cfg)
  modules = {"opt": opt.OPTForCausalLM, "t5": t5.T5ForConditionalGeneration}
  assert isinstance(module, modules.get(kind, llama.LlamaForCausalLM))
  assert hasattr(family.decoder, "create")
  rows = family.weight_map(cfg)
  assert rows and all(len(r) == 3 for r in rows)
  # A decoder-only LLM generates after its last prompt position, which must be a real token: left padding.
  assert family.padding_side == ("right" if family.encoder_decoder else "left")
  assert family.vqa_prompt.count("{}") == 1


def test_an_unknown_family_is_one_sentence_naming_the_supported_ones():
  with pytest.raises(ValueError, match="'mistral' is not supported: blip2_jax has opt, llama, qwen2, t5"):
    llms.family("mistral")
  with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
    llms.llm_config({"model_type": "mistral"})


def test_kind_is_retrieval_for_stage1_and_the_family_for_stage2():
  assert llms.kind_of(ml_collections.ConfigDict({"vit": {}})) == llms.RETRIEVAL
  assert llms.kind_of(ml_collections.ConfigDict({"llm": {"kind": "t5"}})) == "t5"


WORDS = "a photo of red circle two blue squares on the left".split()


def _tokenizer(kind):
  """The demo's word-level tokenizer (OPT, T5), or one framing text as LLaMA's ("<s>" first, no EOS appended) or
  Qwen2's (no BOS, EOS "<|endoftext|>", which also pads) tokenizers do."""
  if kind in demo_llm.KINDS:
    return demo_llm.make_tokenizer(kind)
  bos, eos, pad = ("<s>", "</s>", "<unk>") if kind == "llama" else (None, "<|endoftext|>", "<|endoftext|>")
  specials = [t for t in dict.fromkeys((bos, eos, pad, "<unk>")) if t]
  vocab = {t: i for i, t in enumerate(specials + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
  if bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
    )
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>"
  )


@pytest.mark.parametrize("kind", sorted(llms.FAMILIES))
def test_the_pipeline_writes_the_text_fields_the_family_names_and_generation_stops_at_its_caption_end(kind):
  family = llms.family(kind)
  tok = _tokenizer(kind)
  captions = ["a red circle", "two blue squares on the left"]
  batch = {"image": np.zeros((2, 4, 4, 3), np.float32), "caption": np.asarray(captions, object)}
  if family.encoder_decoder:
    batch["prefix"] = np.asarray(["a red", "two blue"], object)
    batch["suffix"] = np.asarray(["circle", "squares on the left"], object)
  data_cfg = ml_collections.ConfigDict(dict(max_text_len=16, prompt="a photo of"))
  out = pipeline._tokenize_batch(batch, tok, data_cfg, kind)  # pylint: disable=protected-access
  assert set(out) == {"image", *family.text_keys()}
  eos = family.eos_token_id(tok)
  if family.caption_end is None:
    assert eos == tok.eos_token_id
  if not family.encoder_decoder:  # the training text ends each caption with the token generation stops at
    ids, mask = out["text_ids"], out["text_mask"]
    last = ids[np.arange(len(ids)), mask.sum(axis=1) - 1]
    assert (last == eos).all()
  # Prompts for generation are padded on the family's side.
  ids, mask = tasks.tokenize_prompts(tok, ["a photo of", "a"], family)
  short = mask[1]
  assert (short[-1] == 1) if family.padding_side == "left" else (short[0] == 1 and short[-1] == 0)
