"""The ViT encoder: numpy reference, visible-token encoding, padding masks, dtypes, remat, jit."""

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_vit
import pytest

from aasp_jax.models import posemb
from aasp_jax.models.conv_stem import ConvPatchStem
from aasp_jax.models.vit import Encoder, stack_blocks, unstack_blocks

T, F, P, D, DEPTH = 64, 32, 8, 32, 2
GRID = (T // P, F // P)
N = GRID[0] * GRID[1]


def make_encoder(dtype=jnp.float32, remat=False, drop_path=0.0, scan_layers=False, **options):
  stem = ConvPatchStem(embed_dim=D, patch_t=P, patch_f=P, dtype=dtype)
  return Encoder(
    stem=stem,
    width=D,
    depth=DEPTH,
    num_heads=4,
    mlp_dim=64,
    max_time_patches=16,
    dtype=dtype,
    remat=remat,
    drop_path=drop_path,
    scan_layers=scan_layers,
    **options,
  )


@pytest.fixture(scope='module')
def setup():
  enc = make_encoder()
  x = jax.random.normal(jax.random.key(1), (3, T, F))
  variables = flax.core.unfreeze(enc.init(jax.random.key(0), x))
  # Non-trivial CLS/bias values so the reference comparison exercises every parameter.
  variables = jax.tree.map(
    lambda a: a + 0.01 * jax.random.normal(jax.random.key(7), a.shape), variables
  )
  return enc, variables, x


def patch_tokens_numpy(x, variables):
  """Conv stem with kernel = stride as a patch reshape + matmul, plus the fixed positions."""
  p = numpy_vit.to_numpy(variables['params']['stem']['proj'])
  b = x.shape[0]
  patches = np.asarray(x, np.float64).reshape(b, GRID[0], P, GRID[1], P).transpose(0, 1, 3, 2, 4)
  kernel = p['kernel'][:, :, 0, :]  # [P, P, D]
  tokens = np.einsum('btfij,ijd->btfd', patches, kernel) + p['bias']
  return tokens.reshape(b, N, D) + posemb.grid_posemb(D, GRID, 16)


def test_forward_matches_numpy_reference(setup):
  enc, variables, x = setup
  out = enc.apply(variables, x)
  ref_cls, ref_tokens = numpy_vit.encode_tokens(
    patch_tokens_numpy(x, variables), variables['params'], DEPTH
  )
  np.testing.assert_allclose(out['cls'], ref_cls, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out['tokens'], ref_tokens, atol=2e-5, rtol=1e-4)


def test_visible_tokens_equal_explicit_gather(setup):
  enc, variables, x = setup
  rng = np.random.default_rng(0)
  idx = np.stack([np.sort(rng.choice(N, 7, replace=False)) for _ in range(x.shape[0])])
  out = enc.apply(variables, x, visible_idx=jnp.asarray(idx))
  tokens, _ = enc.apply(variables, x, method='embed')
  gathered = np.take_along_axis(np.asarray(tokens), idx[:, :, None], axis=1)
  ref = enc.apply(variables, jnp.asarray(gathered), method='encode_tokens')
  np.testing.assert_allclose(out['tokens'], ref['tokens'], atol=1e-6)
  np.testing.assert_allclose(out['cls'], ref['cls'], atol=1e-6)
  # And against the independent numpy model on the same subset.
  ref_cls, ref_tokens = numpy_vit.encode_tokens(
    np.take_along_axis(patch_tokens_numpy(x, variables), idx[:, :, None], axis=1),
    variables['params'],
    DEPTH,
  )
  np.testing.assert_allclose(out['tokens'], ref_tokens, atol=2e-5, rtol=1e-4)


def test_masked_patches_do_not_reach_visible_outputs(setup):
  """With the (local) conv stem, changing the content of hidden patches changes nothing visible."""
  enc, variables, x = setup
  idx = jnp.asarray(np.tile(np.arange(0, N, 3), (x.shape[0], 1)))
  x2 = np.array(x)
  for token in sorted(set(range(N)) - {int(i) for i in np.asarray(idx[0])}):
    t, f = divmod(token, GRID[1])
    x2[:, t * P : (t + 1) * P, f * P : (f + 1) * P] += 5.0
  a = enc.apply(variables, x, visible_idx=idx)
  b = enc.apply(variables, jnp.asarray(x2), visible_idx=idx)
  np.testing.assert_allclose(a['tokens'], b['tokens'], atol=1e-6)
  assert not np.allclose(
    enc.apply(variables, x)['cls'], enc.apply(variables, jnp.asarray(x2))['cls']
  )


def test_padding_mask_matches_reference_and_isolates_padding(setup):
  enc, variables, x = setup
  valid = np.ones((x.shape[0], N), bool)
  valid[:, -GRID[1] * 3 :] = False  # last three time patches are padding
  out = enc.apply(variables, x, token_valid_bn=jnp.asarray(valid))
  ref_cls, ref_tokens = numpy_vit.encode_tokens(
    patch_tokens_numpy(x, variables), variables['params'], DEPTH, valid
  )
  np.testing.assert_allclose(out['cls'], ref_cls, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(
    out['tokens'][:, valid[0]], ref_tokens[:, valid[0]], atol=2e-5, rtol=1e-4
  )
  x2 = np.array(x)
  x2[:, -3 * P :] = -7.0
  out2 = enc.apply(variables, jnp.asarray(x2), token_valid_bn=jnp.asarray(valid))
  np.testing.assert_allclose(out['cls'], out2['cls'], atol=1e-6)


def test_return_layers_and_final_norm(setup):
  enc, variables, x = setup
  out = enc.apply(variables, x, return_layers=True)
  chex.assert_shape(out['layers'], (DEPTH, x.shape[0], N, D))
  last = np.asarray(out['layers'][-1], np.float64)
  ref = numpy_vit.layer_norm(last, numpy_vit.to_numpy(variables['params']['norm']))
  np.testing.assert_allclose(out['tokens'], ref, atol=2e-5)


def test_remat_gives_same_outputs_and_gradients(setup):
  _, variables, x = setup
  plain, remat = make_encoder(), make_encoder(remat=True)

  def loss(module, params):
    return jnp.sum(module.apply({'params': params}, x)['tokens'] ** 2)

  g1 = jax.grad(lambda p: loss(plain, p))(variables['params'])
  g2 = jax.grad(lambda p: loss(remat, p))(variables['params'])
  chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_with_float32_params(setup):
  _, variables, x = setup
  enc16 = make_encoder(dtype=jnp.bfloat16)
  out16 = enc16.apply(variables, x)
  out32 = make_encoder().apply(variables, x)
  assert out16['tokens'].dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  np.testing.assert_allclose(
    np.asarray(out16['tokens'], np.float32), out32['tokens'], atol=0.1, rtol=0.1
  )


def test_drop_path_is_stochastic_only_in_training(setup):
  _, variables, x = setup
  enc = make_encoder(drop_path=0.5)
  det = enc.apply(variables, x)
  np.testing.assert_allclose(det['tokens'], make_encoder().apply(variables, x)['tokens'], atol=1e-6)
  a = enc.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  b = enc.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a['tokens'], b['tokens'])


def test_jit_does_not_retrace(setup):
  enc, variables, x = setup

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(v, x, idx):
    return enc.apply(v, x, visible_idx=idx)['cls']

  idx = jnp.zeros((x.shape[0], 5), jnp.int32)
  forward(variables, x, idx)
  forward(variables, x + 1.0, idx + 1)


def test_input_longer_than_position_table_fails_clearly():
  enc = make_encoder()
  with pytest.raises(ValueError, match='max_time_patches'):
    enc.init(jax.random.key(0), jnp.zeros((1, 17 * P, F)))


def scanned_variables(variables):
  return {'params': stack_blocks(variables['params'], DEPTH)}


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_blocks_equal_unrolled_blocks(setup, remat):
  enc, variables, x = setup
  scanned = make_encoder(scan_layers=True, remat=remat)
  # The scanned layout is what init makes: the same tree with blocks stacked on a leading axis.
  init_shapes = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x)['params'])
  stacked = scanned_variables(variables)
  assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, stacked['params'])
  valid = jnp.arange(N)[None, :] < jnp.array([[N], [N - 3], [5]])
  ref = enc.apply(variables, x, token_valid_bn=valid, return_layers=True)
  out = scanned.apply(stacked, x, token_valid_bn=valid, return_layers=True)
  for key in ('cls', 'tokens', 'layers'):
    np.testing.assert_allclose(out[key], ref[key], atol=1e-6, rtol=1e-6)

  def loss(module, v):
    return jnp.sum(module.apply(v, x, return_layers=True)['layers'] ** 2)

  g_ref = jax.grad(lambda v: loss(enc, v))(nn.meta.unbox(variables))
  g = jax.grad(lambda v: loss(scanned, v))(stacked)
  # Gradients reach ~300 here; float32 summation order differs between the two programs, and the
  # key bias's true gradient is 0 (softmax ignores it), so both sides carry only noise there.
  chex.assert_trees_all_close(g, scanned_variables(g_ref), atol=1e-3, rtol=1e-4)


def test_stack_and_unstack_blocks_are_inverse(setup):
  _, variables, _ = setup
  back = unstack_blocks(stack_blocks(variables['params'], DEPTH), DEPTH)
  chex.assert_trees_all_equal(back, nn.meta.unbox(variables['params']))


def test_scanned_drop_path_uses_per_layer_rates_only_in_training(setup):
  _, variables, x = setup
  stacked = scanned_variables(variables)
  enc = make_encoder(drop_path=0.5, scan_layers=True)
  det = enc.apply(stacked, x)
  np.testing.assert_allclose(det['tokens'], make_encoder().apply(variables, x)['tokens'], atol=1e-6)
  a = enc.apply(stacked, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  b = enc.apply(stacked, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a['tokens'], b['tokens'])
  # Layer 0's rate is 0 (the schedule rises linearly from 0): with one block, nothing is dropped.
  one = Encoder(
    stem=ConvPatchStem(embed_dim=D, patch_t=P, patch_f=P),
    width=D,
    depth=1,
    num_heads=4,
    mlp_dim=64,
    max_time_patches=16,
    drop_path=0.5,
    scan_layers=True,
  )
  v1 = one.init(jax.random.key(0), x)
  train = one.apply(v1, x, deterministic=False, rngs={'dropout': jax.random.key(3)})
  np.testing.assert_allclose(train['tokens'], one.apply(v1, x)['tokens'], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Options for imported encoders: posemb, block_norm, norm_eps (their parity with the original
# models is tested in test_export_timm.py and test_import_eat.py)


def test_import_options_scanned_equal_unrolled():
  """Learned positions + post-LN + eps 1e-5: the scanned (rematerialised) layout equals the
  unrolled one on masked and padded inputs, for both layer sources."""
  options = dict(posemb='learned', block_norm='post', norm_eps=1e-5)
  enc = make_encoder(**options)
  scanned = make_encoder(scan_layers=True, remat=True, **options)
  x = jax.random.normal(jax.random.key(1), (3, T, F))
  params = nn.meta.unbox(enc.init(jax.random.key(0), x)['params'])
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  assert 'input_norm' in params and 'norm' not in params
  assert params['posemb'].shape == (16, GRID[1], D)
  stacked = {'params': stack_blocks(params, DEPTH)}
  init_shapes = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x)['params'])
  assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, stacked['params'])
  idx = jnp.asarray(np.stack([np.arange(1, N, 2)] * 3))
  valid = jnp.arange(idx.shape[1])[None, :] < jnp.array([[idx.shape[1]], [5], [2]])
  for source in ('residual', 'ffn'):
    kw = dict(visible_idx=idx, token_valid_bn=valid, return_layers=True, layer_source=source)
    ref = enc.apply({'params': params}, x, **kw)
    out = scanned.apply(stacked, x, **kw)
    for key in ('cls', 'tokens', 'layers'):
      np.testing.assert_allclose(out[key], ref[key], atol=2e-6, rtol=1e-5)
  # Post-LN: the last block's output is the final output (no final norm).
  np.testing.assert_array_equal(
    enc.apply({'params': params}, x, return_layers=True)['layers'][-1],
    enc.apply({'params': params}, x)['tokens'],
  )


def test_post_norm_block_and_input_norm_follow_eat():
  """One post-LN block by hand: x = LN(x + attn(x)), x = LN(x + mlp(x)), after LN(CLS + tokens)."""
  enc = make_encoder(block_norm='post', norm_eps=1e-5, posemb='sincos_mae')
  x = jax.random.normal(jax.random.key(1), (2, T, F))
  params = nn.meta.unbox(enc.init(jax.random.key(0), x)['params'])
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  tokens, _ = enc.apply({'params': params}, x, method='embed')
  pre_ln = {k: v for k, v in params.items() if k != 'input_norm'}
  pre_ln['norm'] = params['input_norm']
  sincos_tokens = make_encoder().apply({'params': pre_ln}, x, method='embed')[0]
  swap = posemb.grid_posemb(D, GRID, 16, 'sincos_mae') - posemb.grid_posemb(D, GRID, 16)
  np.testing.assert_allclose(tokens, sincos_tokens + swap, atol=1e-5)
  p = numpy_vit.to_numpy(params)
  ln = numpy_vit.layer_norm
  h = np.concatenate([np.broadcast_to(p['cls'], (2, 1, D)), np.asarray(tokens, np.float64)], 1)
  h = ln(h, p['input_norm'], eps=1e-5)
  for i in range(DEPTH):
    blk = p[f'blocks_{i}']
    h = ln(h + numpy_vit.attention(h, h, blk['attn'], 4), blk['norm1'], eps=1e-5)
    y = numpy_vit.gelu(numpy_vit.dense_general(h, blk['mlp']['fc1']))
    h = ln(h + numpy_vit.dense_general(y, blk['mlp']['fc2']), blk['norm2'], eps=1e-5)
  out = enc.apply({'params': params}, x)
  np.testing.assert_allclose(out['cls'], h[:, 0], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out['tokens'], h[:, 1:], atol=2e-5, rtol=1e-4)


def test_learned_posemb_longer_input_fails_clearly():
  enc = make_encoder(posemb='learned')
  with pytest.raises(ValueError, match='max_time_patches'):
    enc.init(jax.random.key(0), jnp.zeros((1, 17 * P, F)))
  with pytest.raises(ValueError, match='posemb'):
    make_encoder(posemb='rope').init(jax.random.key(0), jnp.zeros((1, T, F)))
