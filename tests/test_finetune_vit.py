"""A trainable image encoder (fine-tuning, issue 15): gradients only when configured, layer-wise learning-rate
decay, stochastic depth (CPU, ~30 s)."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blip2_jax import optim
from blip2_jax import partitioning
from blip2_jax import state as state_lib
from blip2_jax.models import vit as vit_lib
from configs import stage1


def tiny_config(frozen_params=("visual_encoder/.*",), **optimizer):
  c = stage1.get_config("tiny")
  c.model.vit.depth = 3
  c.frozen_params = frozen_params
  c.optimizer.update(optimizer)
  return c


def test_the_vit_gets_gradients_and_optimizer_state_only_when_not_frozen():
  config = tiny_config(frozen_params=())
  tok = state_lib.load_tokenizer(config)
  setup = state_lib.build(config, tok, devices=jax.devices()[:1])
  state, frozen = setup.init(jax.random.PRNGKey(0))
  assert "visual_encoder" in state["params"] and setup.model.cfg.vit.trainable
  assert state["params"]["visual_encoder"]["blocks"]["fc1"]["kernel"].dtype == jnp.float32  # fp32 master weights
  assert "visual_encoder" in state["opt_state"][0][0].mu  # AdamW holds moments for the ViT too
  params = partitioning.merge(state["params"], frozen)
  s = config.data.image_size
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, s, s, 3)), jnp.uint8)

  def vit_grads(model):  # d (image features) / d (ViT parameters), through the model's own encode_image
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images, method="encode_image") ** 2))(params)
    return traverse_util.flatten_dict(grads["visual_encoder"], sep="/")

  flat = vit_grads(setup.model)
  assert all(float(jnp.abs(g).max()) > 0 for g in flat.values()), [k for k, g in flat.items() if not g.any()]
  # The pre-training configs freeze it: the same parameters through the frozen model get no gradient at all.
  frozen_cfg = state_lib.model_config(tiny_config(), tok)
  assert not frozen_cfg.vit.trainable
  flat = vit_grads(state_lib.build_module(frozen_cfg, state_lib.kind(config)))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in flat.values())  # cut by stop_gradient


def test_freezing_part_of_the_vit_is_one_clear_error():
  config = tiny_config(frozen_params=("visual_encoder/blocks/.*",))
  with pytest.raises(ValueError, match="freezes part of visual_encoder: freeze all of it"):
    state_lib.build(config, state_lib.load_tokenizer(config), devices=jax.devices()[:1])


def test_layer_decay_gives_each_vit_layer_its_documented_rate():
  depth, decay = 3, 0.5
  params = {
    "visual_encoder": {
      "patch_embed": {"kernel": jnp.ones((2, 2, 3, 4))},
      "cls_token": jnp.ones((1, 1, 4)),
      "blocks": {"fc1": {"kernel": jnp.ones((depth, 4, 8)), "bias": jnp.ones((depth, 8))}},
    },
    "ln_vision": {"scale": jnp.ones((4,))},
    "qformer": {"w": jnp.ones((4, 4))},
  }
  scales = optim.layer_decay_scales(params, decay)
  # BEiT / EVA: block i of `depth` at decay ** (depth - i), the embeddings one layer below block 0.
  np.testing.assert_allclose(scales["visual_encoder"]["blocks"]["fc1"]["kernel"][:, 0, 0], [0.125, 0.25, 0.5])
  np.testing.assert_allclose(scales["visual_encoder"]["blocks"]["fc1"]["bias"][:, 0], [0.125, 0.25, 0.5])
  assert float(scales["visual_encoder"]["patch_embed"]["kernel"]) == float(scales["visual_encoder"]["cls_token"])
  assert float(scales["visual_encoder"]["cls_token"]) == 0.0625
  assert float(scales["ln_vision"]["scale"]) == float(scales["qformer"]["w"]) == 1.0

  # Through the optimizer: the first AdamW update of each layer is the undecayed one times its scale.
  cfg = ml_collections.ConfigDict(stage1.get_config().optimizer.to_dict())
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  plain, _ = optim.make_optimizer(cfg, 100)
  cfg.vit_layer_decay = decay
  decayed, _ = optim.make_optimizer(cfg, 100)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_decayed, _ = decayed.update(grads, decayed.init(params), params)
  for path, scale in traverse_util.flatten_dict(scales).items():
    plain_leaf = traverse_util.flatten_dict(u_plain)[path]
    decayed_leaf = traverse_util.flatten_dict(u_decayed)[path]
    np.testing.assert_allclose(decayed_leaf, plain_leaf * scale, rtol=1e-6, err_msg=str(path))
  cfg.vit_layer_decay = 1.5
  with pytest.raises(ValueError, match="vit_layer_decay=1.5 is not in"):
    optim.make_optimizer(cfg, 100)


def test_drop_path_drops_whole_examples_only_in_training():
  cfg = ml_collections.ConfigDict(dict(drop_path_rate=0.5))
  y = jnp.ones((400, 3, 2))
  dropped = vit_lib.Block(cfg, deterministic=False).apply(
    {}, y, jnp.float32(0.5), method=vit_lib.Block.drop_path, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  per_example = np.asarray(dropped).reshape(400, -1)
  assert set(np.unique(per_example)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
  assert (per_example == per_example[:, :1]).all()  # a whole example at a time
  assert 150 < (per_example[:, 0] == 0).sum() < 250
  same = vit_lib.Block(cfg, deterministic=True).apply({}, y, jnp.float32(0.5), method=vit_lib.Block.drop_path)
  assert (np.asarray(same) == 1).all()

  # The whole ViT: stochastic in training, and in evaluation the same as without drop path.
  vcfg = ml_collections.ConfigDict(stage1.get_config("tiny").model.vit.to_dict())
  vcfg.depth = 3
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, vcfg.image_size, vcfg.image_size, 3)), jnp.uint8)
  params = vit_lib.VisionTransformer(vcfg).init(jax.random.PRNGKey(0), images)
  plain = vit_lib.VisionTransformer(vcfg).apply(params, images)
  vcfg.drop_path_rate = 0.5
  model = vit_lib.VisionTransformer(vcfg)
  np.testing.assert_array_equal(model.apply(params, images), plain)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  train = model.apply(params, images, deterministic=False, rngs=rngs)
  assert not np.allclose(train, plain)
