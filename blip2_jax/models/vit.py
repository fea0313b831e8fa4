"""The frozen image encoder: EVA-CLIP ViT as BLIP-2 uses it (LAVIS `eva_vit.py`, HF `Blip2VisionModel`).

Pre-norm blocks, fused qkv with biases on q and v only, exact GELU, no layer-scale and no final norm: the
features leave the last block raw and `ln_vision` (owned by the BLIP-2 model, trainable) normalises them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip2_jax.models import layers


def _torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch's bicubic resize (align_corners=False, A=-0.75, clamped borders).

  jax.image.resize uses Keys' A=-0.5 kernel; the checkpoints were fine-tuned at 364px with torch's kernel, so
  we reproduce it exactly.
  """
  a = -0.75

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += cubic(k - t)
  return m


def interpolate_pos_embed(pos_embed, grid: int):
  """Resizes [1, 1 + g*g, D] position embeddings ([CLS] first) to a grid x grid patch grid, bicubically."""
  old = int(round((pos_embed.shape[1] - 1) ** 0.5))
  if old == grid:
    return pos_embed
  w = jnp.asarray(_torch_bicubic_matrix(old, grid), jnp.float32)
  patches = pos_embed[0, 1:].reshape(old, old, -1).astype(jnp.float32)
  patches = jnp.einsum("ih,hwd,jw->ijd", w, patches, w).reshape(1, grid * grid, -1)
  return jnp.concatenate([pos_embed[:, :1], patches.astype(pos_embed.dtype)], axis=1)


def sincos_pos_embed_init(key, shape, dtype=jnp.float32):
  """[1, 1 + g*g, D] fixed 2-D sin-cos position embeddings (MAE), [CLS] row zero.

  Used only for a randomly initialised ViT (the demo): random N(0, 0.02) rows carry almost no position signal
  next to the patch content, and a frozen random tower never learns one. Real checkpoints overwrite it."""
  del key
  _, n, d = shape
  g = int(round((n - 1) ** 0.5))
  omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d // 4))
  ys, xs = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64), indexing="ij")
  parts = []
  for coord in (ys.reshape(-1), xs.reshape(-1)):
    angles = np.outer(coord, omega)
    parts += [np.sin(angles), np.cos(angles)]
  table = np.zeros((n, d), np.float64)
  table[1:, : 4 * (d // 4)] = np.concatenate(parts, axis=1)
  return jnp.asarray(table[None], dtype)


class Attention(nn.Module):
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, n, d = x.shape
    heads = cfg.num_heads
    qkv = layers.dense(3 * d, ("vit_embed", "heads"), use_bias=False, dtype=cfg.dtype, name="qkv")(x)
    # LAVIS: bias = cat(q_bias, zeros, v_bias); the key has no bias at all.
    q_bias = self.param("q_bias", layers.logical(nn.initializers.zeros, ("heads",)), (d,), jnp.float32)
    v_bias = self.param("v_bias", layers.logical(nn.initializers.zeros, ("heads",)), (d,), jnp.float32)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = (q + q_bias.astype(q.dtype)).reshape(b, n, heads, d // heads)
    k = k.reshape(b, n, heads, d // heads)
    v = (v + v_bias.astype(v.dtype)).reshape(b, n, heads, d // heads)
    impl = cfg.get("attention", "xla")
    layers.check_attention(impl, q.dtype, "model.vit.attention")
    out = layers.attention(q, k, v, implementation=impl).reshape(b, n, d)
    return layers.dense(d, ("heads", "vit_embed"), dtype=cfg.dtype, name="proj")(out)


class Block(nn.Module):
  """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))). A scan body: (x, this block's drop-path
  rate) -> (x, None)."""

  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, drop_rate=None):
    cfg = self.cfg
    x = x + self.drop_path(
      Attention(cfg, name="attn")(layers.layer_norm(cfg.layer_norm_eps, name="norm1")(x)), drop_rate
    )
    h = layers.layer_norm(cfg.layer_norm_eps, name="norm2")(x)
    h = layers.dense(cfg.mlp_dim, ("vit_embed", "mlp"), dtype=cfg.dtype, name="fc1")(h)
    h = layers.ACTIVATIONS[cfg.act](h)
    h = layers.dense(x.shape[-1], ("mlp", "vit_embed"), dtype=cfg.dtype, name="fc2")(h)
    return x + self.drop_path(h, drop_rate), None

  def drop_path(self, y, rate):
    """Stochastic depth (timm's DropPath, as EVA and LAVIS train the ViT): the residual branch of each example is
    dropped with probability `rate`, the kept ones scaled by 1 / (1 - rate). Identity when deterministic."""
    if self.deterministic or rate is None or not self.cfg.get("drop_path_rate", 0.0):
      return y
    keep = 1.0 - rate
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(kept, y / keep.astype(y.dtype), jnp.zeros_like(y))


# CLIP's normalisation, which EVA-CLIP and hence BLIP-2 use (pixel values in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images):
  """uint8 pixels [..., 3] -> CLIP-normalised float32; float input is taken as normalised already."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  mean, std = jnp.asarray(CLIP_MEAN, jnp.float32), jnp.asarray(CLIP_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


class VisionTransformer(nn.Module):
  """images [B, S, S, 3] -> features [B, 1 + (S/p)^2, width] before ln_vision.

  `images` are CLIP-normalised floats, or uint8 pixels, which are normalised here on the accelerator (the
  training pipeline sends uint8: a quarter of the bytes, and no normalisation work on the host's cores).

  cfg: image_size, patch_size, width, depth, num_heads, mlp_dim, layer_norm_eps, act, dtype, and optionally
  attention ("xla", the default, or "cudnn": cuDNN's fused kernel on an NVIDIA GPU in bfloat16), remat_policy
  ("none", the default, or one of layers.REMAT_POLICIES: what a block keeps for a backward pass through the ViT)
  and drop_path_rate (stochastic depth when the ViT trains, rising linearly from 0 at the first block to the rate
  at the last, as timm / EVA; 0, the default, is off; it needs a "dropout" rng and deterministic=False).

  The `depth` blocks are one nn.scan: their parameters `blocks/...` are stacked on a leading "layers" axis, and
  XLA compiles one block, not `depth` copies.
  """

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.width
    if images.shape[1] % p or images.shape[2] != images.shape[1]:
      raise ValueError(
        f"ViT input must be square with a side divisible by the patch size {p}; got images of shape {images.shape}."
      )
    x = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      kernel_init=layers.logical(layers.default_init, (None, None, None, "vit_embed")),
      bias_init=layers.logical(nn.initializers.zeros, ("vit_embed",)),
      name="patch_embed",
    )(normalize_pixels(images).astype(cfg.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = self.param(
      "cls_token", layers.logical(layers.default_init, (None, None, "vit_embed")), (1, 1, d), jnp.float32
    )
    n_pos = (cfg.image_size // p) ** 2 + 1
    pos = self.param(
      "pos_embed", layers.logical(sincos_pos_embed_init, (None, None, "vit_embed")), (1, n_pos, d), jnp.float32
    )
    # [CLS] first, then the position embeddings are added to all tokens (EVA / LAVIS order).
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + interpolate_pos_embed(pos, gh).astype(x.dtype)
    policy = cfg.get("remat_policy", "none")
    layers.check_remat_policy(policy, "model.vit.remat_policy")
    blocks = nn.scan(
      layers.remat(Block, policy),
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      length=cfg.depth,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    drop_rates = jnp.linspace(0.0, cfg.get("drop_path_rate", 0.0), cfg.depth, dtype=jnp.float32)
    x, _ = blocks(cfg, deterministic, name="blocks")(x, drop_rates)
    return x
