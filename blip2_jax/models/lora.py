"""LoRA adapters on the frozen LLM's projections (Hu et al. 2021, "LoRA"), as PEFT's `LoraConfig` applies them.

Config: the LLM's config (`cfg.llm`, see opt.config_from_hf / t5.config_from_hf; state.model_config copies
config.model.llm.lora onto it) may carry

  lora = dict(rank=0, alpha=16.0, dropout=0.0, targets=(...))

rank 0, or no `lora` field, is off: the model is exactly the plain one. `targets` are module names as HF and PEFT
(`target_modules`) name them: OPT `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2`; T5 `q`, `k`, `v`, `o`,
`wi_0`, `wi_1` (gated FFN, Flan-T5) or `wi` (relu FFN), `wo`. As in PEFT a name adapts every projection of that
name: T5's `q` the self-attention's and the cross-attention's, in the encoder and the decoder. A name the model
has no projection of is a ValueError naming the valid ones (`check`).

Parameters: next to the base `kernel` of an adapted projection, `lora_a` [in, rank] and `lora_b` [rank, out],
float32 (trainable master weights whatever the frozen LLM's dtype), with the logical axes (base in-axis, None) and
(None, base out-axis), so they shard like their kernel; in nn.scan-stacked layers they gain the leading "layers"
axis as every layer weight does. `lora_a` starts as PEFT's default (`init_lora_weights=True`): torch's
kaiming_uniform_(a=sqrt(5)) of the [rank, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in)); `lora_b` starts at zero,
so an adapted model starts as its base model.

Forward: base(x) + dropout(x) @ A @ B * alpha / rank, in the layer's compute dtype. The dropout (rate `dropout`,
the "dropout" rng) is on the adapter's input only, as PEFT's, and only when not deterministic (training).

Training: partitioning.split_frozen keeps every `lora_a` / `lora_b` trainable whatever config.frozen_params says,
so with stage 2's "language_model/.*" the base weights stay frozen and out of the optimizer while the adapters
are in it; optim.decay_mask gives them weight decay (they are >= 2-D weights), as HF Trainer's AdamW does for a
PEFT model. Export: `merged` / `merged_blip2` fold each adapter into its kernel (W + alpha / rank * A @ B), which is
what Blip2.save_pretrained writes.
"""

from collections.abc import Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models import layers

ADAPTER_LEAVES = ("lora_a", "lora_b")

# PEFT's default lora_A init: torch.nn.init.kaiming_uniform_(a=sqrt(5)) = U(+-sqrt(3 * gain^2 / fan_in)) with
# gain^2 = 2 / (1 + 5): variance scaling 1/3 over fan_in (axis -2 of our [in, rank]), uniform.
A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def rank(llm_cfg) -> int:
  """The adapters' rank of an LLM config; 0 (off) without a `lora` field."""
  lora = llm_cfg.get("lora")
  return int(lora.get("rank", 0)) if lora else 0


def scale(llm_cfg) -> float:
  """alpha / rank, the factor of the adapters' output."""
  return float(llm_cfg.lora.get("alpha", 16.0)) / rank(llm_cfg)


def targets(llm_cfg) -> tuple[str, ...]:
  lora = llm_cfg.get("lora")
  return tuple(lora.get("targets", ())) if lora else ()


def check(llm_cfg, valid: Sequence[str], family: str) -> None:
  """Raises ValueError for a `lora` config the model cannot build: an unknown target (naming the valid ones), a
  negative rank, a dropout outside [0, 1)."""
  lora = llm_cfg.get("lora")
  if not lora:
    return
  unknown = [t for t in targets(llm_cfg) if t not in valid]
  if unknown:
    raise ValueError(
      f"LoRA targets {unknown} (config.model.llm.lora.targets) name no projection of this {family} model; the "
      f"valid names are {', '.join(valid)}."
    )
  if rank(llm_cfg) < 0:
    raise ValueError(f"config.model.llm.lora.rank={rank(llm_cfg)} is negative (0 = no adapters).")
  if not 0.0 <= float(lora.get("dropout", 0.0)) < 1.0:
    raise ValueError(f"config.model.llm.lora.dropout={lora.get('dropout')} is not in [0, 1).")


class Dense(nn.Dense):
  """nn.Dense with an optional LoRA adapter (module docstring). rank 0: exactly nn.Dense (same parameters, same
  function). `kernel_axes`: the kernel's logical axes (in, out), which the adapters take theirs from."""

  kernel_axes: tuple[str | None, str | None] = (None, None)
  rank: int = 0
  alpha: float = 16.0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs, deterministic: bool = True):
    y = super().__call__(inputs)
    if not self.rank:
      return y
    a = self.param(
      "lora_a", layers.logical(A_INIT, (self.kernel_axes[0], None)), (inputs.shape[-1], self.rank), jnp.float32
    )
    b = self.param(
      "lora_b",
      layers.logical(nn.initializers.zeros, (None, self.kernel_axes[1])),
      (self.rank, self.features),
      jnp.float32,
    )
    x = nn.Dropout(self.dropout_rate, name="lora_dropout")(inputs, deterministic=deterministic)
    dtype = y.dtype
    h = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
    return y + h * jnp.asarray(self.alpha / self.rank, dtype)


def dense(
  features: int,
  axes: tuple[str | None, str | None],
  llm_cfg,
  target: str,
  *,
  use_bias: bool = True,
  dtype=jnp.float32,
  name: str | None = None,
) -> Dense:
  """layers.dense as a `Dense`: with an adapter when `target` (the projection's HF name) is one of llm_cfg's LoRA
  targets and the rank is positive, else the plain projection. Call it as `(x, deterministic)`."""
  on = rank(llm_cfg) > 0 and target in targets(llm_cfg)
  lora = llm_cfg.lora if on else {}
  return layers.dense(
    features,
    axes,
    use_bias=use_bias,
    dtype=dtype,
    name=name,
    module=Dense,
    kernel_axes=tuple(axes),
    rank=rank(llm_cfg) if on else 0,
    alpha=float(lora.get("alpha", 16.0)),
    dropout_rate=float(lora.get("dropout", 0.0)),
  )


def has_adapters(params) -> bool:
  return any(path[-1] in ADAPTER_LEAVES for path in traverse_util.flatten_dict(params))


def merged(params, llm_cfg):
  """The LLM's parameter tree (what lives under `language_model/` of a BLIP-2 tree) with every adapter folded into
  its base kernel, W + alpha / rank * A @ B (in float32, then cast to the kernel's dtype), and the lora_* leaves
  removed: the parameters of the plain model (llm_cfg without LoRA) computing the same function without dropout.
  The tree itself when it has no adapters. numpy leaves stay numpy (export reads host copies), others go through
  jax.numpy at full float32 precision."""
  flat = traverse_util.flatten_dict(params)
  adapted = [path[:-1] for path in flat if path[-1] == "lora_a"]
  if not adapted:
    return params
  if rank(llm_cfg) <= 0:
    raise ValueError("The LLM's parameters hold LoRA adapters but its config has none (lora.rank 0 or no lora).")
  factor = scale(llm_cfg)
  out = {path: v for path, v in flat.items() if path[-1] not in ADAPTER_LEAVES}
  for base in adapted:
    kernel, a, b = flat[base + ("kernel",)], flat[base + ("lora_a",)], flat[base + ("lora_b",)]
    if all(isinstance(x, np.ndarray) for x in (kernel, a, b)):
      delta = np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
      w = np.asarray(kernel, np.float32) + np.float32(factor) * delta
    else:
      delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
      w = kernel.astype(jnp.float32) + factor * delta
    out[base + ("kernel",)] = w.astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def merged_blip2(params, cfg):
  """`merged` on a BLIP-2 parameter tree's params["language_model"] with cfg.llm (a Blip2LLM config); the tree
  itself when it has no LLM or no adapters (stage-1 models included)."""
  if "llm" not in cfg or "language_model" not in params or not has_adapters(params["language_model"]):
    return params
  return {**params, "language_model": merged(params["language_model"], cfg.llm)}
