"""The train state (student, EMA teacher, optimizer state, step) and its birth directly sharded."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from aasp_jax import sharding
from aasp_jax.train.objective import AaSPObjective


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # {'encoder', 'predictor', 'projection'}
  teacher: Any  # encoder parameters, an EMA of params['encoder'] (float32, no gradient)
  opt_state: Any


def create_state(objective: AaSPObjective, tx, rng: jax.Array) -> TrainState:
  """Boxed (logically annotated) initial state; the teacher starts as a copy of the student."""
  params = objective.init_params(rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    teacher=jax.tree.map(jnp.copy, params['encoder']),
    opt_state=tx.init(params),
  )


def abstract_state(objective: AaSPObjective, tx) -> TrainState:
  """The boxed state's shapes and logical axes, from an abstract init; nothing is allocated."""
  return jax.eval_shape(lambda r: create_state(objective, tx, r), jax.random.key(0))


def state_shardings(objective: AaSPObjective, tx, mesh, rules):
  """(abstract unboxed state, NamedShardings) from an abstract init; nothing is allocated."""
  abstract = abstract_state(objective, tx)
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(abstract, mesh, rules)
  sharding.check_divisible(abstract, shardings)
  return nn.meta.unbox(abstract), shardings


def init_state(objective: AaSPObjective, tx, rng: jax.Array, mesh, rules) -> TrainState:
  """The state born sharded: each device materialises only its own shards."""
  _, shardings = state_shardings(objective, tx, mesh, rules)
  init = jax.jit(lambda r: nn.meta.unbox(create_state(objective, tx, r)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return init(rng)
