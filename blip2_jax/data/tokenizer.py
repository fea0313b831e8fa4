"""The Q-Former's text tokenizer: BERT WordPiece plus the `[DEC]` bos token, as LAVIS builds it."""

import os
import re

import numpy as np
import transformers

_STRIPPED = re.compile(r'[.!"()*#:;~]')  # the characters LAVIS's caption processor removes


# The WordPiece vocabs shipped for the demos, by the name a config's `tokenizer` gives them: "demo" has every word of
# the synthetic_shapes captions, "demo_vqa" those and every word of the synthetic_vqa questions and answers (its
# first lines are demo_vocab.txt's, in order, so a caption gets the same ids from both), "demo_instruct" those and
# the words of the instruction demo's templates (configs/instruct.py), again appended.
DEMO_VOCABS = {"demo": "demo_vocab.txt", "demo_vqa": "demo_vqa_vocab.txt", "demo_instruct": "demo_instruct_vocab.txt"}


def demo_vocab_path(name: str = "demo") -> str:
  """The path of the shipped WordPiece vocab `name` (a key of DEMO_VOCABS)."""
  if name not in DEMO_VOCABS:
    raise ValueError(f"Unknown demo vocab {name!r}; choose one of {', '.join(DEMO_VOCABS)}.")
  return os.path.join(os.path.dirname(__file__), DEMO_VOCABS[name])


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
  """A local bert-base-uncased directory, or a WordPiece `.txt` vocab, plus the `[DEC]` bos token.

  `len(tokenizer)` is then the Q-Former's vocab size (30,523 for bert-base-uncased), and
  `tokenizer.bos_token_id` the id that replaces [CLS] for image-grounded text generation (ITG).
  """
  if os.path.isdir(path):
    # local_files_only: a typo in the path must fail here, not start a download from a hub.
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  elif os.path.isfile(path) and path.endswith(".txt"):
    # transformers 5 takes the file as `vocab`; the old `vocab_file=` is silently ignored there and
    # leaves a 5-token tokenizer that maps every word to [UNK].
    tokenizer = transformers.BertTokenizerFast(vocab=path, do_lower_case=True)
  else:
    raise FileNotFoundError(
      f"No tokenizer at {path!r}: expected a local bert-base-uncased directory (vocab.txt, "
      f"tokenizer_config.json) or a WordPiece vocab .txt file."
    )
  tokenizer.add_special_tokens({"bos_token": "[DEC]"})
  return tokenizer


def load_llm_tokenizer(path: str, local_files_only: bool = True) -> transformers.PreTrainedTokenizerBase:
  """The LLM's own tokenizer from a local HF directory. One without a pad token (LLaMA's and Vicuna's have none)
  pads with its EOS, as HF's generate does and HF users set it: every pad is masked out, so which id fills it
  changes nothing, but batching needs one."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
  if tokenizer.pad_token is None and tokenizer.eos_token is not None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def pad_id(tokenizer) -> int:
  """The id that pads an LLM tokenizer's text: its pad token's, or its EOS's without one (load_llm_tokenizer's rule,
  for a tokenizer made elsewhere)."""
  return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def clean_caption(text: str, max_words: int = 50) -> str:
  """Lower-cases, strips `[.!"()*#:;~]`, collapses whitespace and keeps `max_words` words (as LAVIS)."""
  words = _STRIPPED.sub(" ", text.lower()).split()
  return " ".join(words[:max_words])


def tokenize(tokenizer, captions: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask), both int32 [N, max_len]: [CLS] caption [SEP], truncated or padded to max_len."""
  out = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)
