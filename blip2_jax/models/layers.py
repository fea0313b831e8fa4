"""Building blocks shared by the frozen ViT and the Q-Former.

Every parameter is created with logical axis names (MaxText style); `partitioning.py` maps them to mesh axes
through the rules in the config, so the model code never names a mesh axis.
"""

from typing import Any, ClassVar, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm computed and returned in float32 whatever the activation dtype (bf16 statistics drift)."""
  return nn.LayerNorm(
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


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def cudnn_attention_available(dtype) -> bool:
  """Whether `attention(..., implementation="cudnn")` can run here on inputs of `dtype`: an NVIDIA GPU, 16 bits."""
  return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def attention(
  q, k, v, mask=None, *, dropout_rate=0.0, deterministic=True, dropout_rng=None, implementation: str = "xla"
):
  """Multi-head scaled dot-product attention.

  q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; mask: bool, broadcastable to [B, H, Lq, Lk], True = may attend.
  Softmax runs in float32; the output has q's dtype.
  implementation: "xla" (below, any backend) or "cudnn" (jax.nn.dot_product_attention's fused cuDNN kernel: an
  NVIDIA GPU, bfloat16/float16 inputs, no mask or dropout; used by the frozen ViT, `model.vit.attention`).
  """
  if implementation == "cudnn":
    if mask is not None or (dropout_rate > 0.0 and not deterministic):
      raise ValueError("attention implementation 'cudnn' is used here without a mask or dropout only.")
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def frozen_config(module: nn.Module) -> nn.Module:
  """The module with its config frozen: jit takes the module as static data, which must be hashable."""
  return module.clone(cfg=ml_collections.FrozenConfigDict(module.cfg))
