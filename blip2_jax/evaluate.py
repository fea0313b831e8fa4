r"""Evaluation of a training workdir: image-text retrieval (stage 1) or captioning (stage 2, `CaptionEvaluator`).

Retrieval as in the reference: ITC similarities pick the top-k candidates, ITM reranks them.

  python -m blip2_jax.evaluate --config=configs/stage1.py:demo --workdir=workdirs/stage1_demo

evaluates the latest checkpoint of a workdir alone and writes WORKDIR/eval_step_N.json. During training the
same evaluator runs every config.eval_every steps and at the end.

Scores (LAVIS `compute_sim_matrix`): sim = max over queries of the cosine of the projected query outputs and the
projected text [CLS] (no temperature); for each image its top-k texts (and for each text its top-k images) get
score = ITM positive logit + sim; everything outside the top-k ranks below.
"""
import json
import logging
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from blip2_jax import cli
from blip2_jax import checkpointing
from blip2_jax import losses
from blip2_jax import partitioning
from blip2_jax.data import pipeline

FLAGS = flags.FLAGS


def recall_at_k(scores: np.ndarray, positives: list, ks=(1, 5, 10)) -> dict:
  """scores: [N_query, N_candidate]; positives[i]: the correct candidate indices of query i.

  The rank of a query is the best rank among its correct candidates (COCO/Flickr protocol)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  ranks = np.empty(len(scores), np.int64)
  for i, pos in enumerate(positives):
    ranks[i] = np.where(np.isin(order[i], pos))[0].min()
  return {k: float((ranks < k).mean()) for k in ks}


class RetrievalEvaluator:
  """Embeds the eval split once per run() and computes image->text and text->image R@1/5/10."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup = config, setup
    self.data = pipeline.load_eval_set(config.data, tokenizer)
    self.batch = config.eval.batch_size
    model = setup.model

    def embed_images(params, images):
      image_embeds = model.apply({"params": params}, images, method="encode_image")
      q_out, _ = model.apply({"params": params}, image_embeds, method="query_features")
      return image_embeds, model.apply({"params": params}, q_out, method="image_feats")

    def embed_texts(params, ids, mask):
      cls = model.apply({"params": params}, ids, mask, method="text_features")
      return model.apply({"params": params}, cls, method="text_feat")

    def itm_scores(params, image_embeds, ids, mask):
      return model.apply({"params": params}, image_embeds, ids, mask, method="itm_logits")[:, 1]

    self._embed_images = jax.jit(embed_images)
    self._embed_texts = jax.jit(embed_texts)
    self._itm = jax.jit(itm_scores)

  def _batched(self, fn, *arrays):
    """Applies fn to fixed-size chunks (one compile), padding the last one; concatenates the outputs."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, self.batch):
      chunk = [a[start:start + self.batch] for a in arrays]
      pad = self.batch - len(chunk[0])
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      out = jax.device_get(fn(*chunk))
      outs.append(jax.tree.map(lambda x: x[:len(x) - pad], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def run(self, params) -> dict:
    d, k = self.data, self.config.eval.k_test
    image_embeds, image_feats = self._batched(lambda x: self._embed_images(params, x), d["images"])
    text_feats = self._batched(lambda i, m: self._embed_texts(params, i, m), d["text_ids"], d["text_mask"])
    sims = np.asarray(losses.itc_similarities(jnp.asarray(image_feats), jnp.asarray(text_feats)))
    n_img, n_txt = sims.shape

    def rerank(sim_rows, k):
      """-> (query index, candidate index) pairs of each row's top-k, and a score matrix to fill."""
      k = min(k, sim_rows.shape[1])
      top = np.argsort(-sim_rows, axis=1, kind="stable")[:, :k]
      rows = np.repeat(np.arange(len(sim_rows)), k)
      return rows, top.reshape(-1), np.full(sim_rows.shape, -100.0, np.float32)

    # image -> text
    rows, cols, i2t = rerank(sims, k)
    itm = self._batched(lambda r, i, m: self._itm(params, image_embeds[r], i, m),
                        rows, d["text_ids"][cols], d["text_mask"][cols])
    i2t[rows, cols] = itm + sims[rows, cols]
    # text -> image
    rows, cols, t2i = rerank(sims.T, k)
    itm = self._batched(lambda c, i, m: self._itm(params, image_embeds[c], i, m),
                        cols, d["text_ids"][rows], d["text_mask"][rows])
    t2i[rows, cols] = itm + sims.T[rows, cols]

    r_i2t = recall_at_k(i2t, d["img2txt"])
    r_t2i = recall_at_k(t2i, [[int(j)] for j in d["txt2img"]])
    out = {f"eval/img2txt_r{k}": v for k, v in r_i2t.items()}
    out.update({f"eval/txt2img_r{k}": v for k, v in r_t2i.items()})
    # ITC alone, before the ITM rerank: shows what the rerank adds.
    out["eval/img2txt_r1_itc"] = recall_at_k(sims, d["img2txt"], ks=(1,))[1]
    out["eval/txt2img_r1_itc"] = recall_at_k(sims.T, [[int(j)] for j in d["txt2img"]], ks=(1,))[1]
    out["eval/num_images"], out["eval/num_texts"] = float(n_img), float(n_txt)
    return out


class CaptionEvaluator:
  """Stage 2: captions every image of the eval split (config.eval: prompt, beams, new-token limits) and scores
  the captions against the split's references: exact match (the caption equals one of them after LAVIS's
  cleaning), BLEU-4 and CIDEr-D (pycocoevalcap's scorers, see metrics.py)."""

  def __init__(self, config, setup, tokenizer):
    self.config, self.setup, self.tokenizer = config, setup, tokenizer
    self.data = pipeline.load_eval_set(config.data, tokenizer)
    self.predictions: list[str] = []

  def run(self, params) -> dict:
    from blip2_jax import metrics, tasks  # pylint: disable=g-import-not-at-top
    from blip2_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    e, images = self.config.eval, self.data["images"]
    bs = e.batch_size
    preds = []
    for start in range(0, len(images), bs):
      chunk = images[start:start + bs]
      n = len(chunk)
      if n < bs:  # one compiled program for every batch: pad the last one
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
      preds += tasks.generate_text(self.setup.model, params, self.tokenizer, chunk, e.prompt,
                                   max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
                                   num_beams=e.num_beams, length_penalty=e.length_penalty)[:n]
    self.predictions = preds
    refs = {i: [self.data["captions"][t] for t in texts] for i, texts in enumerate(self.data["img2txt"])}
    exact = np.mean([tokenizer_lib.clean_caption(p) in refs[i] for i, p in enumerate(preds)])
    scores = metrics.caption_scores(dict(enumerate(preds)), refs)
    return {"eval/exact_match": float(exact), "eval/bleu4": scores["bleu4"], "eval/cider": scores["cider"],
            "eval/num_images": float(len(preds))}


def make_evaluator(config, setup, tokenizer):
  """Retrieval for stage 1, captioning for stage 2."""
  from blip2_jax import train  # pylint: disable=g-import-not-at-top
  cls = CaptionEvaluator if train.is_stage2(config) else RetrievalEvaluator
  return cls(config, setup, tokenizer)


def evaluate_workdir(config, workdir: str) -> dict:
  from blip2_jax import train  # pylint: disable=g-import-not-at-top
  config = train.resolve_demo_llm(config, workdir)
  tokenizer = train.load_tokenizer(config)
  setup = train.build(config, tokenizer)
  mngr = checkpointing.manager(workdir, config.keep_checkpoints)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint under {os.path.join(workdir, 'checkpoints')}: train first with "
                            f"python -m blip2_jax.train --config=... --workdir={workdir}.")
  state, frozen, _ = train.restore_or_init(config, setup, mngr)
  step = int(jax.device_get(state["step"]))
  evaluator = make_evaluator(config, setup, tokenizer)
  metrics = evaluator.run(partitioning.merge(state["params"], frozen))
  if jax.process_index() == 0:
    report = {"step": step, **metrics}
    if isinstance(evaluator, CaptionEvaluator):
      report["captions"] = [{"image": i, "prediction": p, "references": [evaluator.data["captions"][t] for t in ts]}
                            for i, (p, ts) in enumerate(zip(evaluator.predictions, evaluator.data["img2txt"]))]
    with open(os.path.join(workdir, f"eval_step_{step}.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return {"step": step, **metrics}


def main(argv):
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required.")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty at INFO
  logging.getLogger("blip2_jax").setLevel(logging.INFO)
  try:
    print(json.dumps(evaluate_workdir(FLAGS.config, FLAGS.workdir), indent=2))
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  # Flags are defined only when run as a program, so train/evaluate/benchmark can import each other.
  config_flags.DEFINE_config_file("config", None, "Config the workdir was trained with.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir whose latest checkpoint is evaluated.")
  app.run(main, flags_parser=cli.parse_flags)
