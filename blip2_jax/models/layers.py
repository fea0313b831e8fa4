"""Building blocks shared by the frozen ViT and the Q-Former.

Every parameter is created with logical axis names (MaxText style); `partitioning.py` maps them to mesh axes
through the rules in the config, so the model code never names a mesh axis.
"""

import contextlib
import threading
from typing import Any, ClassVar, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blip2_jax import profiling

Dtype = Any

# BERT and the ViTs initialise weights with a truncated-ish normal of std 0.02 (timm, HF BertPreTrainedModel).
default_init = nn.initializers.normal(stddev=0.02)


def logical(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(
  features: int,
  axes: tuple[str | None, str | None],
  *,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  init_std: float = 0.02,
  name: str | None = None,
  module: type[nn.Dense] = nn.Dense,
  **attributes,
) -> nn.Dense:
  """nn.Dense whose kernel carries logical axes (in_axis, out_axis) and bias (out_axis,); fp32 master weights.
  The kernel starts N(0, init_std^2). `module`: an nn.Dense subclass to build instead (lora.Dense), with its own
  fields in `attributes`."""
  return module(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=logical(nn.initializers.normal(stddev=init_std), axes),
    bias_init=logical(nn.initializers.zeros, (axes[1],)),
    name=name,
    **attributes,
  )


class LayerNorm(nn.LayerNorm):
  """nn.LayerNorm under the name scope by which a profile (blip2_jax.profiling) counts layer norms."""

  def __call__(self, x, *args, **kwargs):
    with jax.named_scope(profiling.LAYER_NORM_SCOPE):
      return super().__call__(x, *args, **kwargs)


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm computed and returned in float32 whatever the activation dtype (bf16 statistics drift)."""
  return LayerNorm(
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scale_init=logical(nn.initializers.ones, ("norm",)),
    bias_init=logical(nn.initializers.zeros, ("norm",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """RMS LayerNorm (T5's LayerNorm, LLaMA's RMSNorm): x / rms(x) * scale, no mean subtraction and no bias;
  computed and returned in float32 whatever the activation dtype."""

  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
    with jax.named_scope(profiling.LAYER_NORM_SCOPE):
      x = x.astype(jnp.float32)
      x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
      return x * scale


def gelu(x):
  # Exact (erf) GELU: both EVA-ViT-g and BERT use it; the tanh approximation is a different function.
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  # CLIP ViT-L's activation.
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


# Recomputation of a scanned layer in the backward pass (the frozen ViT, OPT and T5 share them): "full" saves
# nothing, the others keep the matmul outputs ("dots_no_batch": those without batch dims); "none" is no remat.
REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str, where: str) -> None:
  if policy != "none" and policy not in REMAT_POLICIES:
    raise ValueError(f"{where}={policy!r} is not one of {['none', *REMAT_POLICIES]}.")


def remat(block, policy: str, static_argnums: tuple[int, ...] = ()):
  """The module class `block` rematerialised per `policy` (a REMAT_POLICIES key, or "none": unchanged).
  static_argnums: the positions of `block.__call__`'s Python arguments (a `deterministic` flag), self being 0."""
  if policy == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=False, static_argnums=static_argnums)


def unstack(stacked) -> list:
  """A tree of nn.scan-stacked parameters [layers, ...] as one tree per layer (for unrolled decoding steps)."""
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(jax.tree.leaves(stacked)[0].shape[0])]


def split_layers(params) -> list:
  """A decoder-only LLM's scanned layers' parameters [layers, ...] (LoRA adapters included) as one tree per layer,
  for its model file's `decode_step`."""
  return unstack(params["layers"])


def split_cache(cache) -> list:
  """A decoder-only LLM's KV cache {"k", "v"} [B, layers, S, heads, Dh] as one {"k", "v"} [B, S, heads, Dh] per
  layer."""
  return [{"k": cache["k"][:, i], "v": cache["v"][:, i]} for i in range(cache["k"].shape[1])]


class CausalLMDecoder(struct.PyTreeNode):
  """A decoder-only LLM (OPT, the LLaMA family) decoding from a prefix of embeddings (queries + left-padded prompt),
  for blip2_jax.generation. A model file subclasses it with two of its functions as static methods:
  `init_cache(cfg, batch, slots, dtype)` (its KV cache [B, layers, S, heads, Dh]) and `decode_step(module, params,
  layer_params, embeds, mask, positions, caches, index)` (its layers unrolled).

  state: {"cache": one KV cache per layer, "mask": [N, S] valid cache slots, "position": [N] next position,
  "index": [N] next cache slot (the same in every row)}. Positions count real tokens only (HF: cumsum(mask) - 1),
  so left padding shifts nothing. The prefill runs the scanned layers; each step runs them unrolled on
  `layer_params`, the layers' weights split once per generate call (a second copy of the LLM's layer weights while
  generating)."""

  module: Any = struct.field(pytree_node=False)
  params: Any
  layer_params: Any
  start_ids: ClassVar[tuple[int, ...]] = ()  # nothing precedes the prompt in HF's input_ids

  @classmethod
  def create(cls, module, params):
    return cls(frozen_config(module), params, split_layers(params))

  def prefill(self, prefix_embeds, prefix_mask, max_new_tokens: int):
    """The prefix through the scanned layers into a fresh KV cache: the last position's logits and the state."""
    b, p, _ = prefix_embeds.shape
    # The last generated token is never fed back, so the cache needs one slot fewer than prefix + new tokens.
    slots = p + max_new_tokens - 1
    cache = self.init_cache(self.module.cfg, b, slots, jnp.dtype(self.module.cfg.dtype))
    real = prefix_mask.astype(jnp.int32)
    mask = jnp.zeros((b, slots), jnp.int32).at[:, :p].set(real)
    positions = jnp.cumsum(real, axis=1) * real - 1
    logits, cache = self.module.apply(
      {"params": self.params}, prefix_embeds, mask, positions=positions, cache=cache, cache_index=0
    )
    state = {
      "cache": split_cache(cache),
      "mask": mask,
      "position": real.sum(axis=1),
      "index": jnp.full((b,), p, jnp.int32),
    }
    return logits[:, -1], state

  def step(self, tokens, state):
    """One token per row through the unrolled layers: the logits [N, V] and the next state."""
    index = state["index"][0]
    mask = jax.lax.dynamic_update_slice(state["mask"], jnp.ones((tokens.shape[0], 1), jnp.int32), (0, index))
    embeds = self.module.apply({"params": self.params}, tokens[:, None], method="embed")
    logits, cache = self.decode_step(
      self.module, self.params, self.layer_params, embeds, mask, state["position"][:, None], state["cache"], index
    )
    state = {"cache": cache, "mask": mask, "position": state["position"] + 1, "index": state["index"] + 1}
    return logits[:, 0], state


# Where attention runs: "xla" (einsums and a float32 softmax, any backend), "cudnn" (jax.nn.dot_product_attention's
# fused cuDNN kernel: NVIDIA GPUs, 16-bit inputs) or "tpu_flash" (the Pallas flash-attention kernel for TPUs,
# jax.experimental.pallas.ops.tpu.flash_attention). The config names them per place: model.vit.attention,
# model.qformer.attention, model.llm.attention.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "tpu_flash")
# The Pallas TPU kernel's sequence blocks. Keys are padded to a multiple (and masked); queries that are not a
# multiple are one block if at most TPU_FLASH_MAX_WHOLE long (the ViT's 257 tokens, a Q-Former's 32 + text), else
# padded too (and dropped).
TPU_FLASH_BLOCK = 128
TPU_FLASH_MAX_WHOLE = 512
# What a masked logit becomes in the TPU kernel (added to the logits): large and finite.
_TPU_MASKED = -1e30


def cudnn_attention_available(dtype, platform: str | None = None) -> bool:
  """Whether `attention(..., implementation="cudnn")` can run on `platform` (default: JAX's default backend) on
  inputs of `dtype`: an NVIDIA GPU, 16 bits."""
  return (platform or jax.default_backend()) == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def tpu_interpret_mode() -> bool:
  """Whether Pallas TPU kernels run in interpret mode here (jax.experimental.pallas.tpu.force_tpu_interpret_mode,
  as the tests use on a CPU)."""
  from jax._src import config  # pylint: disable=import-outside-toplevel

  flag = getattr(config, "pallas_tpu_interpret_mode_context_manager", None)
  return flag is not None and flag.value is not None


def check_attention(implementation: str, dtype, where: str, platform: str | None = None) -> None:
  """One error if `implementation` (the config value `where`) is unknown or cannot run with inputs of `dtype` on
  `platform`, the mesh's devices' platform (state.build). Without a platform (inside the models) 'cudnn' is checked
  against JAX's default backend and 'tpu_flash' not at all: compile-only TPU devices (blip2_jax.compile) sit under
  a CPU backend."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"{where}={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  if implementation == "cudnn" and not cudnn_attention_available(dtype, platform):
    raise ValueError(
      f"{where}='cudnn' needs an NVIDIA GPU and a bfloat16 or float16 compute dtype; this run has backend "
      f"{platform or jax.default_backend()!r} and dtype {jnp.dtype(dtype)}. Use 'xla'."
    )
  if implementation == "tpu_flash" and platform not in (None, "tpu") and not tpu_interpret_mode():
    raise ValueError(f"{where}='tpu_flash' is a Pallas kernel for TPUs; this run has backend {platform!r}. Use 'xla'.")


def attention(
  q, k, v, mask=None, *, dropout_rate=0.0, deterministic=True, dropout_rng=None, implementation: str = "xla"
):
  """Multi-head scaled dot-product attention.

  q: [B, Lq, H, Dh]; k, v: [B, Lk, G, Dh] with G dividing H (grouped-query attention: query head i reads key/value
  head i // (H / G)); mask: bool, broadcastable to [B, H, Lq, Lk], True = may attend. A query row with no key to
  attend to (a padding token's) has a finite output that no caller may read: XLA's path averages all values, the
  kernels may differ. The output [B, Lq, H, Dh] has q's dtype.
  implementation (ATTENTION_IMPLEMENTATIONS): "xla" (below: softmax in float32; the only one with attention
  dropout), "cudnn" or "tpu_flash" (fused kernels: the same function to rounding; tests/test_attention.py).
  """
  with jax.named_scope(profiling.ATTENTION_SCOPE):  # the profile's attention category
    return _attention(q, k, v, mask, dropout_rate, deterministic, dropout_rng, implementation)


def _attention(q, k, v, mask, dropout_rate, deterministic, dropout_rng, implementation):
  if implementation != "xla":
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"attention implementation {implementation!r} has no attention dropout; use 'xla' there.")
    if implementation == "cudnn":
      return dot_product_attention(q, k, v, mask, "cudnn")
    if implementation == "tpu_flash":
      return tpu_flash_attention(q, k, v, mask)
    raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _repeat_kv(x, heads: int):
  """[B, L, G, Dh] -> [B, L, heads, Dh], each key/value head repeated for its heads // G query heads."""
  return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


def dot_product_attention(q, k, v, mask, implementation: str = "cudnn"):
  """`attention` through jax.nn.dot_product_attention: implementation "cudnn" is its fused cuDNN kernel (an
  NVIDIA GPU, 16-bit inputs; the mask becomes an additive bias), "xla" its reference (the tests' stand-in for the
  kernel on a CPU: the same arguments)."""
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _tpu_blocks(length: int, whole_up_to: int) -> tuple[int, int]:
  """(block, padded length) of a sequence for the TPU kernel: TPU_FLASH_BLOCK blocks (padding to a multiple), or
  the whole sequence as one block when it is at most `whole_up_to` long."""
  if length % TPU_FLASH_BLOCK and length <= whole_up_to:
    return length, length
  return TPU_FLASH_BLOCK, -(-length // TPU_FLASH_BLOCK) * TPU_FLASH_BLOCK


_KERNEL_MESH = threading.local()


@contextlib.contextmanager
def kernel_mesh(mesh, batch_axes=None, head_axes=None):
  """While a program that runs on `mesh` is traced: where its activations' batch and head dimensions are split
  (mesh axis names, as the sharding rules 'batch' and 'heads' give them). The Pallas TPU kernel cannot be split by
  XLA's partitioner, so tpu_flash_attention runs it per shard (shard_map) over these axes."""
  previous = getattr(_KERNEL_MESH, "value", None)
  _KERNEL_MESH.value = (mesh, batch_axes, head_axes)
  try:
    yield
  finally:
    _KERNEL_MESH.value = previous


def tpu_flash_attention(q, k, v, mask):
  """`attention` through the Pallas flash-attention kernel for TPUs (its forward and backward kernels). Key/value
  heads are repeated per query head; a mask becomes an additive float32 bias [B, H, Lq, Lk]; keys are padded to
  whole TPU_FLASH_BLOCK blocks (and masked), queries too when long (and dropped) (_tpu_blocks).

  On a mesh of several devices the kernel runs per shard of the batch and heads, as kernel_mesh declares them;
  a program traced without that declaration (an evaluation helper, parameter init) on a process with several
  devices takes XLA's path instead, which the partitioner can split."""
  k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
  visible = None
  if mask is not None:
    visible = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  declared = getattr(_KERNEL_MESH, "value", None)
  if declared is None or declared[0].size == 1:
    if declared is None and jax.device_count() > 1:
      return attention(q, k, v, visible)
    return _tpu_flash(q, k, v, visible)
  mesh, batch, heads = declared
  spec = jax.sharding.PartitionSpec(batch, None, heads, None)
  specs = (spec, spec, spec) + (() if visible is None else (jax.sharding.PartitionSpec(batch, heads, None, None),))
  return jax.shard_map(_tpu_flash, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(
    q, k, v, *(() if visible is None else (visible,))
  )


def _tpu_flash(q, k, v, mask=None):
  """tpu_flash_attention on one device's shard: q, k, v [B, L, H, Dh], mask None or [B, H, Lq, Lk]."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=import-outside-toplevel

  b, lq, h, _ = q.shape
  lk = k.shape[1]
  block_q, pad_q = _tpu_blocks(lq, TPU_FLASH_MAX_WHOLE)
  block_k, pad_k = _tpu_blocks(lk, 0)  # the backward kernel wants whole blocks of keys
  bias = None
  if mask is not None or pad_k != lk:
    visible = jnp.broadcast_to(True if mask is None else mask, (b, h, lq, lk))
    # A row that may see no key (a padding token's) sees them all instead: the kernel's output for a row without
    # a key is not defined (NaN in interpret mode), and a NaN there would reach the real rows of later layers.
    # So do padded queries, whose rows are dropped; padded keys are masked.
    visible = visible | ~jnp.any(visible, axis=-1, keepdims=True)
    visible = jnp.pad(visible, ((0, 0), (0, 0), (0, pad_q - lq), (0, 0)), constant_values=True)
    visible = jnp.pad(visible, ((0, 0), (0, 0), (0, 0), (0, pad_k - lk)), constant_values=False)
    bias = jnp.where(visible, 0.0, _TPU_MASKED).astype(jnp.float32)
  heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  sizes = dict(block_b=1, block_q=block_q, block_q_major_dkv=block_q, block_q_dkv=block_q, block_q_dq=block_q)
  sizes.update(block_k_major=block_k, block_k=block_k, block_k_major_dkv=block_k, block_k_dkv=block_k)
  sizes.update(block_k_major_dq=block_k, block_k_dq=block_k)
  out = fa.flash_attention(
    heads_first(q, pad_q),
    heads_first(k, pad_k),
    heads_first(v, pad_k),
    ab=bias,
    sm_scale=q.shape[-1] ** -0.5,
    block_sizes=fa.BlockSizes(**sizes),
  )
  return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


def frozen_config(module: nn.Module) -> nn.Module:
  """The module with its config frozen: jit takes the module as static data, which must be hashable."""
  return module.clone(cfg=ml_collections.FrozenConfigDict(module.cfg))
