"""Helpers shared by the test files (`import helpers`: pytest puts tests/ on sys.path, as for conftest)."""

import numpy as np
import torch
import transformers

# The tiny LLM configs of the BLIP-2 / InstructBLIP parity tests (transformers' text_config).
OPT_TEXT = dict(
  model_type="opt",
  vocab_size=64,
  hidden_size=24,
  num_hidden_layers=2,
  ffn_dim=48,
  num_attention_heads=4,
  max_position_embeddings=40,
  word_embed_proj_dim=24,
  pad_token_id=1,
  bos_token_id=2,
  eos_token_id=2,
)
T5_TEXT = dict(
  model_type="t5",
  vocab_size=64,
  d_model=24,
  d_kv=8,
  d_ff=48,
  num_layers=2,
  num_decoder_layers=2,
  num_heads=3,
  feed_forward_proj="gated-gelu",
  dense_act_fn="gelu",
  tie_word_embeddings=False,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
)
# Vicuna's layout, tiny: a LLaMA with grouped-query attention (2 KV heads for 4) and an untied lm_head.
LLAMA_TEXT = dict(
  model_type="llama",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  tie_word_embeddings=False,
  pad_token_id=0,
  bos_token_id=1,
  eos_token_id=2,
)


def unpadded(row, mask) -> list[int]:
  """The ids of one row of a padded batch where its mask is 1, as a list (to compare with a tokenizer's output)."""
  return [int(t) for t, m in zip(row, mask) if m]


def rel_error(ours, theirs, where=None):
  """max |ours - theirs| / max |theirs| in float32, over `where` (an index into both) if given. `theirs` may be a
  torch tensor; the two must have the same shape."""
  theirs = np.asarray(theirs.detach() if isinstance(theirs, torch.Tensor) else theirs, np.float32)
  ours = np.asarray(ours, np.float32)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  if where is not None:
    ours, theirs = ours[where], theirs[where]
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def randomise(model, seed, std=0.2, embedding_norm=None):
  """A torch model with every parameter std * N(0, 1), norm scales 1 + std * N(0, 1), so that no wrong name or
  transpose hides; BLIP-2's fused vision qkv bias keeps its zero k part. `seed`: an int, or a torch.Generator to
  draw from (the caller's, advanced). `embedding_norm`: then the input embedding rows are rescaled to this norm.
  Returns the model in eval mode."""
  g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm_scale = p.ndim == 1 and name.endswith("weight") and "norm" in name.lower()
      p.copy_((1.0 if is_norm_scale else 0.0) + std * torch.randn(p.shape, generator=g))
    for module in model.modules():
      if isinstance(module, transformers.models.blip_2.modeling_blip_2.Blip2Attention):
        module.qkv.bias[module.embed_dim : 2 * module.embed_dim] = 0.0  # the fused bias is cat(q, 0, v)
    if embedding_norm is not None:
      embeddings = model.get_input_embeddings().weight
      embeddings.copy_(embedding_norm * embeddings / embeddings.norm(dim=1, keepdim=True))
  return model.eval()


def hf_blip2_retrieval(*, width, vocab, max_pos, queries, seed=0):
  """A tiny random HF Blip2ForImageTextRetrieval: 32x32 images in 8x8 patches, 2 vision and 2 Q-Former layers."""
  config = transformers.Blip2Config(
    vision_config=dict(
      hidden_size=width,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
      layer_norm_eps=1e-6,
      qkv_bias=True,
    ),
    qformer_config=dict(
      hidden_size=width,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      cross_attention_frequency=2,
      encoder_hidden_size=width,
      vocab_size=vocab,
      use_qformer_text_input=True,
      max_position_embeddings=max_pos,
    ),
    num_query_tokens=queries,
    image_text_hidden_size=16,
    image_token_index=None,
  )
  torch.manual_seed(seed)
  return randomise(transformers.Blip2ForImageTextRetrieval(config), seed)


def word_tokenizer(kind: str, vocab_size: int, pad: bool = True) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over a tiny LLM's whole vocabulary ("w5" ... "w63"), which frames a text as the
  family's own tokenizer does. OPT's: "</s>" = 2 in front of each text, "\\n" = 4 ends a caption; LLaMA's: "<s>" =
  1 in front, "</s>" = 2 (its EOS) ends a caption, pad "<unk>" = 0; T5's: "</s>" = 1 after each text (the encoder
  input), pad "<pad>" = 0. pad=False: no pad token, as the LLaMA tokenizers ship."""
  import tokenizers  # pylint: disable=import-outside-toplevel  # only the generation tests need it

  specials, bos, pad_token = {
    "opt": (("<s>", "<pad>", "</s>", "<unk>"), "</s>", "<pad>"),
    "llama": (("<unk>", "<s>", "</s>"), "<s>", "<unk>"),
    "t5": (("<pad>", "</s>", "<unk>"), None, "<pad>"),
  }[kind]
  vocab = {t: i for i, t in enumerate(specials)}
  vocab.update({"\n": 4} if kind == "opt" else {})
  vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
  if kind == "opt":
    tok.add_tokens([tokenizers.AddedToken("\n", normalized=False)])
  framing = "</s>" if bos is None else bos
  tok.post_processor = tokenizers.processors.TemplateProcessing(
    single="$A </s>" if bos is None else f"{bos} $A", special_tokens=[(framing, vocab[framing])]
  )
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token=pad_token if pad else None, eos_token="</s>", bos_token=bos, unk_token="<unk>"
  )
