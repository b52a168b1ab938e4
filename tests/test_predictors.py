"""The cross-attention predictor (numpy reference, query independence) and the CNN decoder ablation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_vit
from aasp_jax.models import posemb
from aasp_jax.models.cnn_decoder import CnnDecoder
from aasp_jax.models.predictor import CrossAttentionPredictor

GRID = (8, 4)
N = GRID[0] * GRID[1]
D_ENC, WIDTH = 24, 16


def predictor_numpy(params, visible, masked_idx, depth):
  p = numpy_vit.to_numpy(params)
  kv = visible @ p['context_proj']['kernel'] + p['context_proj']['bias']
  pos = posemb.grid_posemb(WIDTH, GRID, 16)
  q = p['mask_token'][0] + pos[masked_idx]
  for i in range(depth):
    q = q + numpy_vit.attention(
      numpy_vit.layer_norm(q, p[f'block_{i}_norm_q']),
      numpy_vit.layer_norm(kv, p[f'block_{i}_norm_kv']),
      p[f'block_{i}_cross_attn'],
      2,
    )
    h = numpy_vit.layer_norm(q, p[f'block_{i}_norm_mlp'])
    h = numpy_vit.gelu(numpy_vit.dense_general(h, p[f'block_{i}_mlp']['fc1']))
    q = q + numpy_vit.dense_general(h, p[f'block_{i}_mlp']['fc2'])
  q = numpy_vit.layer_norm(q, p['norm'])
  return q @ p['out_proj']['kernel'] + p['out_proj']['bias']


@pytest.fixture(scope='module')
def cross():
  model = CrossAttentionPredictor(
    width=WIDTH, depth=2, num_heads=2, out_dim=D_ENC, max_time_patches=16
  )
  vis = jax.random.normal(jax.random.key(0), (2, 6, D_ENC))
  vis_idx = jnp.tile(jnp.arange(6), (2, 1))
  masked = jnp.asarray([[6, 10, 31], [7, 8, 20]])
  params = model.init(jax.random.key(1), vis, vis_idx, masked, GRID)['params']
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(3), a.shape), params)
  return model, params, vis, vis_idx, masked


def test_cross_attention_matches_numpy(cross):
  model, params, vis, vis_idx, masked = cross
  out = model.apply({'params': params}, vis, vis_idx, masked, GRID)
  chex.assert_shape(out, (2, 3, D_ENC))
  ref = predictor_numpy(params, np.asarray(vis, np.float64), np.asarray(masked), 2)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_each_query_depends_only_on_its_position_and_the_context(cross):
  model, params, vis, vis_idx, masked = cross
  full = model.apply({'params': params}, vis, vis_idx, masked, GRID)
  alone = model.apply({'params': params}, vis, vis_idx, masked[:, :1], GRID)
  np.testing.assert_allclose(full[:, :1], alone, atol=1e-6)
  # The context is a set: permuting visible tokens changes nothing.
  perm = jnp.asarray([3, 0, 5, 1, 4, 2])
  permuted = model.apply({'params': params}, vis[:, perm], vis_idx[:, perm], masked, GRID)
  np.testing.assert_allclose(full, permuted, atol=1e-5)
  # Different positions get different predictions from the same context.
  assert not np.allclose(full[:, 0], full[:, 1])


def test_cnn_decoder_is_local_and_shaped():
  model = CnnDecoder(width=16, num_layers=2, kernel_size=3, groups=4, out_dim=D_ENC)
  rng = np.random.default_rng(0)
  vis_idx = jnp.asarray(np.sort(rng.choice(N, 10, replace=False))[None])
  masked = jnp.asarray(np.setdiff1d(np.arange(N), np.asarray(vis_idx[0]))[None])
  vis = jax.random.normal(jax.random.key(0), (1, 10, D_ENC))
  params = model.init(jax.random.key(1), vis, vis_idx, masked, GRID)['params']
  out = model.apply({'params': params}, vis, vis_idx, masked, GRID)
  chex.assert_shape(out, (1, N - 10, D_ENC))
  # Two 3x3 layers see +-2 cells: a visible token further away cannot change a prediction.
  target = int(masked[0, 0])
  tt, tf = divmod(target, GRID[1])
  far = [
    i
    for i, v in enumerate(np.asarray(vis_idx[0]))
    if max(abs(v // GRID[1] - tt), abs(v % GRID[1] - tf)) > 2
  ]
  near = [
    i
    for i, v in enumerate(np.asarray(vis_idx[0]))
    if max(abs(v // GRID[1] - tt), abs(v % GRID[1] - tf)) <= 2
  ]
  assert far and near
  moved_far = vis.at[:, far].add(3.0)
  out_far = model.apply({'params': params}, moved_far, vis_idx, masked, GRID)
  np.testing.assert_allclose(out_far[0, 0], out[0, 0], atol=1e-6)
  moved_near = vis.at[:, near].add(3.0)
  out_near = model.apply({'params': params}, moved_near, vis_idx, masked, GRID)
  assert not np.allclose(out_near[0, 0], out[0, 0])


def test_cnn_decoder_rejects_bad_groups():
  model = CnnDecoder(width=18, groups=4)
  with pytest.raises(ValueError, match='groups'):
    model.init(
      jax.random.key(0),
      jnp.zeros((1, 2, 8)),
      jnp.zeros((1, 2), jnp.int32),
      jnp.ones((1, 2), jnp.int32),
      GRID,
    )
