"""Mesh, logical-axis rules and shardings (MaxText style).

The model names every weight's axes logically ("embed", "mlp", "heads", "vocab", "vit_embed", "norm", ...);
`config.sharding.rules` maps those names to mesh axes. The mesh comes from `config.sharding.mesh`, an ordered
mapping of axis name -> size where one size may be -1 ("whatever devices are left").
"""

import re
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.experimental.mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np


def make_mesh(mesh_shape: dict[str, int], devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  names, sizes = list(mesh_shape.keys()), list(mesh_shape.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"config.sharding.mesh {dict(mesh_shape)}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if devices.size % known:
    raise ValueError(f"config.sharding.mesh {dict(mesh_shape)} does not divide the {devices.size} devices.")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(
      f"config.sharding.mesh {dict(zip(names, sizes))} uses {int(np.prod(sizes))} devices, "
      f"but {devices.size} are available."
    )
  # create_device_mesh lays the axes out along the physical interconnect where it knows the topology.
  try:
    arranged = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=list(devices.flat))
  except Exception:  # pylint: disable=broad-except  (unknown topologies, fake CPU devices)
    arranged = devices.reshape(sizes)
  return Mesh(arranged, names)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (tiny test models, odd vocab sizes)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree of (abstract) boxed parameters created with logical axis names."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
    mesh_specs,
    shapes,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Leading (batch) dimension split over the mesh axes that the 'batch' rule names."""
  axes = dict(rules).get("batch")
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Last path components of parameters that config.frozen_params never freezes: LoRA adapters (models/lora.py).
ALWAYS_TRAINABLE = ("lora_a", "lora_b")


def split_frozen(params: dict, patterns, sep: str = "/") -> tuple[dict, dict]:
  """Splits a nested param dict into (trainable, frozen) by regexes over 'a/b/c' paths (big_vision style).

  A parameter whose last path component is in ALWAYS_TRAINABLE (`lora_a`, `lora_b`: the LoRA adapters of the
  frozen LLM, models/lora.py) is trainable whatever the patterns say, so stage 2's "language_model/.*" freezes
  the LLM's base weights but not its adapters (which exist only when configured). Every pattern must match at
  least one parameter: a pattern that matches nothing is a config error."""
  flat = traverse_util.flatten_dict(params, sep=sep)
  used = {p: False for p in patterns}
  trainable, frozen = {}, {}
  for path, value in flat.items():
    if path.rsplit(sep, 1)[-1] in ALWAYS_TRAINABLE:
      trainable[path] = value
      continue
    hit = [p for p in patterns if re.fullmatch(p, path)]
    for p in hit:
      used[p] = True
    (frozen if hit else trainable)[path] = value
  unused = [p for p, u in used.items() if not u]
  if unused:
    raise ValueError(
      f"config.frozen_params pattern(s) {unused} match no parameter; parameter paths look like {next(iter(flat))!r}."
    )
  return (traverse_util.unflatten_dict(trainable, sep=sep), traverse_util.unflatten_dict(frozen, sep=sep))


def merge(trainable: dict, frozen: dict, sep: str = "/") -> dict:
  """Inverse of split_frozen: one param tree for model.apply."""
  flat = traverse_util.flatten_dict(trainable, sep=sep)
  flat.update(traverse_util.flatten_dict(frozen, sep=sep))
  return traverse_util.unflatten_dict(flat, sep=sep)


def from_host(array, sharding: NamedSharding) -> jax.Array:
  """A numpy array that every process holds whole -> the global array on `sharding`; each process transfers only
  the shards of its own devices (the inverse of host_copy)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def batch_shards(sharding: NamedSharding) -> int:
  """How many ways `sharding` splits an array's leading (batch) axis."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def host_copy(tree):
  """Full numpy copies of (possibly multi-host sharded) arrays, on every process. An array this process holds
  whole (one process, or replicated on its devices) is copied as it is; another is gathered from all processes
  (all of them must call this)."""

  def copy(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(copy, tree)
