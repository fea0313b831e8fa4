"""Sharded retrieval (blip2_jax.retrieval): image embeddings split over the batch shards and the ITM rerank run
where each image's embedding lives give the scores of one device. The tiny stage-1 model with random weights on
8 fake devices (data 2 x fsdp 4, the trainer's batch sharding), against the same parameters on one device."""

import re

import jax
import numpy as np
import pytest

from blip2_jax import partitioning
from blip2_jax import retrieval
from blip2_jax import state as state_lib
from blip2_jax.data import images as images_lib
from configs import stage1

N_IMAGES, TEXTS_PER_IMAGE, K = 11, 3, 5  # 11 images: the last embedding batch is partly padding


@pytest.fixture(scope="module")
def setup_and_data():
  config = stage1.get_config("tiny")
  config.sharding.mesh = {"data": 2, "fsdp": 4, "tensor": 1}
  tokenizer = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tokenizer, devices=jax.devices()[:8])
  state, frozen = setup.init(jax.random.PRNGKey(0))
  params = partitioning.merge(state["params"], frozen)
  rng = np.random.default_rng(0)
  size = config.model.vit.image_size
  images = rng.normal(size=(N_IMAGES, size, size, 3)).astype(np.float32)
  vocab = len(tokenizer)
  n_txt = N_IMAGES * TEXTS_PER_IMAGE
  ids = rng.integers(5, vocab - 1, size=(n_txt, 12)).astype(np.int32)
  ids[:, 0] = tokenizer.cls_token_id
  lengths = rng.integers(4, 13, size=n_txt)
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, tokenizer.pad_token_id).astype(np.int32)
  return setup, params, images, ids, mask


def _scores(scorer, params, images, ids, mask, itm_batch):
  embeds, feats = scorer.embed_images(params, images_lib.padded_batches(images, batch_size=scorer.batch))
  return embeds, scorer.scores(params, embeds, feats, ids, mask, K, itm_batch_size=itm_batch)


def test_sharded_retrieval_scores_equal_one_device(setup_and_data):
  setup, params, images, ids, mask = setup_and_data
  sharded = retrieval.RetrievalScorer(setup.model, 8, sharding=setup.batch_sharding)
  assert sharded.shards == 8 and sharded.batch == 8
  embeds, (sims, i2t, t2i) = _scores(sharded, params, images, ids, mask, itm_batch=16)

  # Each device holds its shard's rows only: [1, R, L, W] of [8, R, L, W], R = 2 batches x 1 row.
  assert embeds.array.shape[:2] == (8, 2)
  assert {s.data.shape[:2] for s in embeds.array.addressable_shards} == {(1, 2)}
  assert sorted(zip(embeds.shard, embeds.row)) == sorted({(i % 8, i // 8) for i in range(N_IMAGES)})

  one_params = jax.device_put(params, jax.devices()[0])
  one = retrieval.RetrievalScorer(setup.model, 8)
  assert one.shards == 1
  _, (sims1, i2t1, t2i1) = _scores(one, one_params, images, ids, mask, itm_batch=7)
  np.testing.assert_allclose(sims, sims1, rtol=1e-5, atol=1e-5)
  # Not on an edge: every query's k-th and (k+1)-th similarities are far apart next to float-sum differences,
  # so both runs rerank the same pairs.
  for m in (sims1, sims1.T):
    ordered = -np.sort(-m, axis=1)
    assert np.min(ordered[:, K - 1] - ordered[:, K]) > 1e-4
  # The same pairs were reranked (the -100 pattern) with the same ITM + ITC scores.
  np.testing.assert_array_equal(i2t == -100, i2t1 == -100)
  np.testing.assert_array_equal(t2i == -100, t2i1 == -100)
  assert (i2t > -100).sum() == N_IMAGES * K and (t2i > -100).sum() == len(ids) * K
  np.testing.assert_allclose(i2t, i2t1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(t2i, t2i1, rtol=1e-4, atol=1e-4)


def test_the_itm_rerank_moves_no_image_embedding(setup_and_data):
  """The rerank program gathers each pair's image row on the shard that holds it: the compiled program has no
  collective over the embeddings (only the parameters' all-gathers, as in the forward pass)."""
  setup, params, images, ids, mask = setup_and_data
  scorer = retrieval.RetrievalScorer(setup.model, 8, sharding=setup.batch_sharding)
  embeds, _ = scorer.embed_images(params, images_lib.padded_batches(images, batch_size=8))
  shape = embeds.array.shape
  rows = jax.ShapeDtypeStruct((8, 2), np.int32, sharding=scorer._stacked)  # pylint: disable=protected-access
  text = jax.ShapeDtypeStruct((8, 2, ids.shape[1]), np.int32, sharding=scorer._stacked)  # pylint: disable=protected-access
  hlo = scorer._itm.lower(params, embeds.array, rows, text, text).compile().as_text()  # pylint: disable=protected-access
  rows_of_images = f"{shape[2]},{shape[3]}]"  # a collective over embedding rows has shape [..., L, W]
  collectives = [
    line
    for line in hlo.splitlines()
    if re.search(r"= .*\b(all-gather|all-to-all|all-reduce|collective-permute)\(", line)
  ]
  assert collectives, "expected the parameters' all-gathers: is the model sharded?"
  assert not [line for line in collectives if rows_of_images in line], "\n".join(collectives)
