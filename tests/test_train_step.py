"""The AaSP train step on one device: structure (teacher once), EMA, gradients, ablations, jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helpers
from aasp_jax import masking
from aasp_jax.train import optimizer, step as step_lib


@pytest.fixture(scope='module')
def tiny():
  return train_helpers.setup()


def plain_step(cfg, objective, tx, schedule):
  return functools.partial(
    step_lib.train_step, objective=objective, tx=tx, schedule=schedule, opt_cfg=cfg.optimizer
  )


def test_one_step_runs_and_reports_every_metric(tiny):
  cfg, objective, tx, schedule, mesh, state, batch = tiny
  compiled, memory = train_helpers.compile_for(cfg, objective, tx, schedule, mesh, batch)
  assert memory is not None
  # The compiled step donates its state: give it a copy so the module fixture stays usable.
  new_state, metrics = compiled(jax.tree.map(jnp.copy, state), batch, jax.random.key(3))
  assert int(new_state.step) == 1
  for name in (
    'loss',
    'frame_loss',
    'utterance_loss',
    'contrastive_loss',
    'target_std',
    'prediction_std',
    'grad_norm',
    'param_norm',
    'update_norm',
    'learning_rate',
    'ema_decay',
    'effective_rank',
  ):
    assert np.isfinite(float(metrics[name])), name
  total = metrics['frame_loss'] + metrics['utterance_loss'] + metrics['contrastive_loss']
  np.testing.assert_allclose(metrics['loss'], total, rtol=1e-5)
  assert 1.0 <= float(metrics['effective_rank']) <= cfg.global_batch


def test_teacher_runs_once_per_clip(tiny, monkeypatch):
  """Counted structurally while tracing: one teacher call, on the B clips, not the B*M clones."""
  cfg, objective, tx, schedule, _, state, batch = tiny
  calls = []
  original = step_lib.teacher_forward

  def counting(objective, params, x):
    calls.append(x.shape)
    return original(objective, params, x)

  monkeypatch.setattr(step_lib, 'teacher_forward', counting)
  jax.eval_shape(plain_step(cfg, objective, tx, schedule), state, batch, jax.random.key(0))
  assert calls == [(cfg.global_batch, 64, 128)]
  # The naive baseline (benchmarks only) re-runs it on every clone.
  calls.clear()
  naive = functools.partial(plain_step(cfg, objective, tx, schedule), teacher_per_clone=True)
  jax.eval_shape(naive, state, batch, jax.random.key(0))
  assert calls == [(cfg.global_batch * objective.num_clones, 64, 128)]


@pytest.mark.slow
def test_ema_update_and_no_gradient_to_the_teacher(tiny):
  cfg, objective, tx, schedule, _, state, batch = tiny
  state = state.replace(step=jnp.asarray(1234, jnp.int32))
  # Make teacher and student differ so the EMA is visible.
  state = state.replace(teacher=jax.tree.map(lambda t: t + 0.5, state.teacher))
  new_state, metrics = jax.jit(plain_step(cfg, objective, tx, schedule))(
    state, batch, jax.random.key(0)
  )
  # The EMA after update 1235 (the state holds 1234 updates) anneals on 1235, as EAT's (the
  # one-update lag is below float32 resolution here; tests/test_eat_step.py shows it with a fast EMA).
  tau = float(optimizer.ema_decay(cfg.optimizer, 1235))
  np.testing.assert_allclose(float(metrics['ema_decay']), tau, rtol=1e-7)
  expected = jax.tree.map(
    lambda t, s: tau * t + (1 - tau) * s, state.teacher, new_state.params['encoder']
  )
  chex.assert_trees_all_close(new_state.teacher, expected, rtol=1e-6, atol=1e-7)

  def loss_through_teacher(teacher):
    x = objective.features(batch)
    targets = step_lib.teacher_forward(objective, teacher, x)
    masks = masking.inverse_block_mask(jax.random.key(0), 4 * 3, objective.grid, 0.8, 5)
    return step_lib.student_loss(objective, state.params, x, targets, masks)[0]

  grads = jax.jit(jax.grad(loss_through_teacher))(state.teacher)  # jitted: op by op took ~20 s
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_ema_schedule():
  from configs import common

  opt = common.optimizer_config()
  np.testing.assert_allclose(float(optimizer.ema_decay(opt, 0)), 0.9998, rtol=1e-7)
  np.testing.assert_allclose(float(optimizer.ema_decay(opt, 50_000)), 0.999895, rtol=1e-7)
  np.testing.assert_allclose(float(optimizer.ema_decay(opt, 10**6)), 0.99999, rtol=1e-7)


def test_learning_rate_scales_with_the_global_batch():
  from configs import common

  opt = common.optimizer_config()
  _, s48 = optimizer.make_optimizer(opt, 48, 1000)
  _, s96 = optimizer.make_optimizer(opt, 96, 1000)
  assert float(s48(0)) == 0.0
  np.testing.assert_allclose(float(s48(100)), 5e-4, rtol=1e-6)  # end of the 10% warm-up
  np.testing.assert_allclose(float(s96(100)), 1e-3, rtol=1e-6)
  assert float(s48(999)) < 1e-6


def test_weight_decay_only_on_kernels(tiny):
  _, _, _, _, _, state, _ = tiny
  mask = optimizer.weight_decay_mask(state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["['encoder']['blocks_0']['mlp']['fc1']['kernel']"]
  assert not flat["['encoder']['blocks_0']['mlp']['fc1']['bias']"]
  assert not flat["['encoder']['cls']"]
  assert not flat["['encoder']['norm']['scale']"]


def test_step_does_not_retrace(tiny):
  cfg, objective, tx, schedule, _, state, batch = tiny
  inner = plain_step(cfg, objective, tx, schedule)

  def traced(state, batch, rng):
    return inner(state, batch, rng)

  step = jax.jit(chex.assert_max_traces(traced, n=1))
  s1, _ = step(state, batch, jax.random.key(0))
  s2, m2 = step(s1, train_helpers.make_batch(cfg, objective, seed=5), jax.random.key(0))
  assert int(s2.step) == 2 and np.isfinite(float(m2['loss']))


@pytest.mark.slow
@pytest.mark.parametrize(
  'arg,overrides',
  [
    # Switches are paired so every one trains a step while the suite compiles 4 steps, not 7.
    ('stem=conv,predictor=cnn', []),
    ('', ['objective.contrastive_weight=0', 'model.aape.lambda_mode=fixed']),
    ('', ['objective.num_clones=2', 'model.aape.window=one_sided']),
    ('', ['model.dtype=bfloat16', 'model.remat=true']),
  ],
)
def test_ablation_switches_train(arg, overrides):
  cfg, objective, tx, schedule, _, state, batch = train_helpers.setup(arg, overrides)
  new_state, metrics = jax.jit(plain_step(cfg, objective, tx, schedule))(
    state, batch, jax.random.key(0)
  )
  assert np.isfinite(float(metrics['loss']))
  if 'objective.contrastive_weight=0' in overrides:
    assert float(metrics['contrastive_loss']) == 0.0
    # Without the contrastive term the projection head gets no gradient and does not move.
    chex.assert_trees_all_close(new_state.params['projection'], state.params['projection'])
  if 'stem=conv' in arg:
    assert 'aape' not in str(jax.tree_util.tree_structure(state.params['encoder']))


def test_contrastive_needs_two_clones():
  with pytest.raises(ValueError, match='at least 2'):
    train_helpers.setup('', ['objective.num_clones=1'])


@pytest.mark.slow
def test_scanned_layers_train_exactly_like_unrolled_layers(tiny):
  """One step with the blocks under nn.scan equals the unrolled step on the same parameters."""
  from aasp_jax.models.vit import stack_blocks, unstack_blocks

  cfg, objective, tx, schedule, mesh, state, batch = tiny
  s_cfg, s_objective, s_tx, s_schedule, s_mesh, s_state, _ = train_helpers.setup(
    overrides=['model.scan_layers=true']
  )
  depth = cfg.model.depth

  def to_scanned(tree):  # the unrolled state's encoder trees, re-laid out for the scanned model
    return stack_blocks(tree, depth)

  params = dict(state.params, encoder=to_scanned(state.params['encoder']))
  start = s_state.replace(
    params=params, teacher=to_scanned(state.teacher), opt_state=s_tx.init(params)
  )
  key = jax.random.key(3)
  ref_state, ref_metrics = jax.jit(plain_step(cfg, objective, tx, schedule))(state, batch, key)
  new_state, metrics = jax.jit(plain_step(s_cfg, s_objective, s_tx, s_schedule))(start, batch, key)
  for name in ('loss', 'frame_loss', 'utterance_loss', 'contrastive_loss', 'grad_norm'):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=2e-5, err_msg=name)
  chex.assert_trees_all_close(
    unstack_blocks(new_state.params['encoder'], depth),
    ref_state.params['encoder'],
    atol=2e-6,
  )
  chex.assert_trees_all_close(
    unstack_blocks(new_state.teacher, depth), ref_state.teacher, atol=2e-6
  )
