"""Mesh shapes from the config and the early, named errors for batches and parameters that don't
divide the mesh. Abstract meshes only: nothing here needs more than one device."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType
from ml_collections import ConfigDict

from aasp_jax import configuration, sharding
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer
from aasp_jax.train import state as state_lib

RULES = (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'))


def _mesh_cfg(data, fsdp, tensor):
  return ConfigDict({'data': data, 'fsdp': fsdp, 'tensor': tensor})


def _abstract_mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize(
  'sizes, num_devices, expected',
  [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((-1, 2, 1), 8, (4, 2, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 2, -1), 8, (1, 2, 4)),
    ((4, 2, 1), 8, (4, 2, 1)),
    ((-1, 1, 1), 1, (1, 1, 1)),
  ],
)
def test_mesh_shape_fills_the_minus_one(sizes, num_devices, expected):
  assert sharding.mesh_shape(_mesh_cfg(*sizes), num_devices) == expected


def test_the_default_mesh_config_is_pure_data_parallel():
  cfg = configuration.load_config('configs/pretrain.py:variant=tiny,target_length=64')
  assert sharding.mesh_shape(cfg.mesh, 8) == (8, 1, 1)


def test_mesh_shape_rejects_two_minus_ones():
  with pytest.raises(ValueError, match='At most one mesh axis may be -1'):
    sharding.mesh_shape(_mesh_cfg(-1, -1, 1), 8)


@pytest.mark.parametrize('sizes', [(0, 1, 1), (-2, 1, 4), (2, 0, -1)])
def test_mesh_shape_rejects_non_positive_sizes(sizes):
  with pytest.raises(ValueError, match='positive or -1'):
    sharding.mesh_shape(_mesh_cfg(*sizes), 8)


def test_mesh_shape_rejects_a_device_count_the_fixed_axes_do_not_divide():
  with pytest.raises(ValueError, match='6 devices are not divisible by 4') as err:
    sharding.mesh_shape(_mesh_cfg(-1, 2, 2), 6)
  assert "'fsdp': 2" in str(err.value) and "'tensor': 2" in str(err.value)  # names the mesh


@pytest.mark.parametrize('sizes, num_devices', [((4, 1, 1), 8), ((2, 2, 4), 8), ((8, 1, 1), 1)])
def test_mesh_shape_rejects_a_product_other_than_the_device_count(sizes, num_devices):
  data, fsdp, tensor = sizes
  message = (
    f"mesh {{'data': {data}, 'fsdp': {fsdp}, 'tensor': {tensor}}} needs {data * fsdp * tensor} "
    f'devices, but {num_devices} are available; change config.mesh.'
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.mesh_shape(_mesh_cfg(*sizes), num_devices)


def test_make_mesh_on_one_device():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1), jax.devices()[:1])
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 2 devices'):
    sharding.make_mesh(_mesh_cfg(1, 2, 1), jax.devices()[:1])


@pytest.mark.parametrize('sizes, global_batch', [((4, 2, 1), 8), ((2, 2, 2), 4), ((1, 8, 1), 16)])
def test_check_batch_accepts_batches_that_divide_the_batch_shards(sizes, global_batch):
  sharding.check_batch(global_batch, _abstract_mesh(*sizes))  # tensor is not a batch axis


def test_check_batch_names_global_batch_and_the_mesh():
  with pytest.raises(ValueError) as err:
    sharding.check_batch(12, _abstract_mesh(4, 2, 1))
  message = str(err.value)
  assert 'global_batch=12' in message
  assert '8 batch shards' in message
  assert 'data=4 x fsdp=2' in message
  assert 'config.mesh' in message


class _TwoLayers(nn.Module):
  """A width -> mlp -> width MLP with logically annotated kernels."""

  width: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(self.mlp, kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')))(x)
    return nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')))(x)


def _abstract_two_layers(width, mlp):
  module = _TwoLayers(width, mlp)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, width))))


def test_check_divisible_accepts_dimensions_that_divide():
  abstract = _abstract_two_layers(64, 128)
  mesh = _abstract_mesh(1, 8, 2)
  with nn.logical_axis_rules(RULES):
    shardings = sharding.logical_shardings(abstract, mesh, RULES)
  assert tuple(shardings['params']['Dense_0']['kernel'].spec) == ('fsdp', 'tensor')
  assert tuple(shardings['params']['Dense_1']['kernel'].spec) == ('tensor', 'fsdp')
  sharding.check_divisible(abstract, shardings)


@pytest.mark.parametrize(
  'width, mlp, sizes, name, dim, axis',
  [
    (60, 128, (1, 8, 1), "['params']['Dense_0']['kernel']", 60, 'fsdp'),
    (64, 30, (1, 2, 4), "['params']['Dense_0']['kernel']", 30, 'tensor'),
  ],
)
def test_check_divisible_names_the_parameter(width, mlp, sizes, name, dim, axis):
  abstract = _abstract_two_layers(width, mlp)
  mesh = _abstract_mesh(*sizes)
  with nn.logical_axis_rules(RULES):
    shardings = sharding.logical_shardings(abstract, mesh, RULES)
  with pytest.raises(ValueError) as err:
    sharding.check_divisible(abstract, shardings)
  message = str(err.value)
  assert message.startswith(name)
  assert f'dimension {dim} is sharded over {(axis,)!r}' in message
  assert 'Change config.mesh or the model size' in message


def test_state_shardings_of_the_real_objective_name_an_indivisible_width():
  """The tiny AaSP model with width 60 can't be split over fsdp=8: the error names a parameter."""
  cfg = configuration.load_config(
    'configs/pretrain.py:variant=tiny,target_length=64',
    ['model.width=60', 'model.num_heads=4', 'model.depth=1', 'objective.top_k_layers=1'],
  )
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, _ = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  with pytest.raises(ValueError, match=r"\['encoder'\].*dimension 60 is sharded over \('fsdp',\)"):
    state_lib.state_shardings(objective, tx, _abstract_mesh(1, 8, 1), cfg.logical_axis_rules)
  # On a pure data-parallel mesh nothing is split, so the same model is fine.
  abstract, shardings = state_lib.state_shardings(
    objective, tx, _abstract_mesh(8, 1, 1), cfg.logical_axis_rules
  )
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  assert jax.tree.structure(abstract) == jax.tree.structure(shardings)
