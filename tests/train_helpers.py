"""Small AaSP train-step setups shared by the train-step tests."""

import jax
import jax.numpy as jnp

from aasp_jax import configuration, sharding
from aasp_jax.train import objective as objective_lib
from aasp_jax.train import optimizer, state as state_lib, step as step_lib

TINY = [
  'model.dtype=float32',
  'model.depth=2',
  'model.width=32',
  'model.num_heads=2',
  'model.mlp_dim=64',
  'model.aape.num_modes=2',
  'model.predictor.width=16',
  'model.predictor.num_heads=2',
  'model.predictor.cnn_groups=4',
  'model.predictor.cnn_layers=2',
  'objective.top_k_layers=2',
  'objective.num_clones=3',
  'objective.projection_hidden=16',
  'objective.projection_dim=8',
  'global_batch=4',
  'total_steps=50',
  'mesh.data=1',
]


def setup(arg='', overrides=(), devices=None):
  """(cfg, objective, tx, schedule, mesh, state, compiled step, batch) for a tiny CPU model."""
  cfg = configuration.load_config(
    f'configs/pretrain.py:variant=tiny,target_length=64{"," + arg if arg else ""}',
    [*TINY, *overrides],
  )
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  mesh = sharding.make_mesh(cfg.mesh, devices or jax.devices()[:1])
  rules = cfg.logical_axis_rules
  state = state_lib.init_state(objective, tx, jax.random.key(0), mesh, rules)
  batch = make_batch(cfg, objective)
  return cfg, objective, tx, schedule, mesh, state, batch


def make_batch(cfg, objective, seed=1):
  p = objective.preset
  samples = p.window_length + (p.target_length - 1) * p.frame_shift
  wave = 0.1 * jax.random.normal(jax.random.key(seed), (cfg.global_batch, samples))
  return {'waveform': wave, 'num_samples': jnp.full((cfg.global_batch,), samples, jnp.int32)}


def compile_for(cfg, objective, tx, schedule, mesh, batch):
  _, shardings = state_lib.state_shardings(objective, tx, mesh, cfg.logical_axis_rules)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  return step_lib.compile_step(
    objective, tx, schedule, cfg.optimizer, mesh, cfg.logical_axis_rules, shardings, abstract
  )
