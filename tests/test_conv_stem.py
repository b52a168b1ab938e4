"""Tests of the plain conv patch stem (aasp_jax.models.conv_stem)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aasp_jax.models.conv_stem import ConvPatchStem


def _init(model, x, seed=0):
  # 'rbg' keys and a jitted init: with jax_threefry_partitionable (set by aasp_jax) XLA:CPU takes
  # seconds to compile threefry, which would dominate this file's runtime.
  return jax.jit(model.init)(jax.random.key(seed, impl='rbg'), x)


def test_matches_torch_layout_patchify():
  """Tokens equal an explicit patch sum written with a PyTorch-layout weight [D, 1, pt, pf]."""
  batch, num_t, num_f, patch_t, patch_f, dim = 2, 24, 20, 8, 4, 6
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, num_t, num_f)).astype(np.float32)
  w_torch = rng.normal(size=(dim, 1, patch_t, patch_f)).astype(np.float32)
  b_torch = rng.normal(size=(dim,)).astype(np.float32)
  params = {'proj': {'kernel': w_torch.transpose(2, 3, 1, 0), 'bias': b_torch}}
  model = ConvPatchStem(dim, patch_t=patch_t, patch_f=patch_f)
  tokens = np.asarray(model.apply({'params': params}, x))
  assert tokens.shape == (batch, num_t // patch_t, num_f // patch_f, dim)
  # torch conv2d on [B, 1, T, F]:
  # out[b, d, i, j] = sum_{a, c} w[d, 0, a, c] x[b, i pt + a, j pf + c] + bias[d].
  patches = x.reshape(batch, num_t // patch_t, patch_t, num_f // patch_f, patch_f)
  ref = np.einsum('bitjf,dtf->bijd', patches, w_torch[:, 0]) + b_torch
  np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)


def test_init_and_logical_axes():
  dim = 32
  model = ConvPatchStem(dim)
  variables = _init(model, jnp.zeros((1, 32, 32)))
  kernel = variables['params']['proj']['kernel']
  bias = variables['params']['proj']['bias']
  assert isinstance(kernel, nn.LogicallyPartitioned) and isinstance(bias, nn.LogicallyPartitioned)
  assert kernel.names == (None, None, None, 'embed') and bias.names == ('embed',)
  assert kernel.value.shape == (16, 16, 1, dim) and kernel.value.dtype == jnp.float32
  # MAE's xavier_uniform on the [D, 256] view: U(-a, a), a = sqrt(6 / (256 + D)).
  limit = np.sqrt(6 / (256 + dim))
  values = np.abs(np.asarray(kernel.value))
  assert values.max() <= limit and values.max() > 0.95 * limit
  np.testing.assert_array_equal(bias.value, 0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_jit_no_retrace_and_dtypes(dtype):
  # chex counts traces per function definition, across parametrised runs of this test.
  chex.clear_trace_counter()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 32))
  model = ConvPatchStem(16, dtype=dtype)
  variables = _init(model, x)
  assert variables['params']['proj']['kernel'].value.dtype == jnp.float32

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(variables, x):
    return model.apply(variables, x)

  y1 = apply(variables, x)
  y2 = apply(variables, x + 1.0)
  chex.assert_shape(y1, (2, 4, 2, 16))
  assert y1.dtype == dtype and y2.dtype == dtype
  assert np.all(np.isfinite(np.asarray(y2, np.float32)))
  assert not np.array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32))


def test_errors():
  model = ConvPatchStem(8)
  with pytest.raises(ValueError, match='T must be a multiple of patch_t'):
    _init(model, jnp.zeros((1, 40, 32)))
  with pytest.raises(ValueError, match=r'F=24'):
    _init(model, jnp.zeros((1, 32, 24)))
  with pytest.raises(ValueError, match=r'\[B, T, F\]'):
    _init(model, jnp.zeros((1, 32, 32, 1)))
