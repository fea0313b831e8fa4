"""Image-text retrieval as LAVIS evaluates it: ITC over all pairs, the top-k reranked by ITM, R@1/5/10.

Scores (LAVIS `compute_sim_matrix`): sim = max over queries of the cosine of the projected query outputs and the
projected text [CLS] (no temperature); for each image its top-k texts (and for each text its top-k images) get
score = ITM positive logit + sim; everything outside the top-k ranks below. Recall follows the COCO/Flickr
protocol: a query counts as found at k when any of its correct candidates is among its first k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from blip2_jax import losses
from blip2_jax import partitioning
from blip2_jax.data import images as images_lib


def positive_ranks(scores: np.ndarray, positives: list) -> np.ndarray:
  """scores: [N_query, N_candidate]; positives[i]: the correct candidate indices of query i. -> [N_query] ranks
  (0 = first), each the best rank among the query's correct candidates (COCO/Flickr protocol)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  ranks = np.empty(len(scores), np.int64)
  for i, pos in enumerate(positives):
    ranks[i] = np.where(np.isin(order[i], pos))[0].min()
  return ranks


def recall_at_k(scores: np.ndarray, positives: list, ks=(1, 5, 10)) -> dict:
  """R@k: the fraction of queries with a correct candidate among their first k (see positive_ranks)."""
  ranks = positive_ranks(scores, positives)
  return {k: float((ranks < k).mean()) for k in ks}


def retrieval_metrics(sims, i2t, t2i, img2txt: list, txt2img) -> dict:
  """R@1/5/10 both ways from the reranked scores, LAVIS's r_mean (their mean), and R@1 of ITC alone (what the
  ITM rerank adds)."""
  t2i_positives = [[int(j)] for j in txt2img]
  out = {f"img2txt_r{k}": v for k, v in recall_at_k(i2t, img2txt).items()}
  out.update({f"txt2img_r{k}": v for k, v in recall_at_k(t2i, t2i_positives).items()})
  out["r_mean"] = float(np.mean(list(out.values())))
  out["img2txt_r1_itc"] = recall_at_k(sims, img2txt, ks=(1,))[1]
  out["txt2img_r1_itc"] = recall_at_k(sims.T, t2i_positives, ks=(1,))[1]
  return out


class RetrievalScorer:
  """LAVIS `compute_sim_matrix` for a Blip2Qformer module: the ITC similarity of every image with every text,
  then each query's top-k candidates reranked by ITM positive logit + similarity (-100 elsewhere).

  The image embeddings (the ViT output that ITM cross-attends to) stay on the device and the ITM program
  gathers its pairs' rows there: the rerank scores (N_img + N_txt) * k pairs, and copying each pair's
  embedding from the host (1.4 MB for ViT-g) would cost more than the ITM itself."""

  def __init__(self, module, batch_size: int, progress: bool = False):
    self.batch, self.progress = batch_size, progress

    def embed_images(params, images):
      image_embeds = module.apply({"params": params}, images, method="encode_image")
      q_out, _ = module.apply({"params": params}, image_embeds, method="query_features")
      return image_embeds, module.apply({"params": params}, q_out, method="image_feats")

    def embed_texts(params, ids, mask):
      cls = module.apply({"params": params}, ids, mask, method="text_features")
      return module.apply({"params": params}, cls, method="text_feat")

    def itm_scores(params, image_embeds, image_index, ids, mask):
      return module.apply({"params": params}, image_embeds[image_index], ids, mask, method="itm_logits")[:, 1]

    self._embed_images = jax.jit(embed_images)
    self._embed_texts = jax.jit(embed_texts)
    self._itm = jax.jit(itm_scores)

  def embed_images(self, params, batches) -> tuple[jax.Array, np.ndarray]:
    """batches: (images [batch_size, S, S, 3], number of real rows) pairs, e.g. `padded_batches`. -> the image
    embeddings of the real rows (on the device) and their ITC features [N_img, Q, D] (on the host)."""
    embeds, feats = [], []
    for images, n in batches:
      e, f = self._embed_images(params, images)
      embeds.append(e[:n])
      feats.append(partitioning.host_copy(f)[:n])
    return jnp.concatenate(embeds), np.concatenate(feats)

  def _batched(self, fn, batch, *arrays, desc=None):
    """Applies fn to fixed-size chunks (one compile), padding the last one; concatenates the outputs."""
    chunks = images_lib.padded_batches(*arrays, batch_size=batch)
    if desc and self.progress:
      chunks = tqdm.tqdm(chunks, desc=desc, unit="batch", total=-(-len(arrays[0]) // batch))
    outs = []
    for chunk, n in chunks:
      out = partitioning.host_copy(fn(*(chunk if len(arrays) > 1 else (chunk,))))
      outs.append(jax.tree.map(lambda x, n=n: x[:n], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def scores(self, params, image_embeds, image_feats, text_ids, text_mask, k: int, itm_batch_size=None):
    """-> (sims [N_img, N_txt] ITC alone, i2t [N_img, N_txt] and t2i [N_txt, N_img] after the rerank). The ITM
    pairs go itm_batch_size at a time (default: the batch size)."""
    itm_batch = itm_batch_size or self.batch
    text_feats = self._batched(lambda i, m: self._embed_texts(params, i, m), self.batch, text_ids, text_mask)
    sims = np.asarray(losses.itc_similarities(jnp.asarray(image_feats), jnp.asarray(text_feats)))

    def rerank(sim_rows, k):
      """-> (query index, candidate index) pairs of each row's top-k, and a score matrix to fill."""
      k = min(k, sim_rows.shape[1])
      top = np.argsort(-sim_rows, axis=1, kind="stable")[:, :k]
      rows = np.repeat(np.arange(len(sim_rows)), k)
      return rows, top.reshape(-1), np.full(sim_rows.shape, -100.0, np.float32)

    # image -> text
    rows, cols, i2t = rerank(sims, k)
    itm = self._batched(
      lambda r, i, m: self._itm(params, image_embeds, r, i, m),
      itm_batch,
      rows,
      text_ids[cols],
      text_mask[cols],
      desc="ITM image->text",
    )
    i2t[rows, cols] = itm + sims[rows, cols]
    # text -> image
    rows, cols, t2i = rerank(sims.T, k)
    itm = self._batched(
      lambda c, i, m: self._itm(params, image_embeds, c, i, m),
      itm_batch,
      cols,
      text_ids[rows],
      text_mask[rows],
      desc="ITM text->image",
    )
    t2i[rows, cols] = itm + sims.T[rows, cols]
    return sims, i2t, t2i
