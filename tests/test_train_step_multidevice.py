"""The AaSP train step on 8 fake CPU devices equals the single-device step, for every mesh layout.

One step of a tiny float32 model runs on a (data, fsdp, tensor) mesh and on a 1-device mesh from the
same initial rng, global batch and step rng; the new student, the new teacher and the metrics must
agree up to float32 reduction-order noise. The contrastive loss on a batch sharded over 8 devices is
checked against a plain numpy implementation.
"""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import chex  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from aasp_jax import configuration, losses, sharding  # noqa: E402
from aasp_jax.train import objective as objective_lib  # noqa: E402
from aasp_jax.train import optimizer, step as step_lib  # noqa: E402
from aasp_jax.train import state as state_lib  # noqa: E402

TARGET_LENGTH = 64
GLOBAL_BATCH = 8
# Every sharded dimension (widths, mlp, heads, projection) divides 8 so that (1, 8, 1) works too.
OVERRIDES = (
  'model.dtype=float32',
  'model.depth=2',
  'model.width=64',
  'model.num_heads=4',
  'model.mlp_dim=128',
  'model.aape.num_modes=2',
  'model.predictor.width=32',
  'model.predictor.num_heads=2',
  'objective.top_k_layers=2',
  'objective.num_clones=2',
  'objective.projection_hidden=32',
  'objective.projection_dim=16',
  f'global_batch={GLOBAL_BATCH}',
  'total_steps=100',
  # No warm-up, so the first step's learning rate (and update) is not zero, and a fast EMA, so the
  # teacher visibly moves: otherwise params and teacher would match trivially.
  'optimizer.warmup_fraction=0.0',
  'optimizer.ema_start=0.5',
  'optimizer.ema_end=0.5',
)
# (4, 2, 1) is covered by (8, 1, 1) + (2, 2, 2): pure data, data x fsdp and pure fsdp sharding.
MESHES = ((8, 1, 1), (2, 2, 2), (1, 8, 1))

# Tolerances. Sharding only changes the order of float32 reductions (partial sums over batch shards,
# fsdp/tensor slices of matmul contractions, the all-reduced gradients), which moves the loss and
# norms by a few ulps: ~4e-6 absolute on metrics of size 1-50 observed, i.e. <1e-6 relative. Adam's
# first step divides each gradient by its own magnitude, which normalises these relative errors
# rather than amplifying them, except for gradients near eps (1e-8), absent here. rtol=1e-4 and
# atol=1e-5 leave >10x headroom over what is observed, yet are far below the size of a real bug (a
# lost shard or a wrong all-reduce changes the loss and the update at the 1e-2..1e0 level).
RTOL, ATOL = 1e-4, 1e-5


def _config(mesh_shape, arg=''):
  data, fsdp, tensor = mesh_shape
  return configuration.load_config(
    f'configs/pretrain.py:variant=tiny,target_length={TARGET_LENGTH}{arg}',
    list(OVERRIDES) + [f'mesh.data={data}', f'mesh.fsdp={fsdp}', f'mesh.tensor={tensor}'],
  )


def _batch():
  num_samples = 400 + (TARGET_LENGTH - 1) * 160
  rng = np.random.default_rng(1)
  return {
    'waveform': (0.1 * rng.standard_normal((GLOBAL_BATCH, num_samples))).astype(np.float32),
    # Some clips are shorter than the window, so padding and the length mask are exercised too.
    'num_samples': rng.integers(num_samples // 2, num_samples + 1, GLOBAL_BATCH).astype(np.int32),
  }


def _one_step(mesh_shape, devices, arg=''):
  """(state before, state after, metrics) of one step of the tiny model on the given mesh."""
  cfg = _config(mesh_shape, arg)
  objective = objective_lib.AaSPObjective.from_config(cfg)
  tx, schedule = optimizer.make_optimizer(cfg.optimizer, cfg.global_batch, cfg.total_steps)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = cfg.logical_axis_rules
  sharding.check_batch(cfg.global_batch, mesh)
  state = state_lib.init_state(objective, tx, jax.random.key(0), mesh, rules)
  _, shardings = state_lib.state_shardings(objective, tx, mesh, rules)
  host_batch = _batch()
  batch_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host_batch)
  compiled, _ = step_lib.compile_step(
    objective, tx, schedule, cfg.optimizer, mesh, rules, shardings, batch_abstract
  )
  batch = {
    k: jax.device_put(v, NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (v.ndim - 1)))))
    for k, v in host_batch.items()
  }
  # The step donates its input state: keep a host copy of the params to check they moved.
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new_state, metrics = compiled(state, batch, jax.random.key(2))
  return before, new_state, metrics


@pytest.fixture(scope='module')
def reference():
  assert jax.device_count() == 8
  return _one_step((1, 1, 1), jax.devices()[:1])


def _max_abs_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def _is_key_bias(path):
  names = [getattr(k, 'key', None) for k in path]
  return names[-2:] == ['key', 'bias']


def _assert_close_but_key_biases(tree, ref, key_bias_atol):
  """RTOL/ATOL everywhere except attention key biases, which get `key_bias_atol`.

  The key bias has an exactly zero gradient (softmax is invariant to a per-query shift), so its
  computed gradient is rounding noise whose sign depends on the reduction order, and Adam's first
  step, lr * g / (|g| + eps), turns that noise into an update of up to +-lr: sharded and unsharded
  key biases may differ by up to 2 * lr (4.4e-5 seen on (2, 2, 2) with lr 8.3e-5).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_ref = jax.tree.leaves(ref)
  assert len(flat) == len(flat_ref)
  assert any(_is_key_bias(path) for path, _ in flat)
  for (path, x), y in zip(flat, flat_ref):
    atol = key_bias_atol if _is_key_bias(path) else ATOL
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=RTOL, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def _specs(tree):
  return [leaf.sharding.spec for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize('mesh_shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_step_matches_single_device(reference, mesh_shape):
  ref_before, ref_state, ref_metrics = reference
  _, state, metrics = _one_step(mesh_shape, jax.devices())

  print(
    f'mesh {mesh_shape}: max |diff| params {_max_abs_diff(state.params, ref_state.params):.2e}, '
    f'teacher {_max_abs_diff(state.teacher, ref_state.teacher):.2e}, '
    f'metrics {_max_abs_diff(metrics, ref_metrics):.2e}'
  )
  # The step really updates: Adam's first step moves the params by about the learning rate.
  assert _max_abs_diff(ref_state.params, ref_before) > 0.5 * float(ref_metrics['learning_rate']) > 0
  assert _max_abs_diff(ref_state.teacher, ref_before['encoder']) > 0.25 * float(
    ref_metrics['learning_rate']
  )
  assert int(state.step) == int(ref_state.step) == 1
  print(
    jax.tree_util.tree_map_with_path(
      lambda p, x, y: (
        jax.tree_util.keystr(p),
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      ),
      state.params,
      ref_state.params,
    )
  )
  noise_atol = 2.5 * float(ref_metrics['learning_rate'])
  _assert_close_but_key_biases(state.params, ref_state.params, noise_atol)
  _assert_close_but_key_biases(state.teacher, ref_state.teacher, noise_atol)
  chex.assert_trees_all_close(state.opt_state, ref_state.opt_state, rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(ref_metrics)
  chex.assert_trees_all_close(metrics, ref_metrics, rtol=RTOL, atol=ATOL)
  assert all(np.isfinite(float(v)) for v in metrics.values())

  # The state lives on all 8 devices, split the way the mesh says.
  _, fsdp, tensor = mesh_shape
  leaves = jax.tree.leaves(state.params)
  assert all(len(leaf.sharding.device_set) == 8 for leaf in leaves)
  specs = _specs(state.params) + _specs(state.teacher)
  # Specs keep the names of size-1 axes too, so only axes of size > 1 are checked for use.
  if fsdp > 1:
    assert any('fsdp' in jax.tree.leaves(tuple(spec)) for spec in specs)
  if tensor > 1:
    assert any('tensor' in jax.tree.leaves(tuple(spec)) for spec in specs)
  if fsdp > 1 or tensor > 1:
    # Some kernel holds only a slice of itself on each device.
    assert any(leaf.addressable_shards[0].data.size < leaf.size for leaf in leaves), (
      'no parameter is actually split across devices'
    )
  else:
    # Pure data parallelism: the parameters are replicated.
    assert all(leaf.sharding.is_fully_replicated for leaf in leaves)


def test_eat_cls_weight_does_not_depend_on_the_device_count():
  """recipe=eat weights the CLS term by EAT's rows per GPU (eat_clips_per_worker * num_clones) times
  the row mean: the same loss with the batch on 1 and on 2 devices (EAT's own weight, (1 / W) * the
  row sum over its W GPUs, would halve on 2)."""
  cfg = _config((1, 1, 1), ',recipe=eat')
  assert cfg.objective.utterance_reduction == 'eat' and cfg.objective.eat_clips_per_worker == 12
  objective = objective_lib.AaSPObjective.from_config(cfg)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  x = objective.features(jax.tree.map(jax.numpy.asarray, _batch()))
  targets = step_lib.teacher_forward(objective, params['encoder'], x)
  masks, noise = step_lib.step_randomness(objective, jax.random.key(2), 0, GLOBAL_BATCH)
  loss = jax.jit(lambda p, x, t, m, n: step_lib.student_loss(objective, p, x, t, m, mask_noise=n))
  results = []
  for n in (1, 2):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))
    rows = NamedSharding(mesh, P('data'))
    put = lambda a: jax.device_put(a, rows)  # noqa: E731
    _, aux = loss(params, put(x), put(targets), jax.tree.map(put, masks), put(noise))
    assert len(aux['utterance_loss'].sharding.device_set) <= n
    results.append({k: float(aux[k]) for k in ('frame_loss', 'utterance_loss')})
  one, two = results
  assert one['utterance_loss'] > 0
  for key in one:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


def _numpy_infonce(z, ids, temperature):
  """Reference SupCon-out multi-positive InfoNCE, written with loops over anchors."""
  z = z.astype(np.float64)
  sim = z @ z.T / temperature
  losses_ = []
  for i in range(len(z)):
    others = [a for a in range(len(z)) if a != i]
    log_denominator = np.log(np.sum(np.exp(sim[i, others])))
    positives = [p for p in others if ids[p] == ids[i]]
    if positives:
      losses_.append(-np.mean([sim[i, p] - log_denominator for p in positives]))
  return np.mean(losses_)


@pytest.mark.parametrize('mesh_shape', ((8, 1, 1), (4, 2, 1), (1, 8, 1)))
def test_contrastive_loss_on_a_sharded_batch_matches_numpy(mesh_shape):
  num_clips, num_clones, dim, temperature = 8, 3, 16, 0.1
  rng = np.random.default_rng(0)
  z = rng.standard_normal((num_clips * num_clones, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  ids = np.repeat(np.arange(num_clips), num_clones).astype(np.int32)
  mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  loss_fn = jax.jit(
    lambda z_rd, ids_r: losses.multi_positive_infonce(z_rd, ids_r, temperature),
    in_shardings=(NamedSharding(mesh, P(sharding.BATCH_AXES, None)), rows),
    out_shardings=NamedSharding(mesh, P()),
  )
  z_sharded = jax.device_put(z, NamedSharding(mesh, P(sharding.BATCH_AXES, None)))
  assert {shard.data.shape for shard in z_sharded.addressable_shards} == {(3, dim)}  # 8 x 3 rows
  with jax.set_mesh(mesh):
    loss = loss_fn(z_sharded, jax.device_put(ids, rows))
  np.testing.assert_allclose(float(loss), _numpy_infonce(z, ids, temperature), rtol=1e-5)
  # And the library's own clip ids are the clip-major ids used above.
  np.testing.assert_array_equal(np.asarray(losses.clip_ids(num_clips, num_clones)), ids)
