"""Tests for blip2_jax.metrics: caption tokenisation, BLEU / CIDEr-D and VQA accuracy (CPU, about a second).

Expected values are worked out by hand in the tests (n-gram counts, tf-idf vectors, leave-one-out averages) or
were recorded from the reference tools: the Java PTBTokenizer shipped with pycocoevalcap and the official
VQA evaluation script (vqaEval.py).
"""

import importlib
import math
import os
import shutil
import sys

import pytest

from blip2_jax import metrics

# --- caption tokenisation ------------------------------------------------------------------------------------


# Outputs of pycocoevalcap's PTBTokenizer (CoreNLP 3.4.1, -preserveLines -lowerCase, punctuation removed).
@pytest.mark.parametrize(
  "caption, expected",
  [
    ("A man, riding a horse.", "a man riding a horse"),
    ("A woman's hand holding a cell phone.", "a woman 's hand holding a cell phone"),
    ("Kids won't stop playing; it's fun!", "kids wo n't stop playing it 's fun"),
    ("The dogs' toys can't fit.", "the dogs toys ca n't fit"),
    ('A sign that says "STOP" on a pole.', "a sign that says stop on a pole"),
    ("The clock reads 10:30, 3.5 and 1,000...", "the clock reads 10:30 3.5 and 1,000"),
    ("An old-fashioned cat/dog toy -- for 80's kids?!", "an old-fashioned cat/dog toy for 80 's kids ?!"),
    ("A U.S. Air Force jet at 3 p.m. over Main St.", "a u.s. air force jet at 3 p.m. over main st."),
    ("A $5 bill & 100% cotton", "a $ 5 bill & 100 % cotton"),
    # The removal list spells bracket escapes in upper case, the tokenizer lower-cases them: brackets stay.
    ("A man (maybe) skiing [sic].", "a man -lrb- maybe -rrb- skiing -lsb- sic -rsb-"),
    ("We cannot go, we\u2019re gonna wait\u2026 a.m.\u2014ok", "we can not go we 're gon na wait a.m. ok"),
  ],
)
def test_tokenize_caption_matches_ptb_tokenizer(caption, expected):
  assert metrics.tokenize_caption(caption) == expected


_PARITY_CAPTIONS = [
  "A man riding a wave on top of a surfboard.",
  "There is a plate of food that has broccoli, carrots, and rice.",
  "A bathroom with a toilet, sink, and shower.",
  "A bus that is parked on the side of the road...",
  "A close-up of a pizza with pepperoni & cheese.",
  "There are 2 elephants (one big, one small) walking.",
  "A stop sign at the corner of Main St. and 5th Ave.",
  'A man wearing a t-shirt that reads "I love NY".',
  "THE MAN IS RIDING A MOTORCYCLE DOWN THE ROAD.",
  "A dog that's sitting in the driver's seat of a car.",
  "A man and woman pose for a picture at a party..",
  "The clock reads 10:30 on the building.",
  "The bird is perched on a branch; it's looking left.",
  "A 1/2 eaten sandwich and a cup of coffee.",
  "A man is riding a bike -- on the sidewalk.",
  '"A cat," she said, "is on the table."',
  'A street sign that reads "Dr. Martin Luther King Jr. Blvd."',
  "A U.S. Air Force jet flies overhead at 3 p.m.",
  "A T.V. sitting on top of a wooden stand.",
  "Kids won't stop playing in the snow; we're at the zoo and they've got zebras!",
  "It's the boys' bikes that are parked outside.",
  "What a nice view?! A man is (maybe) skiing [in the Alps] {cold}.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the Java PTBTokenizer needs java")
def test_tokenize_caption_agrees_with_the_java_tokenizer():
  """Runs pycocoevalcap's own tokenizer (about a second) on captions that exercise the rules we reproduce."""
  ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  if not os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
    pytest.skip("the Java PTBTokenizer writes its input file next to itself, in a read-only directory here")
  java = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(_PARITY_CAPTIONS)})
  assert [metrics.tokenize_caption(c) for c in _PARITY_CAPTIONS] == [java[i][0] for i in range(len(java))]


# --- BLEU and CIDEr-D ----------------------------------------------------------------------------------------


def test_identical_captions_score_bleu_1_and_cider_10_per_informative_ngram_order():
  """What pycocoevalcap returns when each candidate equals its references.

  BLEU: every n-gram matches and the lengths agree, so all four are 1 (up to pycocoevalcap's 1e-9 smoothing).
  CIDEr-D: the clipped cosine of identical tf-idf vectors is 1 for every n-gram order the caption has with a
  non-zero idf, 0 for an order it lacks ("two red buses" has no 4-gram), and the image scores 10 x the mean over
  the 4 orders: 10, 10 and 7.5 here. The idf of an n-gram is log(#images / #images whose references contain it);
  "a" is in two of three images, yet the other words keep each order's vector non-zero.
  """
  captions = {1: "a man riding a horse", 2: "a cat on a mat", 3: "two red buses"}
  scores = metrics.caption_scores(captions, {i: [c, c] for i, c in captions.items()})
  for n in range(1, 5):
    assert scores[f"bleu{n}"] == pytest.approx(1.0, abs=1e-8)
  assert scores["cider"] == pytest.approx((10 + 10 + 7.5) / 3)


def test_cider_of_a_single_image_is_zero():
  """With one image every n-gram appears in all (= 1) reference sets, so every idf is log(1/1) = 0."""
  scores = metrics.caption_scores({7: "a man riding a horse"}, {7: ["A man riding a horse."]})
  assert scores["cider"] == 0.0
  assert scores["bleu4"] == pytest.approx(1.0, abs=1e-8)


def test_bleu_against_ngram_counts_written_out():
  """Corpus BLEU: clipped n-gram matches and n-gram counts summed over images, one brevity penalty.

  Image 1, candidate "the dog runs on the grass" (6 words), references
    r1 "a dog is running on the grass" (7), r2 "the dog runs on green grass" (6):
    1-grams: the x2 (clipped to 1: no reference has two), dog, runs, on, grass      -> 5 of 6 match
    2-grams: the dog, dog runs, runs on (r2); on the, the grass (r1)                 -> 5 of 5
    3-grams: the dog runs, dog runs on (r2); on the grass (r1); runs on the (none)   -> 3 of 4
    4-grams: the dog runs on (r2); dog runs on the, runs on the grass (none)         -> 1 of 3
    closest reference length: 6.
  Image 2, candidate "a cat sits" (3), references "a cat sits on a mat" (6), "the cat is sitting" (4):
    1-, 2-, 3-grams all match (3, 2, 1), no 4-gram; closest reference length: 4 (|4-3| < |6-3|).
  Totals: matches (8, 7, 4, 1) of (9, 7, 5, 3); candidate length 9 < reference length 10, so the brevity
  penalty is exp(1 - 10/9).
  """
  predictions = {1: "The dog runs on the grass.", 2: "A cat sits"}
  references = {
    1: ["A dog is running on the grass.", "The dog runs on green grass"],
    2: ["a cat sits on a mat", "the cat is sitting"],
  }
  precisions = [8 / 9, 7 / 7, 4 / 5, 1 / 3]
  brevity = math.exp(1 - 10 / 9)
  scores = metrics.caption_scores(predictions, references)
  for n in range(1, 5):
    expected = brevity * math.prod(precisions[:n]) ** (1 / n)
    assert scores[f"bleu{n}"] == pytest.approx(expected, rel=1e-8)


def test_cider_d_against_tfidf_vectors_written_out():
  """CIDEr-D from hand-written tf-idf vectors, L = log 3 (three images).

  idf(g) = log(3) - log(max(1, #images whose references contain g)): "a" is in all three -> 0; every other
  n-gram, including those no reference has ("red red", "cat"), is in at most one -> L. tf is the raw count.
  Per order n: sim = sum_g min(c_g, r_g) r_g / (|c| |r|) * exp(-(len_c - len_r)^2 / (2 * 6^2)); per image:
  10 x mean over n = 1..4 of the mean over references.

  "a red red bus" vs "a red bus" (one word longer: penalty exp(-1/72)):
    n=1: c = {a: 0, red: 2L, bus: L}, r = {a: 0, red: L, bus: L}; clipped dot = min(2L, L) L + L L = 2L^2,
         |c| = L sqrt(5), |r| = L sqrt(2) -> 2 / sqrt(10)   (clipping: without it the dot would be 3L^2)
    n=2: c = {a red, red red, red bus: L}, r = {a red, red bus: L} -> 2L^2 / (L sqrt(3) L sqrt(2)) = 2 / sqrt(6)
    n=3: c = {a red red, red red bus}, r = {a red bus}: nothing shared -> 0;  n=4: r has none -> 0
  "a blue car" vs itself: 1, 1, 1 and no 4-gram -> 10 * 3/4 = 7.5
  "a cat" vs ["a dog", "a cat"]: 0 against "a dog"; 1, 1, 0, 0 against "a cat" -> 10 * (2/4) / 2 = 2.5
  """
  predictions = {"a": "a red red bus", "b": "a blue car", "c": "a cat"}
  references = {"a": ["a red bus"], "b": ["a blue car"], "c": ["a dog", "a cat"]}
  image_a = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 2 / math.sqrt(6) + 0 + 0) / 4
  scores = metrics.caption_scores(predictions, references)
  assert scores["cider"] == pytest.approx((image_a + 7.5 + 2.5) / 3, rel=1e-12)


@pytest.mark.parametrize(
  "predictions, references, message",
  [
    ({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, "in predictions but not in references"),
    ({1: "a dog"}, {1: ["a dog"], 3: ["a cat"]}, "in references but not in predictions"),
    ({1: "a dog"}, {1: []}, r"references\[1\] must be a list"),
    ({1: "a dog"}, {1: "a dog"}, r"references\[1\] must be a list"),
    ({1: ["a dog"]}, {1: ["a dog"]}, r"predictions\[1\] must be one caption"),
    ({}, {}, "predictions is empty"),
  ],
)
def test_caption_scores_rejects_bad_input(predictions, references, message):
  with pytest.raises(ValueError, match=message):
    metrics.caption_scores(predictions, references)


def test_module_imports_without_pycocoevalcap_and_says_how_to_install_it(monkeypatch):
  for name in ("pycocoevalcap", "pycocoevalcap.bleu.bleu", "pycocoevalcap.cider.cider"):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
  reloaded = importlib.reload(metrics)
  assert reloaded.vqa_accuracy({1: "yes"}, {1: ["yes"] * 10})["accuracy"] == 100.0
  with pytest.raises(ImportError, match="pip install pycocoevalcap"):
    reloaded.caption_scores({1: "a dog"}, {1: ["a dog"]})


# --- VQA -----------------------------------------------------------------------------------------------------


# Outputs of vqaEval.py's processPunctuation + processDigitArticle on these answers.
@pytest.mark.parametrize(
  "answer, expected",
  [
    ("Two", "2"),
    ("none", "0"),  # the official number table maps "none" too
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("a dog.", "dog"),
    ("The Black-and-White cat!", "black and white cat"),  # marks touching no space become spaces
    ("red, white", "red white"),  # "," touches a space: every "," is deleted
    ("red,white", "red white"),
    ("1,000 people", "1000 people"),  # a digit-comma-digit anywhere: every mark is deleted
    ("3.5 a.m.", "3.5 am"),  # periods go unless a digit follows
    ("  Yes\n", "yes"),
    ("im", "im"),  # the official table's "Im" key is capitalised and never matches
    ("it's", "it's"),  # apostrophes are not in the punctuation list
  ],
)
def test_normalize_answer_as_the_official_vqa_evaluation(answer, expected):
  assert metrics.normalize_answer(answer) == expected


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_over_leave_one_out_subsets(matching, expected):
  """min(#matches / 3, 1) over the 10 subsets of 9 humans. With m matching humans, m subsets hold m - 1 matches
  and 10 - m hold m: m = 1 -> (1 * 0 + 9 * 1/3) / 10 = 0.3; m = 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9, not the 1.0
  of the plain min(3 / 3, 1); only m >= 4 reaches 1."""
  humans = ["2"] * matching + ["3"] * (10 - matching)
  result = metrics.vqa_accuracy({"q": "Two"}, {"q": humans})
  assert result["per_question"]["q"] == pytest.approx(expected)
  assert result["accuracy"] == pytest.approx(100 * expected)


def test_vqa_accuracy_overall_is_the_mean_in_percent():
  answers = {1: ["yes"] * 10, 2: ["dog"] + ["cat"] * 9, 3: ["red"] * 10}
  result = metrics.vqa_accuracy({1: "Yes.", 2: "a dog", 3: "blue"}, answers)
  assert result["per_question"] == pytest.approx({1: 1.0, 2: 0.3, 3: 0.0})
  assert result["accuracy"] == pytest.approx(100 * 1.3 / 3)


def test_vqa_human_answers_get_punctuation_handling_only_when_they_disagree():
  """The official script strips the humans' punctuation only if their answers differ, and never lower-cases them
  (the released annotations are already normalised)."""
  disagreeing = ["t-shirt"] * 3 + ["shirt"] * 7  # -> "t shirt" x 3
  assert metrics.vqa_accuracy({1: "T-shirt"}, {1: disagreeing})["per_question"][1] == pytest.approx(0.9)
  unanimous = ["t-shirt"] * 10  # left as is, so the normalised "t shirt" matches none
  assert metrics.vqa_accuracy({1: "T-shirt"}, {1: unanimous})["per_question"][1] == 0.0


@pytest.mark.parametrize(
  "predictions, answers, message",
  [
    ({1: "yes", 2: "no"}, {1: ["yes"] * 10}, "in predictions but not in answers"),
    ({1: "yes"}, {1: ["yes"] * 10, 2: ["no"] * 10}, "in answers but not in predictions"),
    ({1: "yes"}, {1: "yes"}, r"answers\[1\] must be a list of at least 2"),
    ({1: "yes"}, {1: ["yes"]}, r"answers\[1\] must be a list of at least 2"),
    ({1: None}, {1: ["yes"] * 10}, r"predictions\[1\] must be one answer"),
    ({}, {}, "predictions is empty"),
  ],
)
def test_vqa_accuracy_rejects_bad_input(predictions, answers, message):
  with pytest.raises(ValueError, match=message):
    metrics.vqa_accuracy(predictions, answers)
