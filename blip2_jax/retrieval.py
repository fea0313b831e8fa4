"""Image-text retrieval as LAVIS evaluates it: ITC over all pairs, the top-k reranked by ITM, R@1/5/10.

Scores (LAVIS `compute_sim_matrix`): sim = max over queries of the cosine of the projected query outputs and the
projected text [CLS] (no temperature); for each image its top-k texts (and for each text its top-k images) get
score = ITM positive logit + sim; everything outside the top-k ranks below. Recall follows the COCO/Flickr
protocol: a query counts as found at k when any of its correct candidates is among its first k.
"""

import dataclasses

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


def one_device_sharding() -> jax.sharding.NamedSharding:
  """A batch sharding over this process's first device alone (the API's default)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("batch",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


@dataclasses.dataclass
class ImageEmbeddings:
  """The ViT output of N images (what ITM cross-attends to), split over S batch shards: `array` [S, R, L, W] is
  sharded on its first axis, so each shard's devices (and so each process) hold R rows and no host holds them
  all. Image i went in with embedding batch i // batch_size; its row is on shard `shard[i]` at `row[i]`."""

  array: jax.Array
  shard: np.ndarray  # [N] int
  row: np.ndarray  # [N] int


class RetrievalScorer:
  """LAVIS `compute_sim_matrix` for a Blip2Qformer module: the ITC similarity of every image with every text,
  then each query's top-k candidates reranked by ITM positive logit + similarity (-100 elsewhere).

  Sharded over the leading axis of `sharding` (the trainer's batch sharding; by default one device): each
  image batch is split over the batch shards and its embeddings stay where they were computed. The ITC
  features (small: [N, Q, 256]) are gathered on every host, every host computes the same similarities and
  top-k lists, and each ITM pair runs on the shard that holds its image (LAVIS splits the rerank over ranks the
  same way), so an image's embedding (1.4 MB at ViT-g) never moves. With COCO's 5k test images at ViT-g
  (257 x 1408 float32 per image, 7.2 GB in all) each of S shards holds 7.2/S GB."""

  def __init__(self, module, batch_size: int, progress: bool = False, sharding=None):
    self.sharding = sharding if sharding is not None else one_device_sharding()
    self.mesh, self.progress = self.sharding.mesh, progress
    self.shards = partitioning.batch_shards(self.sharding)
    self.batch = -(-batch_size // self.shards) * self.shards  # rows per batch, a multiple of the shards
    rows = self.sharding  # [S * c, ...] split on the first axis
    stacked = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.sharding.spec[0]))

    def embed_images(params, images):
      image_embeds = module.apply({"params": params}, images, method="encode_image")
      q_out, _ = module.apply({"params": params}, image_embeds, method="query_features")
      return image_embeds, module.apply({"params": params}, q_out, method="image_feats")

    def embed_texts(params, ids, mask):
      cls = module.apply({"params": params}, ids, mask, method="text_features")
      return module.apply({"params": params}, cls, method="text_feat")

    def assemble(batches):
      """Embedding batches [S * c, L, W] -> [S, n * c, L, W]: shard s keeps its c rows of every batch."""
      s = self.shards
      x = jnp.stack([b.reshape((s, -1) + b.shape[1:]) for b in batches], axis=1)  # [S, n, c, L, W]
      return x.reshape((s, -1) + x.shape[3:])

    def itm_scores(params, image_embeds, rows_, ids, mask):
      """image_embeds [S, R, L, W]; rows_ [S, c] (on shard s, rows of its own); ids, mask [S, c, T] -> [S, c]."""
      local = jax.vmap(lambda e, r: e[r])(image_embeds, rows_)  # a per-shard gather: no data moves
      flat = lambda x: jax.lax.with_sharding_constraint(x.reshape((-1,) + x.shape[2:]), rows)
      logits = module.apply({"params": params}, flat(local), flat(ids), flat(mask), method="itm_logits")
      return logits[:, 1].reshape(rows_.shape)

    self._embed_images = jax.jit(embed_images, out_shardings=(rows, rows))
    self._embed_texts = jax.jit(embed_texts, out_shardings=rows)
    self._assemble = jax.jit(assemble, out_shardings=stacked)
    self._itm = jax.jit(itm_scores, out_shardings=stacked)
    self._stacked = stacked

  def embed_images(self, params, batches) -> tuple[ImageEmbeddings, np.ndarray]:
    """batches: (images [n <= batch_size, S, S, 3] or padded to batch_size, number of real rows) pairs, e.g.
    `padded_batches` (every process passes the same). -> the images' embeddings, sharded (ImageEmbeddings), and
    their ITC features [N_img, Q, D] on every host."""
    embeds, feats, shard, row = [], [], [], []
    c = self.batch // self.shards
    for b, (images, n) in enumerate(batches):
      if n > self.batch:
        raise ValueError(f"An image batch of {n} rows; this scorer takes at most {self.batch} at a time.")
      images = images_lib.pad_rows(np.asarray(images)[:n], self.batch)
      e, f = self._embed_images(params, partitioning.from_host(images, self.sharding))
      embeds.append(e)
      feats.append(partitioning.host_copy(f)[:n])
      shard.append(np.arange(n) // c)
      row.append(b * c + np.arange(n) % c)
    array = self._assemble(tuple(embeds))
    return ImageEmbeddings(array, np.concatenate(shard), np.concatenate(row)), np.concatenate(feats)

  def _text_feats(self, params, ids, mask) -> np.ndarray:
    out = []
    for (i, m), n in images_lib.padded_batches(ids, mask, batch_size=self.batch):
      f = self._embed_texts(params, partitioning.from_host(i, self.sharding), partitioning.from_host(m, self.sharding))
      out.append(partitioning.host_copy(f)[:n])
    return np.concatenate(out)

  def _itm_pairs(self, params, embeds: ImageEmbeddings, images, ids, mask, itm_batch: int, desc: str) -> np.ndarray:
    """ITM positive logits of the pairs (images[p], ids[p], mask[p]); each runs on the shard of its image."""
    s = self.shards
    c = max(1, -(-itm_batch // s))  # pairs per shard per call
    by_shard = [np.flatnonzero(embeds.shard[images] == k) for k in range(s)]
    calls = max(1, -(-max(len(p) for p in by_shard) // c))
    out = np.zeros(len(images), np.float32)
    steps = range(calls)
    if self.progress:
      steps = tqdm.tqdm(steps, desc=desc, unit="batch")
    for step in steps:
      pick = np.zeros((s, c), np.int64)  # pair indices; a shard with fewer pairs repeats its first one
      real = np.zeros((s, c), bool)
      for k, pairs in enumerate(by_shard):
        chunk = pairs[step * c : (step + 1) * c]
        if len(pairs):
          pick[k] = pairs[0]
          pick[k, : len(chunk)], real[k, : len(chunk)] = chunk, True
      scores = self._itm(
        params,
        embeds.array,
        partitioning.from_host(embeds.row[images[pick]].astype(np.int32), self._stacked),
        partitioning.from_host(ids[pick], self._stacked),
        partitioning.from_host(mask[pick], self._stacked),
      )
      out[pick[real]] = partitioning.host_copy(scores)[real]
    return out

  def scores(
    self, params, image_embeds: ImageEmbeddings, image_feats, text_ids, text_mask, k: int, itm_batch_size=None
  ):
    """-> (sims [N_img, N_txt] ITC alone, i2t [N_img, N_txt] and t2i [N_txt, N_img] after the rerank), on every
    host. The ITM pairs go itm_batch_size at a time (default: the batch size)."""
    itm_batch = itm_batch_size or self.batch
    text_feats = self._text_feats(params, text_ids, text_mask)
    sims = np.asarray(losses.itc_similarities(jnp.asarray(image_feats), jnp.asarray(text_feats)))

    def rerank(sim_rows, k):
      """-> (query index, candidate index) pairs of each row's top-k, and a score matrix to fill."""
      k = min(k, sim_rows.shape[1])
      top = np.argsort(-sim_rows, axis=1, kind="stable")[:, :k]
      rows = np.repeat(np.arange(len(sim_rows)), k)
      return rows, top.reshape(-1), np.full(sim_rows.shape, -100.0, np.float32)

    # image -> text
    rows, cols, i2t = rerank(sims, k)
    itm = self._itm_pairs(params, image_embeds, rows, text_ids[cols], text_mask[cols], itm_batch, "ITM image->text")
    i2t[rows, cols] = itm + sims[rows, cols]
    # text -> image
    rows, cols, t2i = rerank(sims.T, k)
    itm = self._itm_pairs(params, image_embeds, cols, text_ids[rows], text_mask[rows], itm_batch, "ITM text->image")
    t2i[rows, cols] = itm + sims.T[rows, cols]
    return sims, i2t, t2i
