"""Mesh construction and logical-to-mesh sharding, from the config.

Model code names logical axes only; this module maps them to the mesh ('data', 'fsdp', 'tensor') with
the config's rule table, and checks, before anything compiles, that the batch and the sharded
dimensions divide the mesh.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg: ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one -1 entry (if any) so the product equals the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f'At most one mesh axis may be -1; got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'Mesh axis sizes must be positive or -1; got {dict(zip(MESH_AXES, sizes))}.')
  if fill:
    if num_devices % known:
      raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}.'
      )
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but '
      f'{num_devices} are available; change config.mesh.'
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (GSPMD propagates the shardings)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % shards:
    raise ValueError(
      f'global_batch={global_batch} is not divisible by the {shards} batch shards of the mesh '
      f'(data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]}); change global_batch or '
      'config.mesh.'
    )


def logical_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of abstract values that carry logical-axis metadata."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings) -> None:
  """Every sharded dimension must divide by its mesh axes; names the parameter otherwise."""
  flat_values = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_tree))[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, value), sharding in zip(flat_values, flat_shardings):
    for dim, axes in zip(value.shape, tuple(sharding.spec) + (None,) * value.ndim):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if dim % size:
        raise ValueError(
          f'{jax.tree_util.keystr(path)} has shape {value.shape}; dimension {dim} is sharded over '
          f'{axes} ({size} devices) and does not divide. Change config.mesh or the model size.'
        )
