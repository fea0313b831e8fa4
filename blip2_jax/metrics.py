"""The metrics BLIP-2's tasks are reported in, computed the way the field's reference scripts compute them.

- Captioning (COCO, NoCaps): BLEU-4 and CIDEr-D from pycocoevalcap's `Bleu(4)` and `Cider()` scorers, applied to
  captions tokenised like the COCO caption evaluation does (`tokenize_caption`, a pure-Python stand-in for its
  Java PTBTokenizer, so no Java is needed).
- VQA (VQAv2, OK-VQA): the accuracy of the official VQA evaluation (`vqaEval.py`) after its answer normalisation
  (`normalize_answer`).
- GQA: exact match of the normalised prediction with the one answer (`gqa_accuracy`), as LAVIS scores it.

Retrieval recall lives with the retrieval protocol, in `blip2_jax/retrieval.py` (`recall_at_k`).
"""

from collections.abc import Hashable, Mapping, Sequence
import re

import numpy as np

from blip2_jax.data import tokenizer as tokenizer_lib

# ---------------------------------------------------------------------------------------------------------------
# Caption tokenisation: what the COCO caption evaluation (pycocoevalcap's PTBTokenizer) does to a caption.
# ---------------------------------------------------------------------------------------------------------------

# pycocoevalcap `tokenizer/ptbtokenizer.py` drops exactly these tokens after tokenising. The bracket escapes are
# listed in upper case but the tokenizer runs with -lowerCase, so "(" survives as "-lrb-"; we keep that quirk.
_COCO_PUNCTUATION = frozenset(
  ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Typographic marks the tokenizer reads as their ASCII forms.
_ASCII_PUNCTUATION = str.maketrans(
  {"\u2018": "`", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2013": " -- ", "\u2014": " -- "}
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words that keep their final period in CoreNLP 3.4.1's PTBTokenizer, lower-case or not (found by running the
# jar that ships with pycocoevalcap). Words it treats as abbreviations only when capitalised ("Wash.", "Miss.",
# "Ill.", "La.", "Pa.", ...) are left out: we lower-case first, and in captions these are mostly the plain words.
_ABBREVIATIONS = frozenset(
  """
    mr mrs ms dr st jr sr vs etc inc co corp ltd plc cie bros esq mt ave rd blvd ft dept cf al
    prof gen capt sgt lt col gov adm rev maj pvt pres hon sen rep
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn fla ga ind kan ky md mich minn mo mont neb nev okla tenn va vt wis wyo
""".split()
)
# Whole words the PTB tokenizer splits in two.
_SPLIT_WORDS = {
  "cannot": ("can", "not"),
  "gonna": ("gon", "na"),
  "gotta": ("got", "ta"),
  "wanna": ("wan", "na"),
  "gimme": ("gim", "me"),
  "lemme": ("lem", "me"),
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_INITIALS = re.compile(r"^(?:[^\W\d_]\.)*[^\W\d_]$")  # "a", "u.s", "p.m": single letters joined by periods
_CAPTION_TOKEN = re.compile(
  r"""
    (?P<word>
      (?:[\#@](?=[^\W\d_]))?               # a #tag or @name keeps its sign
      \w+(?:(?:[-./]                         # parts joined by hyphens, periods, slashes,
            | (?<=\d)[,:](?=\d)              # commas and colons inside numbers,
            | (?<=[^\W\d_])'(?=[^\W\d_])     # apostrophes between letters
            )\w+)*
    )(?P<period>\.(?!\.))?                  # one final period: split off later unless an abbreviation
  | '(?:s|m|d|ll|re|ve)\b                   # a clitic on its own ("the dog 's")
  | (?P<ellipsis>\.{3,})
  | [?!]+ | -+                              # runs are one token ("?!", "--")
  | \S
""",
  re.VERBOSE,
)


def _split_word(word: str, period: str | None) -> list[str]:
  """Splits off clitics ("does n't", "man 's") and a sentence period from one word, as the PTB tokenizer does."""
  if period and not (word in _ABBREVIATIONS or _INITIALS.match(word)):
    return _split_word(word, None) + ["."]
  if period:
    return [word + period]
  if word in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[word])
  clitic = _CLITIC.match(word)
  return [clitic[1], clitic[2]] if clitic else [word]


def tokenize_caption(caption: str) -> str:
  """Tokenises a caption as the COCO caption evaluation does before BLEU and CIDEr see it.

  pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase) and then drops the
  punctuation tokens its tokenizer.py lists. This pure-Python version follows the PTB rules that occur in
  captions: lower-casing; punctuation split off words (",", ";", ":", "?", "!", "%", "$", "&", "*", a final "."),
  but kept inside numbers ("3.5", "1,000", "12:00"), hyphenated words ("black-and-white"), slashes ("cat/dog"),
  initials and known abbreviations ("u.s.", "p.m.", "st.", "mr."), "#tags" and "@names"; clitics split
  ("does n't", "ca n't", "man 's", "80 's", "can not", "gon na"); "..." (three or more periods) as one token.
  Quotes become quote tokens, which are then dropped; brackets become "-lrb-", "-rrb-", "-lsb-", ... and are
  *kept*, because the removal list spells them in upper case. So "A man, riding a horse." -> "a man riding a
  horse", and "A man (maybe) skiing." -> "a man -lrb- maybe -rrb- skiing".

  Checked against the Java tokenizer on caption-like sentences; it still differs on rarities: URLs and e-mail
  addresses, "no. 5" (Java keeps "no." before a number), "y'all"/"rock'n'roll"/"can't-miss"-style apostrophes,
  abbreviations outside `_ABBREVIATIONS`, currency signs other than "$", emoticons and SGML tags.
  """
  text = caption.lower().translate(_ASCII_PUNCTUATION)
  tokens = []
  for match in _CAPTION_TOKEN.finditer(text):
    token = match[0]
    if match["word"]:
      tokens += _split_word(match["word"], match["period"])
    elif match["ellipsis"]:
      tokens.append("...")
    elif token == '"':
      tokens.append("''")
    else:
      tokens.append(_BRACKETS.get(token, token))
  return " ".join(t for t in tokens if t not in _COCO_PUNCTUATION)


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by both metrics.
# ---------------------------------------------------------------------------------------------------------------


def _check_same_ids(left: Mapping, right: Mapping, left_name: str, right_name: str, what: str):
  """Raises a ValueError naming the ids present on one side only (the reference scripts assert instead)."""
  if not left:
    raise ValueError(f"{left_name} is empty: nothing to score.")
  for a, b, a_name, b_name in ((left, right, left_name, right_name), (right, left, right_name, left_name)):
    missing = [i for i in a if i not in b]
    if missing:
      raise ValueError(f"{len(missing)} {what} id(s) are in {a_name} but not in {b_name} (e.g. {missing[:3]}).")


def _check_string_lists(groups: Mapping, name: str, min_len: int):
  """A bare string would pass as a list of one-letter strings; reject it, and lists that are too short."""
  for key, group in groups.items():
    if isinstance(group, str) or len(group) < min_len or not all(isinstance(s, str) for s in group):
      raise ValueError(f"{name}[{key!r}] must be a list of at least {min_len} string(s), got {group!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Caption metrics.
# ---------------------------------------------------------------------------------------------------------------


def caption_scores(
  predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
  """BLEU-1..4 and CIDEr-D of one caption per image against its reference captions, as COCO evaluation reports.

  Both sides are tokenised with `tokenize_caption`, then scored by pycocoevalcap's `Bleu(4)` (corpus-level BLEU,
  "closest" reference length) and `Cider()` (CIDEr-D: sigma 6 length penalty, clipped tf-idf n-gram counts).

  Scale: the numbers are pycocoevalcap's raw values. BLEU lies in [0, 1]. CIDEr-D is 10 x the mean over images of
  the average over n = 1..4 of the mean over references of the penalised tf-idf cosine, so a caption equal to
  all its references scores 10 and good COCO models reach about 1.4 on the corpus; papers, BLIP-2's included
  (COCO CIDEr 145.8), print both metrics x 100. The idf comes from the references of the images scored, so
  CIDEr-D depends on the whole set: on a single image it is always 0 (every n-gram has idf log(1/1) = 0).

  Args:
    predictions: image id -> generated caption.
    references: image id -> its human captions (at least one); the same ids as `predictions`.

  Returns:
    {"bleu1", "bleu2", "bleu3", "bleu4", "cider"} -> float.
  """
  try:  # imported here, so that the VQA metric and the caption tokenizer work without it
    from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
    from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("caption_scores needs pycocoevalcap: pip install pycocoevalcap") from e
  _check_same_ids(predictions, references, "predictions", "references", "image")
  for image_id, caption in predictions.items():
    if not isinstance(caption, str):
      raise ValueError(f"predictions[{image_id!r}] must be one caption string, got {caption!r}.")
  _check_string_lists(references, "references", min_len=1)
  res = {i: [tokenize_caption(predictions[i])] for i in predictions}
  gts = {i: [tokenize_caption(r) for r in references[i]] for i in predictions}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
  scores["cider"] = float(cider)
  return scores


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (official VQA evaluation, vqaEval.py).
# ---------------------------------------------------------------------------------------------------------------

# Marks vqaEval.py deletes or turns into a space. Not in the list, so kept: "'", ":", "*", "#", "$", "%", "&".
_VQA_MARKS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo'd look-behind that never rejects anything: every period
# not followed by a digit goes ("3.5" stays, "dog." and "a.m." lose theirs).
_PERIOD = re.compile(r"\.(?!\d)")
# Number words become digits; note the official table also maps "none" to "0".
_NUMBER_WORDS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
_ARTICLES = frozenset(["a", "an", "the"])
# Contractions the official script restores when an answer spells them without an apostrophe. Its table's keys
# are each form with exactly one apostrophe removed ("couldnt've", "couldn'tve", but not "couldntve").
_CONTRACTED = (
  "ain't",
  "aren't",
  "can't",
  "could've",
  "couldn't",
  "couldn't've",
  "didn't",
  "doesn't",
  "don't",
  "hadn't",
  "hadn't've",
  "hasn't",
  "haven't",
  "he'd",
  "he'd've",
  "he's",
  "how'd",
  "how'll",
  "how's",
  "isn't",
  "it'd",
  "it'd've",
  "it'll",
  "ma'am",
  "mightn't",
  "mightn't've",
  "might've",
  "mustn't",
  "must've",
  "needn't",
  "not've",
  "o'clock",
  "oughtn't",
  "'ow's'at",
  "shan't",
  "she'd've",
  "should've",
  "shouldn't",
  "shouldn't've",
  "somebody'd've",
  "somebody'll",
  "somebody's",
  "someone'd",
  "someone'd've",
  "someone'll",
  "someone's",
  "something'd",
  "something'd've",
  "something'll",
  "that's",
  "there'd",
  "there'd've",
  "there're",
  "there's",
  "they'd",
  "they'd've",
  "they'll",
  "they're",
  "they've",
  "'twas",
  "wasn't",
  "we'd've",
  "we've",
  "weren't",
  "what'll",
  "what're",
  "what's",
  "what've",
  "when's",
  "where'd",
  "where's",
  "where've",
  "who'd",
  "who'd've",
  "who'll",
  "who's",
  "who've",
  "why'll",
  "why're",
  "why's",
  "won't",
  "would've",
  "wouldn't",
  "wouldn't've",
  "y'all",
  "y'all'll",
  "y'all'd've",
  "you'd",
  "you'd've",
  "you'll",
  "you're",
  "you've",
)
_CONTRACTIONS = {form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, c in enumerate(form) if c == "'"}
# The official table's quirks, kept for parity: it maps "somebody'd" the wrong way round, and its "Im", "Ive",
# "Id've", "I'dve" keys are capitalised, so they never match the lower-cased answer ("im" stays "im"); nor do
# "lets" and "shes" change (its entries for them map "let's" and "she's" to themselves).
_CONTRACTIONS["somebody'd"] = "somebodyd"


def _strip_vqa_punctuation(text: str) -> str:
  """vqaEval.py `processPunctuation`: each mark is deleted if it touches a space anywhere in the answer (or the
  answer has a digit-comma-digit, as in "1,000"), else replaced by a space ("t-shirt" -> "t shirt")."""
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in _VQA_MARKS:
    delete = delete_all or f"{mark} " in text or f" {mark}" in text
    out = out.replace(mark, "" if delete else " ")
  return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
  """A predicted answer as the official VQA evaluation compares it to the human answers.

  Punctuation handled as `_strip_vqa_punctuation`, then lower-cased and split on whitespace, number words turned
  into digits ("Two" -> "2"), articles dropped ("a dog." -> "dog"), apostrophe-less contractions restored
  ("dont" -> "don't"), words joined by single spaces.
  """
  text = _strip_vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]]) -> dict:
  """VQA accuracy as the official VQA evaluation computes it (VQAv2, OK-VQA and VizWiz use it).

  A question scores min(#humans who gave the prediction / 3, 1), averaged over the leave-one-out subsets of its
  human answers (9 of 10 each), so 1 matching human of 10 scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or more 1.0.
  The prediction is normalised with `normalize_answer`; the human answers, as in the official script, get only
  the punctuation step and only when they are not all the same (the released annotations are already
  normalised), and are never lower-cased.

  Args:
    predictions: question id -> predicted answer.
    answers: question id -> the human answers (the 10 `answers[*].answer` of a VQAv2 annotation); the same ids
      as `predictions`.

  Returns:
    {"accuracy": mean over questions in percent (the official script prints it rounded to 2 decimals),
     "per_question": question id -> score in [0, 1]}.
  """
  _check_same_ids(predictions, answers, "predictions", "answers", "question")
  for qid, prediction in predictions.items():
    if not isinstance(prediction, str):
      raise ValueError(f"predictions[{qid!r}] must be one answer string, got {prediction!r}.")
  # With one human answer the leave-one-out average is always 0 (GQA-style data needs exact match instead).
  _check_string_lists(answers, "answers", min_len=2)
  per_question = {}
  for qid, prediction in predictions.items():
    humans = answers[qid]
    if len(set(humans)) > 1:
      humans = [_strip_vqa_punctuation(h) for h in humans]
    predicted = normalize_answer(prediction)
    matches = sum(h == predicted for h in humans)
    per_question[qid] = sum(min(1.0, (matches - (h == predicted)) / 3) for h in humans) / len(humans)
  return {"accuracy": 100.0 * sum(per_question.values()) / len(per_question), "per_question": per_question}


def gqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, str]) -> dict:
  """GQA accuracy as LAVIS's GQA task computes it: a question scores 1 if its prediction, after the VQA answer
  normalisation (`normalize_answer`: vqaEval.py's processPunctuation then processDigitArticle), equals its one
  answer exactly, else 0. The answer is compared as written (GQA's are lower-case words without articles).

  Args:
    predictions: question id -> predicted answer.
    answers: question id -> the answer; the same ids as `predictions`.

  Returns:
    {"accuracy": mean over questions in percent, "per_question": question id -> 0.0 or 1.0}.
  """
  _check_same_ids(predictions, answers, "predictions", "answers", "question")
  for name, texts in (("predictions", predictions), ("answers", answers)):
    for qid, text in texts.items():
      if not isinstance(text, str):
        raise ValueError(f"{name}[{qid!r}] must be one answer string, got {text!r}.")
  per_question = {qid: float(normalize_answer(p) == answers[qid]) for qid, p in predictions.items()}
  return {"accuracy": 100.0 * sum(per_question.values()) / len(per_question), "per_question": per_question}


def caption_metrics(predictions: dict, references: dict) -> dict:
  """Exact match (the caption equals one of its references after LAVIS's cleaning) and metrics.caption_scores
  (BLEU-1..4, CIDEr-D): image id -> caption, image id -> its reference captions."""
  clean = tokenizer_lib.clean_caption
  exact = np.mean([clean(p) in {clean(r) for r in references[i]} for i, p in predictions.items()])
  return {"exact_match": float(exact), **caption_scores(predictions, references)}
